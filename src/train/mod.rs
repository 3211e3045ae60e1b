//! Training: the library API the commands build on.
//!
//! * `trainer.rs`: [`Trainer`] (new / resume / with_weights, `step`, `evaluate`, `save`), the
//!   one training step, with the hook where data-parallel training combines gradients.
//! * `fit.rs`: the loop around it (reports, evaluation, checkpoints, Ctrl-C), with the hooks
//!   where data-parallel ranks act together (`DataParallel`).
//! * `session.rs`: a whole training run from a resolved config (`train` and `sweep` use it).
//! * `optim.rs` + `adamw.rs`: AdamW with per-parameter options, and its in-place CPU update.
//! * `schedule.rs`: the learning rate at each step.
//! * `distill.rs`: knowledge distillation from a teacher model.
//! * `batches.rs`: training and validation batches.
//! * `run_dir.rs` + `checkpoint.rs`: the run directory's layout and atomic checkpoints.
//! * `distributed/`: data-parallel training over MPI and NCCL (ranks, gradient all-reduce,
//!   watchdog, launcher detection).
//!
//! ```
//! use lors_lm::{config::Config, train::{Source, Trainer}};
//! # fn main() -> anyhow::Result<()> {
//! let mut cfg = Config::tiny();
//! cfg.model.vocab_size = 50;
//! let mut trainer = Trainer::new(cfg, Source::Random { vocab: 50 }, &candle_core::Device::Cpu)?;
//! let stats = trainer.step()?; // StepStats { step, loss, lr, grad_norm, tokens, ms, .. }
//! assert_eq!((stats.step, stats.tokens), (1, 4 * 16));
//! assert!(stats.loss.is_finite() && stats.grad_norm > 0.0);
//! # Ok(())
//! # }
//! ```

pub mod adamw;
pub mod batches;
pub mod checkpoint;
pub mod distill;
pub mod distributed;
pub mod fit;
pub mod optim;
pub mod run_dir;
pub mod schedule;
pub mod session;
pub mod trainer;

pub use batches::Source;
pub use checkpoint::{Checkpoint, TrainState};
pub use fit::{fit, FitOptions, FitSummary};
pub use run_dir::{LoadedRun, RunDir};
pub use session::SessionOptions;
pub use trainer::{GradSync, StepStats, Trainer};
