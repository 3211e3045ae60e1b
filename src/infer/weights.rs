//! Which weights an inference model keeps: merged (`W_shared + s·B_l A_l` folded per layer,
//! a vanilla model's cost) or factored (the shared bases and private factors as trained, the
//! unique parameters only), and the `--weights auto` rule that picks the faster one for a
//! model on this machine.
//!
//! ## The rule
//! Decoding a token is a pass over every weight (matrix-vector products), so its time is
//! about the weight bytes it reads divided by the bandwidth of wherever those bytes live.
//! Merged reads `R_m` bytes per step, all distinct (`D_m = R_m`: a vanilla model's weights);
//! factored reads a little more (`R_f = R_m` + the factors), but only `D_f` distinct bytes
//! (the unique parameters), read again and again: the bases of a group once per layer. Both
//! working sets repeat every token, so each stays in cache if it fits there. The predicted
//! step times are `R_m / BW(D_m)` and `R_f / BW(D_f)`, where `BW(S)` is the read bandwidth
//! of a working set of S bytes, measured on this machine by a child process
//! (`lors-lm probe-memory`, so its buffers never count in this process's peak RSS) at those
//! two sizes; sizes beyond twice the last-level cache (sysfs) are measured at that size, as
//! they read DRAM either way. `auto` takes factored when its predicted time is at most
//! [`FACTORED_MARGIN`] of merged's, else merged. docs/performance.md ("Inference") has the
//! measurements behind it.
//!
//! A vanilla model has nothing to share: `auto` takes merged, and `--weights factored` is
//! refused.

use crate::config::Mode;
use crate::device::{human_bytes, last_level_cache};
use crate::model::{Model, WeightBytes, Weights};
use anyhow::{bail, Context, Result};

/// `auto` takes factored when its predicted step time is at most this fraction of merged's:
/// a margin for what the bandwidth model leaves out (the factored form runs two more small
/// products per projection stack, and the probes are noisy), so that where auto picks
/// factored it is not slower than merged.
pub const FACTORED_MARGIN: f64 = 0.8;

/// `--weights`: auto, merged or factored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsChoice {
    Auto,
    Fixed(Weights),
}

impl WeightsChoice {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => WeightsChoice::Auto,
            "merged" => WeightsChoice::Fixed(Weights::Merged),
            "factored" => WeightsChoice::Fixed(Weights::Factored),
            other => bail!("--weights {other}: expected auto, merged or factored"),
        })
    }
}

/// What `auto` decided and why.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub choice: Weights,
    pub reason: String,
}

/// The rule on measured numbers: bytes of both forms and the read bandwidth (GB/s) at each
/// form's working set.
pub fn decide(m: WeightBytes, f: WeightBytes, bw_m: f64, bw_f: f64) -> Prediction {
    let t_m = m.read as f64 / (bw_m * 1e9);
    let t_f = f.read as f64 / (bw_f * 1e9);
    let choice = if t_f <= FACTORED_MARGIN * t_m { Weights::Factored } else { Weights::Merged };
    let reason = format!(
        "merged reads {} per step from a working set of {} ({bw_m:.1} GB/s there: {:.2} ms), factored {} from {} \
         ({bw_f:.1} GB/s: {:.2} ms); factored needs <= {FACTORED_MARGIN}x merged's time",
        human_bytes(m.read),
        human_bytes(m.distinct),
        t_m * 1e3,
        human_bytes(f.read),
        human_bytes(f.distinct),
        t_f * 1e3
    );
    Prediction { choice, reason }
}

/// `auto` for `model` (trainable, of sharing `mode`) on this machine, with `probe` measuring
/// read bandwidth (GB/s) at the given working-set sizes ([`probe_in_child`] in the binary).
pub fn predict_with(model: &Model, mode: Mode, probe: impl FnOnce(&[u64]) -> Result<Vec<f64>>) -> Result<Prediction> {
    if mode == Mode::Vanilla {
        return Ok(Prediction { choice: Weights::Merged, reason: "a vanilla model shares nothing".into() });
    }
    if !model.device().is_cpu() {
        let reason = "the rule is measured for the CPU only; merged elsewhere".into();
        return Ok(Prediction { choice: Weights::Merged, reason });
    }
    let (m, f) = (model.weight_bytes(Weights::Merged), model.weight_bytes(Weights::Factored));
    // Past twice the last-level cache, every size reads DRAM: measure there, not beyond.
    let cap = last_level_cache().map_or(1 << 30, |llc| 2 * llc);
    let bw = probe(&[m.distinct.min(cap), f.distinct.min(cap)])?;
    let [bw_m, bw_f] = bw[..] else { bail!("the bandwidth probe returned {} values, not 2", bw.len()) };
    Ok(decide(m, f, bw_m, bw_f))
}

