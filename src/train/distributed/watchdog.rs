//! The collective watchdog: no rank waits forever for a lost or hung peer.
//!
//! Every collective of a data-parallel run is armed (`Watchdog::arm`) while it runs. A
//! background thread checks once a second; when one has waited longer than the timeout
//! (`lors-lm train --collective-timeout`), it prints what was waiting and ends the process with
//! exit code 3, which makes the launcher end the job. Open MPI's `mpirun` (and `srun
//! --kill-on-bad-exit`) already end the job within a second or two when a rank dies; the
//! watchdog covers the rest: a rank that hangs (a stuck GPU, a stopped process), and launchers
//! that leave the survivors running (`srun` by default). Checkpoints are atomic, so the last
//! one is intact whenever this fires.

use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

/// What the watchdog does when a collective has waited too long (the message says what).
pub type OnTimeout = Box<dyn Fn(&str) + Send + Sync>;

struct Inner {
    /// The collective in progress: when it started and what it is.
    armed: Mutex<Option<(Instant, String)>>,
    timeout: Duration,
    on_timeout: OnTimeout,
}

/// A handle to the watchdog thread (clones share it; the thread ends with the last handle).
#[derive(Clone)]
pub struct Watchdog {
    inner: Arc<Inner>,
}

/// A collective in progress: disarms the watchdog when dropped.
pub struct Armed<'a> {
    watchdog: &'a Watchdog,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        *self.watchdog.inner.armed.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Watchdog {
    /// A watchdog that ends the process (exit code 3) after `timeout` in one collective.
    pub fn exiting(timeout: Duration) -> Self {
        Self::new(
            timeout,
            Box::new(|msg| {
                super::eprint_line(&format!(
                    "error: {msg}: a rank was lost or hangs; exiting so that the launcher ends the job \
                     (the last checkpoint is intact: continue with --resume)"
                ));
                // _exit, not exit: atexit handlers (MPI's among them) may block on the lost rank.
                // SAFETY: _exit ends the process at once; nothing runs after it.
                unsafe { libc::_exit(3) }
            }),
        )
    }

    /// A watchdog that calls `on_timeout` (once per collective that overstays `timeout`).
    pub fn new(timeout: Duration, on_timeout: OnTimeout) -> Self {
        let inner = Arc::new(Inner { armed: Mutex::new(None), timeout, on_timeout });
        let weak = Arc::downgrade(&inner);
        let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        thread::Builder::new()
            .name("lors-lm-watchdog".into())
            .spawn(move || watch(weak, tick))
            .map(|_| ())
            .unwrap_or_else(|e| eprintln!("warning: no collective watchdog ({e}): a hung rank may stall the run"));
        Self { inner }
    }

    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Watch `what` (e.g. "the gradient all-reduce of step 12") until the guard drops.
    pub fn arm(&self, what: impl Into<String>) -> Armed<'_> {
        *self.inner.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), what.into()));
        Armed { watchdog: self }
    }
}

fn watch(inner: Weak<Inner>, tick: Duration) {
    loop {
        thread::sleep(tick);
        let Some(inner) = inner.upgrade() else { return };
        let overdue = {
            let mut armed = inner.armed.lock().unwrap_or_else(|e| e.into_inner());
            match armed.as_ref() {
                Some((t0, what)) if t0.elapsed() > inner.timeout => {
                    let msg = format!("{what} has waited {:.0} s", t0.elapsed().as_secs_f64());
                    *armed = None;
                    Some(msg)
                }
                _ => None,
            }
        };
        if let Some(msg) = overdue {
            (inner.on_timeout)(&msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn fires_on_an_overdue_collective_only() {
        let fired = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = fired.clone();
        let dog = Watchdog::new(Duration::from_millis(150), Box::new(move |m| seen.lock().unwrap().push(m.into())));
        {
            let _quick = dog.arm("a quick all-reduce");
            thread::sleep(Duration::from_millis(30));
        }
        thread::sleep(Duration::from_millis(300)); // disarmed: nothing fires
        assert!(fired.lock().unwrap().is_empty());
        {
            let _slow = dog.arm("the gradient all-reduce of step 7");
            thread::sleep(Duration::from_millis(500));
        }
        let msgs = fired.lock().unwrap().clone();
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(msgs[0].starts_with("the gradient all-reduce of step 7 has waited"), "{msgs:?}");
    }

    #[test]
    fn the_thread_ends_with_the_last_handle() {
        let calls = Arc::new(AtomicUsize::new(0));
        let weak = {
            let c = calls.clone();
            let dog = Watchdog::new(Duration::from_millis(40), Box::new(move |_| _ = c.fetch_add(1, Ordering::SeqCst)));
            Arc::downgrade(&dog.inner)
        };
        thread::sleep(Duration::from_millis(100));
        assert!(weak.upgrade().is_none());
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
