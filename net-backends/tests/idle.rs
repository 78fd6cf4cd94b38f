//! Backends whose peer is gone must not burn CPU, nor wake the event loop more than their
//! retry timers ask, while they wait and retry. One test alone in its binary, so the
//! process's CPU time is theirs.

mod common;

use common::*;
use net_backends::stream::{StreamAddr, StreamBackend, StreamOptions};
use net_backends::vde::{Vde, VdeOptions, RETRY_INTERVAL};
use net_backends::NetBackend;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn cpu_time() -> Duration {
    // SAFETY: rusage is plain old data; getrusage fills it.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `r` is a valid rusage for the call to fill.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    let t = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    t(r.ru_utime) + t(r.ru_stime)
}

#[test]
fn peers_gone_cost_no_cpu() {
    let dir = TempDir::new("idle");
    // A server nobody connects to; a client retrying every 50 ms; a client whose server left.
    let mut s = StreamBackend::new(&StreamOptions {
        addr: StreamAddr::Unix(dir.path().join("s.sock")),
        server: true,
        reconnect: None,
    })
    .unwrap();
    let mut c = StreamBackend::new(&StreamOptions {
        addr: StreamAddr::Unix(dir.path().join("nobody.sock")),
        server: false,
        reconnect: Some(Duration::from_millis(50)),
    })
    .unwrap();
    let mut backends: Vec<Box<dyn NetBackend>> = vec![];
    // A VDE plug whose switch was killed, when vde_switch is there.
    let have_switch = Command::new("vde_switch")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    let mut sw = None;
    if have_switch {
        let swdir = dir.path().join("sw");
        let mut child = Command::new("vde_switch")
            .arg("-s")
            .arg(&swdir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(wait_switch(&swdir, Duration::from_secs(5)));
        let mut v = Vde::open(&VdeOptions {
            sock: Some(swdir),
            ..Default::default()
        })
        .unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(wait_link(&mut [&mut v], false, Duration::from_secs(5)));
        backends.push(Box::new(v));
        sw = Some(child);
    } else {
        eprintln!(
            "!!!!!!!!!! vde_switch not found: the VDE part of this test is skipped !!!!!!!!!!"
        );
    }
    assert!(!s.link_up() && !c.link_up());
    // The I/O thread's loop over all of them, for 1.5 s, frames wanted.
    let before = cpu_time();
    let t0 = Instant::now();
    let mut events = vec![0; 2 + backends.len()];
    while t0.elapsed() < Duration::from_millis(1500) {
        let mut all: Vec<&mut dyn NetBackend> = vec![&mut s, &mut c];
        all.extend(
            backends
                .iter_mut()
                .map(|b| b.as_mut() as &mut dyn NetBackend),
        );
        let left = Duration::from_millis(1500).saturating_sub(t0.elapsed());
        for (n, e) in events.iter_mut().zip(turn_all(&mut all, true, false, left)) {
            *n += e;
        }
    }
    let used = cpu_time() - before;
    assert!(
        used < Duration::from_millis(150),
        "{used:?} of CPU in 1.5 s of waiting"
    );
    assert_eq!(events[0], 0, "a server nobody connects to has no events");
    assert!(
        events[1] <= 1500 / 50 + 1,
        "{} events for a client retrying every 50 ms",
        events[1]
    );
    if let Some(n) = events.get(2) {
        assert!(
            *n <= 3,
            "{n} events in 1.5 s for a VDE plug retrying once a second"
        );
    }
    assert_quiet(&mut s, Duration::from_millis(10));
    for b in &mut backends {
        assert_idle(b.as_mut(), Duration::from_millis(10), Some(RETRY_INTERVAL));
    }
    drop(sw);
}
