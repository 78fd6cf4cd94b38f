//! The VDE backend against a real vde_switch (Debian's vde2). Skipped with a loud message
//! when vde_switch is missing, unless CI is set: then missing it is a failure.

mod common;

use common::*;
use net_backends::vde::{Vde, VdeOptions};
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
            wait_for(Duration::from_secs(5), || dir.join("ctl").exists()),
            "vde_switch made no {}/ctl",
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
        poll_fd(a.fd(), libc::POLLIN, Duration::from_secs(5)),
        0,
        "a link change makes the fd readable once"
    );
    assert!(
        wait_for(Duration::from_secs(5), || !a.link_up() && !b.link_up()),
        "link still up after the switch stopped"
    );
    for i in 0..3 {
        send(&mut a, &frame(1, 50 + i, 100));
    }
    assert_eq!(a.dropped(), 3);
    assert_quiet(&mut a, Duration::from_millis(500));
    assert_quiet(&mut b, Duration::from_millis(200));
    // A SIGKILLed switch leaves its directory behind; a new one must still be found.
    let sw = Switch::start(&dir);
    assert!(
        wait_for(Duration::from_secs(5), || a.link_up() && b.link_up()),
        "no reconnection within 5 s of the switch's return"
    );
    exchange_sizes(&mut a, &mut b, 2, VDE_SIZES);

    // Killed hard this time (no cleanup by the switch).
    drop(sw);
    assert!(wait_for(Duration::from_secs(5), || !a.link_up()));
    let d = b.dropped();
    let _ = wait_for(Duration::from_secs(5), || !b.link_up());
    send(&mut b, &frame(2, 1, 60));
    assert_eq!(b.dropped(), d + 1);
    let _sw = Switch::start(&dir);
    assert!(wait_for(Duration::from_secs(5), || a.link_up() && b.link_up()));
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
    .unwrap();
    assert!(e.contains("port 1000"), "{e}");
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
