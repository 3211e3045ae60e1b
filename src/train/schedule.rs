//! The learning-rate schedule: linear warmup, then cosine decay to `min_lr`, or
//! warmup-stable-decay (`train.schedule = "wsd"`): held at `lr`, then linear down to `min_lr`
//! over the last `decay_frac` of the steps.
//!
//! A wsd schedule is the same, step for step, for every run length until its decay starts: a
//! run of S steps and one of S' > S steps agree up to S − decay(S). So one long run's
//! stable phase serves every shorter budget: a *decay branch* continues the long run's
//! checkpoint at step S − decay(S) (weights, optimizer moments and data order) for its own
//! decay, and ends exactly where a fresh run of S steps would (`sweep`'s `branch_of`).

use crate::config::{Schedule, TrainConfig};

/// The last step of a wsd run's stable phase (decay: `TrainConfig::decay_steps`) (its decay's first step is the next one): where
/// a decay branch of `cfg` starts from a longer run.
pub fn decay_start(cfg: &TrainConfig) -> usize {
    cfg.max_steps - cfg.decay_steps()
}

/// Learning rate at optimizer step `step` (1-based): linear warmup over `warmup_steps`, then
/// cosine decay from `lr` to `min_lr` at `max_steps`, or (wsd) `lr` until [`decay_start`] and
/// linear down to `min_lr` at `max_steps`.
pub fn lr_at(step: usize, cfg: &TrainConfig) -> f64 {
    let (lr, min_lr, warm, max) = (cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps);
    if step <= warm {
        return lr * step as f64 / warm.max(1) as f64;
    }
    if step >= max {
        return min_lr;
    }
    match cfg.schedule {
        Schedule::Cosine => {
            let ratio = (step - warm) as f64 / (max - warm) as f64;
            min_lr + 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()) * (lr - min_lr)
        }
        Schedule::Wsd => {
            let start = decay_start(cfg);
            if step <= start {
                return lr;
            }
            lr - (lr - min_lr) * (step - start) as f64 / cfg.decay_steps() as f64
        }
    }
}

/// Whether two schedules give the same learning rate at every step 1..=`upto`: a run of
/// `branch` may continue a checkpoint of `from` at step `upto`.
pub fn same_until(from: &TrainConfig, branch: &TrainConfig, upto: usize) -> bool {
    (1..=upto).all(|s| lr_at(s, from) == lr_at(s, branch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_schedule_warms_up_then_decays_to_min() {
        let c = TrainConfig { lr: 1.0, min_lr: 0.1, warmup_steps: 10, max_steps: 110, ..Default::default() };
        assert!((lr_at(1, &c) - 0.1).abs() < 1e-12);
        assert!((lr_at(10, &c) - 1.0).abs() < 1e-12);
        assert!((lr_at(60, &c) - 0.55).abs() < 1e-12); // halfway down the cosine
        assert!((lr_at(110, &c) - 0.1).abs() < 1e-12);
        assert!(lr_at(30, &c) > lr_at(31, &c));
    }

    fn wsd(max_steps: usize) -> TrainConfig {
        TrainConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            max_steps,
            schedule: Schedule::Wsd,
            decay_frac: 0.2,
            ..Default::default()
        }
    }

    #[test]
    fn wsd_warms_up_holds_then_decays_linearly_to_min() {
        let c = wsd(110); // decay: the last 22 steps, 89..=110
        assert_eq!((c.decay_steps(), decay_start(&c)), (22, 88));
        assert!((lr_at(1, &c) - 0.1).abs() < 1e-12);
        assert!((lr_at(10, &c) - 1.0).abs() < 1e-12);
        for s in 10..=88 {
            assert_eq!(lr_at(s, &c), 1.0, "stable at step {s}");
        }
        assert!((lr_at(99, &c) - 0.55).abs() < 1e-12); // halfway down: 11 of 22 steps
        assert!((lr_at(110, &c) - 0.1).abs() < 1e-12);
        // Linear: equal steps down.
        let d: Vec<f64> = (89..=110).map(|s| lr_at(s - 1, &c) - lr_at(s, &c)).collect();
        assert!(d.iter().all(|x| (x - 0.9 / 22.0).abs() < 1e-12), "{d:?}");
    }

    #[test]
    fn shorter_wsd_runs_are_branches_of_longer_ones() {
        let long = wsd(1000);
        for short in [50, 100, 300, 800] {
            let s = wsd(short);
            let at = decay_start(&s);
            assert!(same_until(&long, &s, at), "{short}");
            // From the branch point on they differ: the branch decays, the long run holds.
            assert!(lr_at(at + 1, &s) < lr_at(at + 1, &long));
        }
        // A cosine run is no branch of anything longer.
        let cos = TrainConfig { schedule: Schedule::Cosine, ..wsd(100) };
        assert!(!same_until(&TrainConfig { schedule: Schedule::Cosine, ..long.clone() }, &cos, 80));
        assert!(!same_until(&long, &wsd(900), 1000));
    }
}
