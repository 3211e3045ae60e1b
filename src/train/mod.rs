//! Training: the library API the commands build on.
//!
//! * `trainer.rs`: [`Trainer`] (new / resume / with_weights, `step`, `evaluate`, `save`), the
//!   one training step, with the hook where data-parallel training combines gradients.
//! * `fit.rs`: the loop around it (reports, evaluation, checkpoints, Ctrl-C).
//! * `session.rs`: a whole training run from a resolved config (`train` and `sweep` use it).
//! * `optim.rs` + `adamw.rs`: AdamW with per-parameter options, and its in-place CPU update.
//! * `schedule.rs`: the learning rate at each step.
//! * `batches.rs`: training and validation batches.
//! * `run_dir.rs` + `checkpoint.rs`: the run directory's layout and atomic checkpoints.

pub mod adamw;
pub mod batches;
pub mod checkpoint;
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
