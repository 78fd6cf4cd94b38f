//! The VDE backend against a real vde_switch (Debian's vde2). Skipped with a loud message
//! when vde_switch is missing, unless CI is set: then missing it is a failure.

mod common;

use common::*;
use net_backends::vde::{Vde, VdeOptions, RETRY_INTERVAL};
use net_backends::NetBackend;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

/// vde_switch carries Ethernet frames up to 1514 bytes.
const VDE_SIZES: &[usize] = &[60, 1000, 1514];

fn have_vde_switch() -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("vde_switch").is_file()))
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("vde_switch is not installed (Debian package vde2; scripts/setup installs it)");
        }
        eprintln!();
        eprintln!("!!!!!!!!!! SKIPPED: vde_switch not found (apt-get install vde2) !!!!!!!!!!");
        eprintln!();
    }
    found
}

/// A vde_switch in the foreground on `dir`, killed (and its directory removed by the
/// test's TempDir) when dropped, also when the test fails.
struct Switch {
    child: Child,
    // Held open: vde_switch exits at EOF on its console (stdin).
    _stdin: ChildStdin,
}

impl Switch {
    fn start(dir: &Path) -> Switch {
        let mut child = Command::new("vde_switch")
            .arg("-s")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vde_switch");
        let stdin = child.stdin.take().unwrap();
        let sw = Switch {
            child,
            _stdin: stdin,
        };
        assert!(
            wait_switch(dir, Duration::from_secs(5)),
            "vde_switch does not listen on {}/ctl",
            dir.display()
        );
        sw
    }

