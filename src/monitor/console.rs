//! Training console: a progress bar (step/max, ETA, loss, tokens/s) when stdout is a
//! terminal; plain, greppable log lines when it is not (CI, `| tee`); nothing but the final
//! summary and errors with `--quiet`.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub struct Console {
    quiet: bool,
    /// Print nothing at all, not even the summary (a data-parallel rank other than 0).
    off: bool,
    bar: Option<ProgressBar>,
}

impl Console {
    pub fn new(quiet: bool) -> Self {
        Self { quiet, off: false, bar: None }
    }

    /// A console that prints nothing.
    pub fn off() -> Self {
        Self { quiet: true, off: true, bar: None }
    }

    /// Start the progress bar (terminal only) for steps `start+1 ..= max`.
    pub fn start_progress(&mut self, start: usize, max: usize) {
        if self.quiet || !std::io::stdout().is_terminal() {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(max as u64), ProgressDrawTarget::stdout());
        bar.set_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} {pos:>6}/{len} [{elapsed_precise} < {eta_precise}] {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_position(start as u64);
        bar.reset_eta();
        self.bar = Some(bar);
    }

    /// A line of output (above the bar when there is one).
    pub fn line(&self, s: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(b) => b.println(s),
            None => println!("{s}"),
        }
    }

    /// Always printed, even with --quiet.
    pub fn summary(&self, s: &str) {
        if self.off {
            return;
        }
        match &self.bar {
            Some(b) => b.println(s),
            None => println!("{s}"),
        }
    }

    pub fn progress(&self, step: usize, loss: f64, tok_s: f64) {
        if let Some(b) = &self.bar {
            b.set_position(step as u64);
            b.set_message(format!("loss {loss:.4} | {tok_s:.0} tok/s"));
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.finish();
    }
}
