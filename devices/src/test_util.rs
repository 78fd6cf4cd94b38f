//! Helpers for the device tests: a guest-driven operation must finish, so a test that would
//! otherwise hang forever fails instead.

use std::sync::mpsc;
use std::time::Duration;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Runs `f` on its own thread and returns what it returns; panics when it has not finished
/// within five seconds (the device loops on guest state). The stuck thread is left behind,
/// spinning, until the test process exits.
pub fn finishes<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: did not finish within 5 s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

/// Guest RAM as host addresses (one mapping in the tests' memory).
pub fn host_range(mem: &GuestMemoryMmap) -> std::ops::Range<usize> {
    let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
    base..base + mem.iter().map(|r| r.len() as usize).sum::<usize>()
}

thread_local! {
    static LOUD_LINES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts the warning and error lines logged on the thread that logs them (tests run side
/// by side, each on its own thread).
struct LineCounter;

impl log::Log for LineCounter {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            LOUD_LINES.with(|n| n.set(n.get() + 1));
        }
    }
    fn flush(&self) {}
}

/// The warning and error lines `f` logs on this thread: what a user would see on stderr.
pub fn loud_lines(f: impl FnOnce()) -> usize {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // The tests' only logger; set once for the whole process.
        let _ = log::set_logger(&LineCounter);
        log::set_max_level(log::LevelFilter::Warn);
    });
    let before = LOUD_LINES.with(|n| n.get());
    f();
    LOUD_LINES.with(|n| n.get()) - before
}