/// [`predict_with`] probing in a child process of this binary (`lors-lm probe-memory`).
pub fn predict(model: &Model, mode: Mode) -> Result<Prediction> {
    predict_with(model, mode, probe_in_child)
}

/// Read bandwidth (GB/s) at each size, measured by `lors-lm probe-memory` in a child process
/// so that its buffers do not count in this process's peak RSS.
pub fn probe_in_child(sizes: &[u64]) -> Result<Vec<f64>> {
    let exe = std::env::current_exe().context("cannot find this program's executable")?;
    let list: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
    let out = std::process::Command::new(&exe)
        .args(["probe-memory", "--bytes", &list.join(",")])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {} probe-memory", exe.display()))?;
    if !out.status.success() {
        bail!("{} probe-memory failed ({})", exe.display(), out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("probe-memory printed {text:?}, not a list of GB/s"))
}

/// What the inference model will run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Token-by-token decoding (`generate`): memory-bound, the rule above decides.
    Decode,
    /// Whole windows per pass (`eval`): compute-bound, where merged does fewer multiply-adds
    /// (model/lors.rs), so `auto` takes merged.
    Windows,
}

/// Detach `model` for inference as `choice` says (consuming it, so that its training tensors
/// can be freed as it converts). Returns the model and a line saying which weights it keeps
/// and why. `mode` is the run's sharing; a vanilla run refuses `factored`.
pub fn prepare(model: Model, mode: Mode, choice: WeightsChoice, work: Workload) -> Result<(Model, String)> {
    let (w, why) = match choice {
        WeightsChoice::Fixed(Weights::Factored) if mode == Mode::Vanilla => bail!(
            "--weights factored: this is a vanilla model (lors.mode = \"vanilla\"): it has no shared bases or \
             low-rank factors to keep factored; use --weights merged (or auto)"
        ),
        WeightsChoice::Fixed(w) => (w, "as asked (--weights)".to_string()),
        WeightsChoice::Auto if work == Workload::Windows => (
            Weights::Merged,
            "auto: evaluation passes whole windows, compute-bound, where merged does fewer multiply-adds".into(),
        ),
        WeightsChoice::Auto => {
            let p = predict(&model, mode)?;
            (p.choice, format!("auto: {}", p.reason))
        }
    };
    let line = format!("weights: {} ({why})", w.name());
    Ok((model.into_weights(w)?, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(read: u64, distinct: u64) -> WeightBytes {
        WeightBytes { read, distinct }
    }

    #[test]
    fn factored_wins_only_where_its_working_set_reads_faster_enough() {
        let (m, f) = (bytes(300 << 20, 300 << 20), bytes(320 << 20, 40 << 20));
        // Merged from DRAM (6 GB/s), factored from cache (25 GB/s): factored.
        assert_eq!(decide(m, f, 6.0, 25.0).choice, Weights::Factored);
        // Both in cache: merged reads fewer bytes.
        assert_eq!(decide(m, f, 25.0, 25.0).choice, Weights::Merged);
        // Factored barely faster by the model: inside the margin, merged.
        assert_eq!(decide(m, f, 20.0, 23.0).choice, Weights::Merged);
        let p = decide(m, f, 6.0, 25.0);
        assert!(p.reason.contains("300 MiB") && p.reason.contains("40 MiB"), "{}", p.reason);
    }

    #[test]
    fn choices_parse() {
        assert_eq!(WeightsChoice::parse("auto").unwrap(), WeightsChoice::Auto);
        assert_eq!(WeightsChoice::parse("factored").unwrap(), WeightsChoice::Fixed(Weights::Factored));
        assert!(WeightsChoice::parse("both").is_err());
    }
}
