//! The process's memory allocator, chosen once, from the command line, before the process's
//! first allocation: mimalloc for `lors-lm prepare`, the system's (glibc malloc) for every
//! other command.
//!
//! `prepare` spends its time in the `tokenizers` crate, which makes and frees several small
//! strings per token on every core; under glibc's malloc a third of a `prepare` profile was
//! `malloc`/`free` and their arena locks and consolidation, and mimalloc encodes 1.5× faster
//! (docs/performance.md, "Preparing data"). Training is the other way round: it allocates
//! tensors of megabytes, and `device::tune_allocator` tunes glibc for them; under mimalloc a
//! bench-medium step took 1.2× as long. So each command gets the allocator that suits it.
//!
//! `LORS_LM_ALLOC=system` or `=mimalloc` overrides the choice (to measure one against the
//! other).
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

use mimalloc::MiMalloc;

const UNDECIDED: u8 = 0;
const SYSTEM: u8 = 1;
const MIMALLOC: u8 = 2;

/// The allocator serving this process, decided at its first allocation ([`choice`]).
static CHOICE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// The global allocator of the `lors-lm` binary (`src/main.rs`): forwards every call to the
/// allocator [`choice`] picks.
pub struct PerCommand;

impl PerCommand {
    pub const fn new() -> PerCommand {
        PerCommand
    }
}

#[inline]
fn choice() -> u8 {
    let c = CHOICE.load(Ordering::Relaxed);
    if c != UNDECIDED {
        return c;
    }
    // The first allocation decides, on the main thread before any other exists; were two to
    // race, both would read the same command line and environment and decide the same.
    let c = if use_mimalloc() { MIMALLOC } else { SYSTEM };
    CHOICE.store(c, Ordering::Relaxed);
    c
}

impl Default for PerCommand {
    fn default() -> Self {
        PerCommand::new()
    }
}

// SAFETY: every call is forwarded to one allocator, the same for the whole process (decided
// before the first allocation and never changed), so memory is always freed or resized by the
// allocator that gave it.
unsafe impl GlobalAlloc for PerCommand {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match choice() {
            MIMALLOC => MiMalloc.alloc(layout),
            _ => System.alloc(layout),
        }
    }
    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match choice() {
            MIMALLOC => MiMalloc.alloc_zeroed(layout),
            _ => System.alloc_zeroed(layout),
        }
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match choice() {
            MIMALLOC => MiMalloc.dealloc(ptr, layout),
            _ => System.dealloc(ptr, layout),
        }
    }
    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match choice() {
            MIMALLOC => MiMalloc.realloc(ptr, layout, new_size),
            _ => System.realloc(ptr, layout, new_size),
        }
    }
}

/// Under mimalloc, have every thread of rayon's pool and the calling thread return the memory
/// they hold free (`mi_collect`): pages freed by other threads than the one that allocated them
/// (prepare's documents: read on one thread, freed on another) are otherwise reclaimed lazily.
/// Nothing to do under the system allocator.
pub fn collect_all_threads() {
    if CHOICE.load(Ordering::Relaxed) != MIMALLOC {
        return;
    }
    // SAFETY: mi_collect only returns free memory of the calling thread's heap.
    rayon::broadcast(|_| unsafe { libmimalloc_sys::mi_collect(false) });
    unsafe { libmimalloc_sys::mi_collect(false) };
}

/// Whether this process should use mimalloc: `LORS_LM_ALLOC` if set, else whether its
/// command is `prepare`. Runs inside the first allocation, so it allocates nothing: the
/// environment through `getenv`, the command line from `/proc/self/cmdline` into a stack buffer.
fn use_mimalloc() -> bool {
    // SAFETY: getenv returns a pointer into the environment or null; the environment is not
    // being modified (the first allocation happens before main's code runs anything else).
    let var = unsafe { libc::getenv(c"LORS_LM_ALLOC".as_ptr()) };
    if !var.is_null() {
        // SAFETY: a non-null getenv result is a NUL-terminated string.
        let value = unsafe { std::ffi::CStr::from_ptr(var) }.to_bytes();
        match value {
            b"mimalloc" => return true,
            b"system" => return false,
            _ => {}
        }
    }
    let mut buf = [0u8; 4096];
    read_cmdline(&mut buf).is_some_and(|args| command_of(args) == Some(b"prepare".as_slice()))
}

/// `/proc/self/cmdline` (NUL-separated arguments, truncated at the buffer's size) on Linux.
fn read_cmdline(buf: &mut [u8]) -> Option<&[u8]> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on a NUL-terminated path and a buffer of buf.len() bytes.
        unsafe {
            let fd = libc::open(c"/proc/self/cmdline".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return None;
            }
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            libc::close(fd);
            (n > 0).then(|| &buf[..n as usize])
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = buf;
        None
    }
}

/// The subcommand in a NUL-separated command line: the first argument after the program's
/// name that is not an option (nor empty: the command line ends with a NUL).
pub fn command_of(cmdline: &[u8]) -> Option<&[u8]> {
    cmdline.split(|&b| b == 0).skip(1).find(|a| !a.is_empty() && !a.starts_with(b"-"))
}

#[cfg(test)]
mod tests {
    use super::command_of;

    #[test]
    fn the_command_is_the_first_argument_that_is_not_an_option() {
        let c = |s: &str| command_of(s.as_bytes()).map(|a| String::from_utf8(a.to_vec()).unwrap());
        assert_eq!(c("/usr/bin/lors-lm\0prepare\0--input\0x\0").as_deref(), Some("prepare"));
        assert_eq!(c("lors-lm\0--verbose\0train\0--config\0prepare\0").as_deref(), Some("train"));
        assert_eq!(c("lors-lm\0").as_deref(), None);
        assert_eq!(c("lors-lm").as_deref(), None);
        assert_eq!(c("").as_deref(), None);
    }
}
