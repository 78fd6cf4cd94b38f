//! Helpers shared by the socket backend tests: frames, waiting on fds, temp directories.
#![allow(dead_code)]

use net_backends::NetBackend;
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A broadcast frame from `src` (last MAC byte) with ethertype 0x88b5 and `len` bytes in
/// all, its payload numbered by `seq`.
pub fn frame(src: u8, seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, src]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(&seq.to_be_bytes());
    while f.len() < len {
        f.push((f.len() as u32).wrapping_mul(seq | 1) as u8);
    }
    f.truncate(len.max(18));
    f
}

pub fn poll_fd(fd: i32, events: i16, timeout: Duration) -> i16 {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, alive across the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    if r <= 0 {
        0
    } else {
        p.revents
    }
}

/// Sends, waiting for writability on WouldBlock (up to 5 s).
pub fn send(b: &mut dyn NetBackend, f: &[u8]) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match b.send(&[IoSlice::new(f)]) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < end, "send stayed blocked for 5 s");
                poll_fd(b.fd(), libc::POLLOUT, Duration::from_millis(100));
            }
            Err(e) => panic!("send: {e}"),
        }
    }
}

/// The next frame, waiting up to `timeout`.
pub fn recv_within(b: &mut dyn NetBackend, timeout: Duration) -> Option<Vec<u8>> {
    let end = Instant::now() + timeout;
    let mut buf = vec![0u8; net_backends::MAX_FRAME];
    loop {
        if let Some(n) = b.recv(&mut buf).expect("recv") {
            return Some(buf[..n].to_vec());
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        poll_fd(b.fd(), libc::POLLIN, left.min(Duration::from_millis(100)));
    }
}

pub fn recv(b: &mut dyn NetBackend) -> Vec<u8> {
    recv_within(b, Duration::from_secs(5)).expect("no frame within 5 s")
}

/// Waits up to `timeout` for `cond`.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Frames both ways between two backends, small and large.
pub fn exchange(a: &mut dyn NetBackend, b: &mut dyn NetBackend, round: u32) {
    exchange_sizes(a, b, round, &[60, 1514, 9000]);
}

/// Frames of these sizes both ways; a mismatch reports lengths, not bytes.
pub fn exchange_sizes(a: &mut dyn NetBackend, b: &mut dyn NetBackend, round: u32, sizes: &[usize]) {
    for (i, &len) in sizes.iter().enumerate() {
        let seq = round * 100 + i as u32;
        let f = frame(1, seq, len);
        send(a, &f);
        let g = recv(b);
        assert!(
            g == f,
            "a -> b: sent {len} bytes, got {} different ones",
            g.len()
        );
        let f = frame(2, seq, len);
        send(b, &f);
        let g = recv(a);
        assert!(
            g == f,
            "b -> a: sent {len} bytes, got {} different ones",
            g.len()
        );
    }
}

/// Asserts the backend's fd does not report readable for `d` (nothing to spin on).
pub fn assert_quiet(b: &mut dyn NetBackend, d: Duration) {
    let mut buf = vec![0u8; net_backends::MAX_FRAME];
    // Whatever was queued before may be read once.
    while let Ok(Some(_)) = b.recv(&mut buf) {}
    let r = poll_fd(b.fd(), libc::POLLIN, d);
    assert_eq!(r, 0, "the backend fd reports {r:#x} with nothing to read");
}

/// A directory removed with everything in it when dropped (also when a test fails).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "nicvm-test-{tag}.{}.{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
