//! Sweeps: train every configuration × seed of a comparison plan on the same data, tokens and
//! schedule, and report the results.
//!
//! * `plan.rs`: the plan file and its configurations, resolved into run configs.
//! * `run.rs`: training and evaluating one configuration × seed (resumable, never overwriting),
//!   and a run with its decay branches.
//! * `branch.rs`: a decay branch's run directory, made from its source's checkpoint.
//! * `report.rs`: the results table (results.md) and charts.
//!
//! The `lors-lm sweep` command (`cmd/sweep.rs`) drives them.

pub mod branch;
pub mod plan;
pub mod report;
pub mod run;
