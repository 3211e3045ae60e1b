//! lors-lm: train decoder-only language models whose stacked layers share their weights
//! the LORS way (`W_l = W_shared + B_l A_l`).
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod console;
pub mod data;
pub mod devcheck;
pub mod device;
pub mod eval;
pub mod generate;
pub mod hf;
pub mod lors;
pub mod model;
pub mod ops;
pub mod optim;
pub mod params;
pub mod params_cmd;
pub mod plot;
pub mod rng;
pub mod store;
pub mod sweep;
pub mod tb;
pub mod train;
