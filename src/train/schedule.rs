//! The learning-rate schedule: linear warmup, then cosine decay to `min_lr`.

use crate::config::TrainConfig;

/// Learning rate at optimizer step `step` (1-based): linear warmup over `warmup_steps`, then
/// cosine decay from `lr` to `min_lr` at `max_steps`.
pub fn lr_at(step: usize, cfg: &TrainConfig) -> f64 {
    let (lr, min_lr, warm, max) = (cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps);
    if step <= warm {
        return lr * step as f64 / warm.max(1) as f64;
    }
    if step >= max {
        return min_lr;
    }
    let ratio = (step - warm) as f64 / (max - warm) as f64;
    min_lr + 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()) * (lr - min_lr)
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
}
