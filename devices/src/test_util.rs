//! Helpers for the device tests: a guest-driven operation must finish, so a test that would
//! otherwise hang forever fails instead.

use std::sync::mpsc;
use std::time::Duration;

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
