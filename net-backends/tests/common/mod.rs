//! Helpers shared by the socket backend tests: frames, an event loop that does what the I/O
//! thread does (poll what `watch` lists, `ready`, then `recv`/`send`), temp directories.
#![allow(dead_code)]

use net_backends::{EventSet, NetBackend};
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "../../../tests/support/ports.rs"]
mod ports;
#[allow(unused_imports)] // not every test file takes a port
pub use ports::free_port;

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

/// One turn of the I/O thread over these backends, as devices' port does it: waits up to
/// `timeout` on every fd each lists in `watch(rx, tx)`, then calls `ready` for each fd that
/// reported. Returns the number of events per backend. A backend that still lists an fd
/// after `ready` was told it hung up or failed would make the port stop watching it: that
/// panics here.
pub fn turn_all(
    bs: &mut [&mut dyn NetBackend],
    rx: bool,
    tx: bool,
    timeout: Duration,
) -> Vec<usize> {
    let mut owner = vec![];
    let mut p = vec![];
    for (i, b) in bs.iter().enumerate() {
        let mut w = vec![];
        b.watch(rx, tx, &mut w);
        for (fd, ev) in w {
            owner.push(i);
            p.push(libc::pollfd {
                fd,
                events: ev.bits() as i16,
                revents: 0,
            });
        }
    }
    let ms = timeout.as_millis() as i32;
    // SAFETY: `p` is a valid array of p.len() pollfds for the duration of the call.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    let mut events = vec![0; bs.len()];
    if r <= 0 {
        return events;
    }
    for (pfd, &i) in p.iter().zip(&owner) {
        if pfd.revents == 0 {
            continue;
        }
        assert_eq!(
            pfd.revents & libc::POLLNVAL,
            0,
            "a watched fd ({}) is closed",
            pfd.fd
        );
        let set = EventSet::from_bits_truncate(pfd.revents as u16 as u32);
        events[i] += 1;
        bs[i].ready(pfd.fd, set);
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            let mut still = vec![];
            bs[i].watch(true, true, &mut still);
            assert!(
                !still.iter().any(|(f, _)| *f == pfd.fd),
                "fd {} reported {set:?} and is still watched: the port would give up on it",
                pfd.fd
            );
        }
    }
    events
}

/// [`turn_all`] for one backend; the number of events it had.
pub fn turn(b: &mut dyn NetBackend, rx: bool, tx: bool, timeout: Duration) -> usize {
    turn_all(&mut [b], rx, tx, timeout)[0]
}

/// Whether the backend holds a half-written frame (it watches for room of its own accord).
pub fn writing(b: &dyn NetBackend) -> bool {
    let mut w = vec![];
    b.watch(false, false, &mut w);
    b.link_up() && w.iter().any(|(_, e)| e.contains(EventSet::OUT))
}

/// Sends, waiting for room on WouldBlock (up to 5 s), and finishes the frame if the backend
/// could write only part of it.
pub fn send(b: &mut dyn NetBackend, f: &[u8]) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match b.send(&[IoSlice::new(f)]) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < end, "send stayed blocked for 5 s");
                turn(b, false, true, Duration::from_millis(100));
            }
            Err(e) => panic!("send: {e}"),
        }
    }
    while writing(b) {
        assert!(Instant::now() < end, "a frame stayed half-written for 5 s");
        turn(b, false, false, Duration::from_millis(100));
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
        turn(b, true, false, left.min(Duration::from_millis(100)));
    }
}

pub fn recv(b: &mut dyn NetBackend) -> Vec<u8> {
    recv_within(b, Duration::from_secs(5)).expect("no frame within 5 s")
}

/// Runs the backends' events (without reading frames) until every link is `up`, for up to
/// `timeout`.
pub fn wait_link(bs: &mut [&mut dyn NetBackend], up: bool, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if bs.iter().all(|b| b.link_up() == up) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        turn_all(bs, false, false, Duration::from_millis(20));
    }
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

/// Waits until the VDE switch on `dir` accepts connections on its control socket. The
/// socket file appears at `bind`, a moment before the switch's `listen`: a connection in
/// between is refused, so the file alone does not say the switch is up.
pub fn wait_switch(dir: &Path, timeout: Duration) -> bool {
    let ctl = dir.join("ctl");
    wait_for(timeout, || {
        std::os::unix::net::UnixStream::connect(&ctl).is_ok()
    })
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

/// Asserts the backend has nothing to say for `d`: no frame, and no event at all.
pub fn assert_quiet(b: &mut dyn NetBackend, d: Duration) {
    assert_idle(b, d, None);
}

/// Asserts the backend has no frame for `d`, and no event but its retry timer's when it
/// fires every `ticks`: at most two per period (the tick, and the failure of the connection
/// attempt it started).
pub fn assert_idle(b: &mut dyn NetBackend, d: Duration, ticks: Option<Duration>) {
    let mut buf = vec![0u8; net_backends::MAX_FRAME];
    // Whatever was queued before may be read once.
    while let Ok(Some(_)) = b.recv(&mut buf) {}
    let allowed = ticks.map_or(0, |t| 2 * (d.as_millis() / t.as_millis()) as usize + 2);
    let end = Instant::now() + d;
    let mut events = 0;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        events += turn(b, true, false, left);
        assert_eq!(
            b.recv(&mut buf).unwrap(),
            None,
            "a frame from an idle backend"
        );
    }
    assert!(
        events <= allowed,
        "{events} events in {d:?} from a backend with nothing to do (at most {allowed})"
    );
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