    /// SIGTERM: the switch closes its ports and cleans up, as when an admin stops it.
    fn stop(mut self) {
        // SAFETY: kill() on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn open(dir: &Path, port: u32) -> Vde {
    Vde::open(&VdeOptions {
        sock: Some(dir.to_path_buf()),
        port,
        ..Default::default()
    })
    .unwrap()
}

fn private_dir(v: &Vde) -> PathBuf {
    v.data_path().parent().unwrap().to_path_buf()
}

#[test]
fn two_plugs_talk_through_a_switch_that_goes_away_and_comes_back() {
    if !have_vde_switch() {
        return;
    }
    let tmp = TempDir::new("vde");
    let dir = tmp.path().join("sw");
    let sw = Switch::start(&dir);
    let mut a = open(&dir, 0);
    let mut b = open(&dir, 7);
    assert_eq!(b.port(), 7, "port=7 asked for port 7");
    assert_ne!(a.port(), 0);
    assert!(a.link_up() && b.link_up());
    exchange_sizes(&mut a, &mut b, 1, VDE_SIZES);
    let pa = private_dir(&a);
    assert!(a.data_path().exists());

    // The switch goes away: link down on both, sends dropped and counted, nothing to spin on.
    assert_quiet(&mut a, Duration::from_millis(50));
    sw.stop();
    assert_ne!(
        turn(&mut a, true, false, Duration::from_secs(5)),
        0,
        "the switch leaving is an event"
    );
    assert!(!a.link_up(), "down at the event that told of it");
    assert!(
        wait_link(&mut [&mut a, &mut b], false, Duration::from_secs(5)),
        "link still up after the switch stopped"
    );
    for i in 0..3 {
        send(&mut a, &frame(1, 50 + i, 100));
    }
    assert_eq!(a.dropped(), 3);
    // Down, the only events are the retry timer's, once a second.
    assert_idle(&mut a, Duration::from_millis(500), Some(RETRY_INTERVAL));
    assert_idle(&mut b, Duration::from_millis(200), Some(RETRY_INTERVAL));
    // A SIGKILLed switch leaves its directory behind; a new one must still be found.
    let sw = Switch::start(&dir);
    assert!(
        wait_link(&mut [&mut a, &mut b], true, Duration::from_secs(5)),
        "no reconnection within 5 s of the switch's return"
    );
    exchange_sizes(&mut a, &mut b, 2, VDE_SIZES);

    // Killed hard this time (no cleanup by the switch).
    drop(sw);
    assert!(wait_link(&mut [&mut a], false, Duration::from_secs(5)));
    let d = b.dropped();
    let _ = wait_link(&mut [&mut b], false, Duration::from_secs(5));
    send(&mut b, &frame(2, 1, 60));
    assert_eq!(b.dropped(), d + 1);
    let _sw = Switch::start(&dir);
    assert!(wait_link(
        &mut [&mut a, &mut b],
        true,
        Duration::from_secs(5)
    ));
    exchange_sizes(&mut a, &mut b, 3, VDE_SIZES);

    drop(a);
    assert!(
        !pa.exists(),
        "the private socket directory is removed with the backend"
    );
}

#[test]
fn a_port_the_switch_does_not_have_is_an_error() {
    if !have_vde_switch() {
        return;
    }
    let tmp = TempDir::new("vde-port");
    let dir = tmp.path().join("sw");
    let _sw = Switch::start(&dir);
    // vde_switch has 32 ports by default. (A port already in use is not an error: VDE
    // lets several plugs share a port.)
    let e = Vde::open(&VdeOptions {
        sock: Some(dir.clone()),
        port: 1000,
        ..Default::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("port 1000"), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn mode_and_group_apply_to_the_socket_and_its_directory() {
    if !have_vde_switch() {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = TempDir::new("vde-mode");
    let dir = tmp.path().join("sw");
    let _sw = Switch::start(&dir);
    let v = Vde::open(&VdeOptions {
        sock: Some(dir.clone()),
        mode: 0o660,
        group: Some("0".into()),
        ..Default::default()
    })
    .unwrap();
    let m = std::fs::metadata(v.data_path()).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    assert_eq!(m.gid(), 0);
    let d = std::fs::metadata(private_dir(&v)).unwrap();
    assert_eq!(d.permissions().mode() & 0o777, 0o710);
}

/// A control socket that takes connections and never answers, as a hung switch would.
struct Mute {
    listener: std::os::unix::net::UnixListener,
    held: Vec<std::os::unix::net::UnixStream>,
}

impl Mute {
    fn bind(ctl: &Path) -> Mute {
        let _ = std::fs::remove_file(ctl);
        let listener = std::os::unix::net::UnixListener::bind(ctl).unwrap();
        listener.set_nonblocking(true).unwrap();
        Mute {
            listener,
            held: vec![],
        }
    }

    /// Connections taken so far (held open, unanswered).
    fn take(&mut self) -> usize {
        while let Ok((s, _)) = self.listener.accept() {
            self.held.push(s);
        }
        self.held.len()
    }
}

#[test]
fn reconnecting_to_a_switch_that_does_not_answer_never_blocks() {
    if !have_vde_switch() {
        return;
    }
    let tmp = TempDir::new("vde-mute");
    let dir = tmp.path().join("sw");
    let sw = Switch::start(&dir);
    let mut a = open(&dir, 0);
    drop(sw);
    assert!(wait_link(&mut [&mut a], false, Duration::from_secs(5)));
    // A hung switch at the same place: it accepts the control connection and says nothing.
    let ctl = dir.join("ctl");
    let mut mute = Mute::bind(&ctl);
    let t0 = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    while t0.elapsed() < Duration::from_millis(4500) {
        // Zero timeout: all the time a turn takes is the backend's own work in `ready`.
        let t = std::time::Instant::now();
        turn(&mut a, true, false, Duration::ZERO);
        slowest = slowest.max(t.elapsed());
        mute.take();
        std::thread::sleep(Duration::from_millis(20));
    }
    // A handshake that blocked would take its 2 s; under a second leaves room for a busy
    // host's preemption (wall time: a blocked read costs no CPU).
    assert!(
        slowest < Duration::from_millis(1000),
        "a backend event took {slowest:?}: the handshake blocked the loop"
    );
    assert!(!a.link_up());
    let tries = mute.take();
    assert!(
        (2..=4).contains(&tries),
        "{tries} handshakes in 4.5 s (one a second, each given 2 s to answer)"
    );
    drop(mute);
    std::fs::remove_file(&ctl).unwrap();
    // A real switch again: the link comes back.
    let _sw = Switch::start(&dir);
    let mut b = open(&dir, 0);
    assert!(wait_link(
        &mut [&mut a, &mut b],
        true,
        Duration::from_secs(5)
    ));
    exchange_sizes(&mut a, &mut b, 1, VDE_SIZES);
}

#[test]
fn a_switch_refusing_the_handshake_is_retried_quietly() {
    if !have_vde_switch() {
        return;
    }
    let tmp = TempDir::new("vde-refuse");
    let dir = tmp.path().join("sw");
    let sw = Switch::start(&dir);
    let mut a = open(&dir, 0);
    drop(sw);
    assert!(wait_link(&mut [&mut a], false, Duration::from_secs(5)));
    // Something that accepts and closes at once: each handshake fails with EOF.
    let ctl = dir.join("ctl");
    let mut mute = Mute::bind(&ctl);
    let t0 = std::time::Instant::now();
    let mut events = 0;
    while t0.elapsed() < Duration::from_millis(2500) {
        events += turn(&mut a, true, false, Duration::from_millis(50));
        mute.take();
        mute.held.clear();
    }
    assert!(!a.link_up());
    assert!(
        events <= 8,
        "{events} events in 2.5 s: a refused handshake must not spin"
    );
}
