//! The model: a Llama whose projections are LORS-shared.
//!
//! * `config.rs`: the architecture's sizes (the `[model]` section), read by every other file.
//! * `llama.rs`: the architecture (RoPE → attention → MLP → block → model).
//! * `lors.rs`: the LORS method in one file (what is shared, groups, ranks, init, names,
//!   optimizer options, and the `LorsLinear` layer).
//! * `ops.rs`: fused CPU kernels or plain candle ops, chosen by one value.
//! * `stack.rs`: projections computed together, trainable, merged or factored (inference).
//! * `store.rs`: named parameters (created from a seed or loaded from tensors), each with the
//!   `Role` the optimizer reads.
//! * `params.rs`: parameter counts from the config alone.
//!
//! The model never touches the file system: checkpoints live in `train/`, file formats in
//! `formats/`.

pub mod config;
pub mod llama;
pub mod lors;
pub mod ops;
pub mod params;
pub mod stack;
pub mod store;

pub use config::{ModelConfig, MAX_LAYERS, MAX_POSITIONS, MAX_WIDTH};
pub use llama::{KvCache, Model};
pub use lors::{LorsConfig, LorsLinear, Mode, Proj};
pub use ops::Ops;
pub use params::ParamCounts;
pub use stack::{WeightBytes, Weights};
pub use store::{Init, ParamStore, Role};
