//! The commands: one file each, holding its clap `Args` and its `run`. A command parses and
//! checks its arguments, calls the library and prints; it computes no gradient itself.

pub mod bench;
pub mod bench_decode;
pub mod check_device;
pub mod compress;
pub mod eval;
pub mod export;
pub mod generate;
pub mod launch;
pub mod params;
pub mod prepare;
pub mod probe;
pub mod source;
pub mod sweep;
pub mod train;
