//! lors-lm: train decoder-only language models whose stacked layers share their weights
//! the LORS way (`W_l = W_shared + B_l A_l`).
//!
//! Layers, top to bottom (each imports only from the layers below it):
//!
//! | module | what it owns |
//! |---|---|
//! | `cmd` | one file per command: its arguments and `run` |
//! | `sweep` | comparison plans: plan, run, report |
//! | `train` | `Trainer` (the step), the loop, optimizer, schedule, run directory, checkpoints |
//! | `infer`, `compress` | generation and perplexity; a trained model → LORS by mean bases and truncated SVD of the residuals |
//! | `data` | `prepare` and the prepared token files |
//! | `formats`, `device` | Hugging Face and GGUF import/export, `tokenizer.json`, Hub model repos; devices and BLAS |
//! | `monitor`, `config` | metrics and reports; the run configuration |
//! | `model` | the Llama model, the LORS method (`model/lors.rs`), parameters |
//! | `kernels`, `rng`, `files`, `alloc` | fused CPU kernels with their backward passes; the seeded RNG, atomic writes, the allocator per command |

pub mod alloc;
pub mod cmd;
pub mod compress;
pub mod config;
pub mod data;
pub mod device;
pub mod files;
pub mod formats;
pub mod infer;
pub mod kernels;
pub mod model;
pub mod monitor;
pub mod rng;
pub mod sweep;
pub mod train;
