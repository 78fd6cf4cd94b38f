//! Bad user input: one line naming the option, a non-zero exit, and no guest started.
//! These run without KVM or a guest image.

mod support;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;
use support::*;

fn expect_error(a: &[&str], option: &str) {
    let o = run(&args(a), Duration::from_secs(30));
    expect_error_in(a, &o, option);
}

fn expect_error_in(a: &[&str], o: &Outcome, option: &str) {
    assert_eq!(
        o.code,
        Some(1),
        "{a:?} should fail with status 1\n{}",
        o.dump()
    );
    // Nothing else: what set-up would have noted (a note on the host, an option accepted
    // with a note) is dropped when it fails.
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{a:?} should print one line\n{}", o.dump());
    assert!(
        lines[0].starts_with(&format!("nicvm: {option}")),
        "{a:?}: the error names {option}: {}",
        lines[0]
    );
    assert!(
        o.stdout.is_empty(),
        "no guest output for {a:?}\n{}",
        o.dump()
    );
}

fn kernel() -> String {
    // Any existing file gets past the -kernel check; the errors below come first or instead.
    std::env::current_exe().unwrap().display().to_string()
}

#[test]
fn an_argument_that_is_not_utf8() {
    use std::os::unix::ffi::OsStringExt;
    let o = nicvm_cmd()
        .arg("-name")
        .arg(std::ffi::OsString::from_vec(vec![b'v', 0xff, b'\n', b'm']))
        .args(["-kernel", &kernel()])
        .output()
        .expect("run nicvm");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("nicvm: -name: "), "{err}");
}

/// A huge bad value is still one line a terminal shows: the option, the key and the reason,
/// the value's middle left out.
#[test]
fn a_huge_bad_value_is_cut_in_its_line() {
    let k = kernel();
    let device = format!("virtio-net-pci,netdev=n,csum={}", "é".repeat(60_000));
    let a = ["-kernel", &k, "-netdev", "user,id=n", "-device", &device];
    let o = run(&args(&a), Duration::from_secs(30));
    expect_error_in(&a, &o, "-device virtio-net-pci: csum: 'éé");
    let line = o.stderr.trim_end();
    assert!(line.len() < 1000, "{} bytes", line.len());
    assert!(line.contains(" [... "), "{line}");
    assert!(line.ends_with("éé' is not on or off"), "{line}");
}

/// `-cpu host,+FEATURE,enforce` for a feature KVM cannot offer here (the other vendor's
/// virtualization): one line naming -cpu, before any guest runs (without `enforce` it is a
/// warning: cpu_features_switched_off_are_gone_from_the_guest).
#[test]
fn a_cpu_feature_that_is_not_there_with_enforce() {
    let Some(img) = image() else { return };
    let absent = feature_kvm_cannot_offer();
    let k = img.kernel.display().to_string();
    let cpu = format!("host,+{absent},enforce");
    let a = ["-kernel", &k, "-nic", "none", "-cpu", &cpu];
    let o = run(&args(&a), Duration::from_secs(60));
    expect_error_in(&a, &o, &format!("-cpu: '{absent}' is not there"));
    assert!(o.stderr.contains("(enforce)"), "{}", o.dump());
}

/// At the default log level too: the notes on options accepted with a note (and on the host)
/// are dropped when set-up fails, which then says why in its one line.
#[test]
fn a_failed_set_up_drops_its_notes() {
    let o = nicvm_cmd()
        .args([
            "-enable-kvm",
            "-cpu",
            "host",
            "-M",
            "q35",
            "-display",
            "none",
        ])
        .args(["-kernel", "/nonexistent/vmlinux"])
        .env_remove("NICVM_LOG")
        .output()
        .expect("run nicvm");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("nicvm: -kernel: "), "{err}");
}

/// Guest RAM the kernel does not fit in is an -m error, not a bad -kernel: the project's
/// kernels load at 16 MiB and need RAM up to about 29 MiB (vmlinux, its BSS included) or 32
/// MiB (the bzImage's decompressor, its init_size).
#[test]
fn too_little_ram_for_the_kernel() {
    let Some(img) = image() else { return };
    for k in [&img.kernel, &img.bzimage] {
        let k = k.display().to_string();
        for m in ["16", "24"] {
            expect_error(&["-m", m, "-kernel", &k, "-nic", "none"], "-m: ");
        }
    }
}

/// An initramfs the bzImage's decompressor would unpack the kernel over (at 16-32 MiB here:
/// `pref_address` + `init_size`) is refused: it was placed there with `-m 40` and a 10 MiB
/// file, and the guest found garbage for its initramfs, then hung. A file whose size says
/// more than it holds (a sysfs file) is refused at set-up, not once the guest runs (with
/// `-daemonize`, the caller heard 0 and the VM died unseen).
#[test]
fn initramfs_placement_and_length_checked_before_the_guest_runs() {
    let Some(img) = image() else { return };
    let dir = std::env::temp_dir().join(format!("nicvm-rd-{}", std::process::id()));
    let rd = dir.with_extension("cpio");
    std::fs::write(&rd, vec![0u8; 10 << 20]).unwrap();
    let (bz, rdp) = (img.bzimage.display().to_string(), rd.display().to_string());
    let o = run(
        &args(&["-m", "40", "-kernel", &bz, "-initrd", &rdp, "-nic", "none"]),
        Duration::from_secs(30),
    );
    std::fs::remove_file(&rd).unwrap();
    expect_error_in(&["-m 40 bzImage 10 MiB initrd"], &o, "-initrd: ");
    assert!(o.stderr.contains("does not fit"), "{}", o.dump());
    let k = img.kernel.display().to_string();
    let a = [
        "-kernel",
        &k,
        "-initrd",
        "/sys/kernel/uevent_seqnum",
        "-nic",
        "none",
    ];
    let o = run(&args(&a), Duration::from_secs(30));
    expect_error_in(&a, &o, "-initrd: ");
    assert!(o.stderr.contains("shorter than its size"), "{}", o.dump());
}

/// A console socket that cannot be bound names where it was asked for.
#[test]
fn serial_socket_errors_name_the_address() {
    let Some(img) = image() else { return };
    let k = img.kernel.display().to_string();
    for (spec, at) in [
        (
            "unix:/nonexistent-dir/s,server=on,wait=off",
            "/nonexistent-dir/s",
        ),
        ("tcp:192.0.2.1:4444,server=on,wait=off", "192.0.2.1:4444"),
    ] {
        let a = ["-kernel", &k, "-nic", "none", "-serial", spec];
        let o = run(&args(&a), Duration::from_secs(30));
        expect_error_in(&a, &o, "-serial: ");
        assert!(
            o.stderr.contains(&format!("cannot listen on {at}: ")),
            "{}",
            o.dump()
        );
    }
}

#[test]
fn missing_kernel_file() {
    expect_error(&["-kernel", "/nonexistent/vmlinux"], "-kernel");
}

/// A path with a line break (a shell's $'...') still makes a one-line error.
#[test]
fn a_path_with_a_line_break_stays_on_one_line() {
    expect_error(&["-kernel", "/nonexistent/vm\nlinux"], "-kernel");
    let k = kernel();
    expect_error(
        &["-kernel", &k, "-serial", "file:/nonexistent/a\nb"],
        "-serial",
    );
}

/// The JSON form of an option (libvirt's): broken JSON, a value of the wrong kind, and the
/// options QEMU takes no JSON for are each said in one line.
#[test]
fn json_option_syntax_is_named() {
    let k = kernel();
    for (opt, val, said) in [
        ("-netdev", r#"{"type":"user","id":"n0""#, "JSON parse error"),
        (
            "-device",
            r#"{"driver":"e1000","mac":["x"]}"#,
            "Invalid parameter type for 'mac'",
        ),
        (
            "-object",
            r#"{"qom-type":"filter-dump","id":"f","netdev":[]}"#,
            "'netdev'",
        ),
        (
            "-nic",
            r#"{"type":"user"}"#,
            "JSON form is taken by -netdev",
        ),
    ] {
        let o = run(&args(&["-kernel", &k, opt, val]), Duration::from_secs(30));
        expect_error_in(&[opt, "{json}"], &o, opt);
        assert!(o.stderr.contains(said), "{opt}: {}", o.stderr);
    }
}

#[test]
fn no_kernel_at_all() {
    expect_error(&["-m", "64"], "-kernel");
}

#[test]
fn unreadable_initrd() {
    let k = kernel();
    expect_error(
        &["-kernel", &k, "-initrd", "/nonexistent/initrd"],
        "-initrd",
    );
}

#[test]
fn kernel_that_is_not_a_kernel() {
    let junk = std::env::temp_dir().join(format!("nicvm-junk-{}", std::process::id()));
    std::fs::write(&junk, vec![0x42u8; 4096]).unwrap();
    let j = junk.display().to_string();
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        expect_error(&["-kernel", &j], "-kernel");
    }
    std::fs::remove_file(junk).unwrap();
}

#[test]
fn zero_memory() {
    let k = kernel();
    expect_error(&["-m", "0", "-kernel", &k], "-m");
}

#[test]
fn more_memory_than_the_host() {
    let k = kernel();
    expect_error(&["-m", "1T", "-kernel", &k], "-m");
}

#[test]
fn zero_cpus() {
    let k = kernel();
    expect_error(&["-smp", "0", "-kernel", &k], "-smp");
}

#[test]
fn unknown_option() {
    let k = kernel();
    expect_error(&["-kernel", &k, "-frobnicate"], "-frobnicate");
}

#[test]
fn malformed_netdev() {
    let k = kernel();
    expect_error(&["-kernel", &k, "-netdev", "user,id"], "-netdev");
    expect_error(
        &["-kernel", &k, "-netdev", "carrier-pigeon,id=n0"],
        "-netdev",
    );
    expect_error(&["-kernel", &k, "-netdev", "user"], "-netdev");
    expect_error(
        &["-kernel", &k, "-netdev", "user,id=a", "-netdev", "tap,id=a"],
        "-netdev",
    );
}

#[test]
fn help_and_version() {
    let o = run(&args(&["--help"]), Duration::from_secs(10));
    assert_eq!(o.code, Some(0));
    assert!(o.stdout.contains("-netdev TYPE,id=ID"));
    let o = run(&args(&["--version"]), Duration::from_secs(10));
    assert_eq!(o.code, Some(0));
    assert!(o.stdout.starts_with("nicvm "));
    assert!(o.stdout.contains("host: "), "{}", o.stdout);
}

/// A -netdev no NIC uses is checked all the same.
#[test]
fn unused_netdev_with_a_bad_option() {
    let k = kernel();
    expect_error(&["-kernel", &k, "-netdev", "user,id=n0,bogus=1"], "-netdev");
    expect_error(
        &["-kernel", &k, "-netdev", "socket,id=n0,listen=nope"],
        "-netdev socket,id=n0",
    );
}

/// A valid -netdev no NIC uses: QEMU's warning is a note of the set-up, dropped when it
/// fails (here at -kernel, without KVM): the error is the one line. (tests/qmp.rs sees the
/// warning on a set-up that succeeds.)
#[test]
fn unused_netdev_is_warned_about() {
    let o = run(
        &args(&[
            "-kernel",
            "/nonexistent/vmlinux",
            "-netdev",
            "user,id=n0",
            "-netdev",
            "tap,id=n1,ifname=unused0",
            "-netdev",
            "user,id=n2",
            "-device",
            "e1000,netdev=n2",
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(o.code, Some(1), "{}", o.dump());
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", o.dump());
    assert!(lines[0].starts_with("nicvm: -kernel: "), "{}", o.dump());
}

/// nicvm started with fd 5 open (on /dev/null), as a parent passing a tap would; 77 and 999,
/// which the tests name as not inherited, are closed whatever this process has open.
fn run_with_fd5(a: &[&str]) -> Outcome {
    use std::os::unix::process::CommandExt;
    let start = std::time::Instant::now();
    let mut sh = std::process::Command::new("sh");
    // SAFETY: only close(2), async-signal-safe, on the child's own descriptors.
    unsafe {
        sh.pre_exec(|| {
            libc::close(77);
            libc::close(999);
            Ok(())
        });
    }
    let o = sh
        .arg("-c")
        .arg("exec \"$0\" \"$@\" 5</dev/null")
        .arg(nicvm())
        .args(a)
        .env("NICVM_LOG", "warn")
        .env_remove("NICVM_TIMING")
        .env_remove("NICVM_STATS")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run nicvm");
    Outcome {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

#[test]
fn tap_fd_named_twice() {
    let k = kernel();
    let a = [
        "-kernel",
        &k,
        "-netdev",
        "tap,id=a,fd=5",
        "-netdev",
        "tap,id=b,fd=5",
        "-device",
        "e1000,netdev=a",
        "-device",
        "e1000,netdev=b",
    ];
    let o = run_with_fd5(&a);
    expect_error_in(
        &a,
        &o,
        "-netdev tap,id=b: fd: 5 is already used by -netdev tap,id=a",
    );
}

#[test]
fn tap_fd_not_inherited_or_nicvms_own() {
    for (fd, why) in [
        ("77", "77 is not a descriptor nicvm inherited"),
        ("999", "999 is not a descriptor nicvm inherited"),
        ("1", "1 is nicvm's stdout"),
        ("5x", "'5x' is not a number"),
    ] {
        netdev_a_with_fd5(&format!("tap,id=a,fd={fd}"), &format!("fd: {why}"));
    }
}

/// `-netdev NETDEV` (id `a`) for one e1000, with fd 5 open, fails with `-netdev tap,id=a: WHY`.
fn netdev_a_with_fd5(netdev: &str, why: &str) {
    let k = kernel();
    let a = [
        "-kernel",
        &k,
        "-netdev",
        netdev,
        "-device",
        "e1000,netdev=a",
    ];
    let o = run_with_fd5(&a);
    expect_error_in(&a, &o, &format!("-netdev tap,id=a: {why}"));
}

/// An inherited fd that is not a tap gets as far as opening, which refuses it (needs KVM:
/// the NICs are opened while the VM is built).
#[test]
fn tap_fd_that_is_not_a_tap() {
    if !kvm_usable() {
        return;
    }
    for key in ["fd", "fds"] {
        netdev_a_with_fd5(
            &format!("tap,id=a,{key}=5,script=no,downscript=no"),
            &format!("{key}=5: not an open tap file descriptor"),
        );
    }
}

/// QEMU's listings print what there is and exit 0, with no guest started.
#[test]
fn qemu_listings_exit_0() {
    for (a, expect) in [
        (&["-netdev", "help"][..], "Available netdev backend types:"),
        (&["-device", "help"][..], "name \"virtio-net-pci\""),
        (&["-device", "e1000,help"][..], "e1000 options:"),
        (&["-device", "rtl8139,?"][..], "cplus=<bool>"),
        (&["-nic", "model=help"][..], "Supported NIC models:"),
    ] {
        let o = run(&args(a), Duration::from_secs(30));
        assert_eq!(o.code, Some(0), "{a:?}\n{}", o.dump());
        assert!(o.stdout.contains(expect), "{a:?}\n{}", o.dump());
        assert!(o.stderr.is_empty(), "{a:?}\n{}", o.dump());
    }
}

/// Pasted options that contradict nicvm's machine: one line, naming the option, with why.
#[test]
fn qemu_options_that_contradict_the_machine() {
    let k = kernel();
    expect_error(&["-kernel", &k, "-machine", "microvm"], "-machine");
    expect_error(&["-kernel", &k, "-accel", "tcg"], "-accel");
    expect_error(&["-kernel", &k, "-cpu", "Skylake-Client"], "-cpu");
    expect_error(&["-kernel", &k, "-smp", "4,sockets=3"], "-smp");
    expect_error(
        &["-kernel", &k, "-netdev", "tap,id=t,queues=17"],
        "-netdev tap,id=t",
    );
    expect_error(
        &[
            "-kernel",
            &k,
            "-nic",
            "user,id=u",
            "-device",
            "e1000,netdev=x,vectors=3",
        ],
        "-device e1000",
    );
    expect_error(&["-kernel", &k, "-net", "nic", "-net", "dump"], "-net");
    expect_error(
        &["-kernel", &k, "-daemonize", "-serial", "stdio"],
        "-daemonize: the serial console cannot be stdio",
    );
}

/// -daemonize: a set-up error after the fork still reaches the caller's stderr and exit
/// status, and the pid file is gone.
#[test]
fn daemonize_reports_set_up_errors_to_the_caller() {
    if !kvm_usable() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("nicvm-daemon-test.{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("not-a-kernel");
    std::fs::write(&junk, vec![0x42u8; 4096]).unwrap();
    let pidfile = dir.join("pid");
    let a = [
        "-daemonize",
        "-display",
        "none",
        "-pidfile",
        pidfile.to_str().unwrap(),
        "-kernel",
        junk.to_str().unwrap(),
        "-nic",
        "none",
    ];
    expect_error(&a, "-kernel");
    assert!(!pidfile.exists(), "the pid file is removed");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A capture of a netdev no NIC uses is made all the same (as QEMU makes it): a file that
/// cannot be created is an error naming the capture (needs KVM: made while the VM is built).
#[test]
fn a_capture_nothing_feeds_is_still_checked() {
    if !kvm_usable() {
        return;
    }
    let k = kernel();
    let a = [
        "-kernel",
        &k,
        "-nic",
        "none",
        "-netdev",
        "user,id=u",
        "-object",
        "filter-dump,id=f,netdev=u,file=/nonexistent/u.pcap",
    ];
    let o = run(&args(&a), Duration::from_secs(30));
    expect_error_in(
        &a,
        &o,
        "-object filter-dump,id=f: cannot create /nonexistent/u.pcap",
    );
}

/// A capture file the set-up created is removed when a later NIC fails to open.
#[test]
fn no_capture_file_is_left_when_set_up_fails() {
    let k = kernel();
    let pcap = std::env::temp_dir().join(format!("nicvm-left.{}.pcap", std::process::id()));
    let a = [
        "-kernel",
        &k,
        "-nic",
        "user,id=u",
        "-object",
        &format!("filter-dump,id=f,netdev=u,file={}", pcap.display()),
        "-nic",
        "vde,sock=/nonexistent/vde.ctl",
    ];
    let o = run(&args(&a), Duration::from_secs(30));
    assert_eq!(o.code, Some(1), "{}", o.dump());
    assert!(
        !pcap.exists(),
        "{} left behind\n{}",
        pcap.display(),
        o.dump()
    );
}

#[test]
fn snapshot_options() {
    let k = kernel();
    expect_error(&["-kernel", &k, "-incoming", "tcp:0:4444"], "-incoming");
    expect_error(&["-incoming", "file:/nonexistent/guest.snap"], "-incoming");
    // An existing file that is not a snapshot.
    expect_error(&["-incoming", &format!("file:{k}")], "-incoming");
    expect_error(&["-kernel", &k, "-save-on", "console=x"], "-save-on");
    // Where the snapshot would go is checked before the guest boots, not after.
    expect_error(
        &[
            "-kernel",
            &k,
            "-save-on",
            "console=x,file=/nonexistent/dir/guest.snap",
        ],
        "-save-on",
    );
}

/// A FIFO made for the test, removed when dropped.
struct Fifo(std::path::PathBuf);

impl Fifo {
    fn new(name: &str) -> Fifo {
        let p = std::env::temp_dir().join(format!("nicvm-fifo-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        Fifo(p)
    }
    fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A FIFO where nicvm reads a whole file (kernel, initramfs, snapshot) is refused at once: an
/// open of it waited for a writer for ever, deaf to SIGTERM (exit signals are blocked
/// during set-up).
#[test]
fn a_fifo_to_read_whole_is_refused_at_once() {
    let f = Fifo::new("read");
    let k = kernel();
    for (a, option) in [
        (vec!["-kernel", &f.path()], "-kernel"),
        (vec!["-kernel", &k, "-initrd", &f.path()], "-initrd"),
        (
            vec!["-kernel", &k, "-incoming", &format!("file:{}", f.path())],
            "-incoming",
        ),
    ] {
        let o = run(&args(&a), Duration::from_secs(20));
        expect_error_in(&a, &o, option);
        assert!(o.stderr.contains("not a regular file"), "{}", o.dump());
    }
}

/// Waits until nicvm (`pid`) has blocked SIGTERM, as it does first thing: a signal before
/// that would kill it by default, which is not what the test is about.
fn wait_for_sigterm_blocked(pid: u32) {
    let t0 = std::time::Instant::now();
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or(0);
        if blocked & (1 << (libc::SIGTERM - 1)) != 0 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "SIGTERM never blocked"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A FIFO nicvm writes to (pid file, serial log) is waited for until its reader comes, as
/// under QEMU; SIGTERM meanwhile ends nicvm at once (it did nothing), with exit status 0 as
/// for a signal while the guest runs (1 for a -daemonize caller: no VM runs).
#[test]
fn a_fifo_to_write_waits_for_its_reader_but_not_through_sigterm() {
    let f = Fifo::new("pid");
    let k = kernel();
    for daemonize in [false, true] {
        let mut cmd = nicvm_cmd();
        cmd.args(["-kernel", &k, "-display", "none", "-pidfile", &f.path()]);
        if daemonize {
            cmd.arg("-daemonize");
        }
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = if daemonize {
            // The daemon is the child's child, in the FIFO wait: the one waiting on it.
            let t0 = std::time::Instant::now();
            loop {
                let kids =
                    std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
                        .unwrap_or_default();
                if let Some(p) = kids.split_whitespace().next() {
                    break p.parse().unwrap();
                }
                assert!(t0.elapsed() < Duration::from_secs(10), "no daemon");
                std::thread::sleep(Duration::from_millis(10));
            }
        } else {
            child.id()
        };
        wait_for_sigterm_blocked(pid);
        // Still waiting for the FIFO's reader.
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill with a pid we spawned (or its child) and a signal number.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
        let t0 = std::time::Instant::now();
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(t0.elapsed() < Duration::from_secs(5), "{err}");
        assert_eq!(o.status.code(), Some(daemonize as i32), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("nicvm: terminating on SIGTERM during set-up (-pidfile: "),
            "{err}"
        );
    }
    if !kvm() {
        return;
    }
    // A reader comes: nicvm goes on (here to the next error: -kernel is not a kernel).
    let f = Fifo::new("serial");
    let serial = format!("file:{}", f.path());
    let mut child = nicvm_cmd()
        .args(["-kernel", &k, "-serial", &serial, "-display", "none"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "waiting for the FIFO's reader"
    );
    // The reader, without waiting for a writer itself; it sees nicvm come and go.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&f.0)
        .unwrap();
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&reader),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, its count given.
    let n = unsafe { libc::poll(&mut pfd, 1, 20_000) };
    assert_eq!(n, 1, "nicvm opened the FIFO and closed it");
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.starts_with("nicvm: -kernel: "), "{err}");
}

/// As QEMU 7.2: `pretty=on` is for QMP; on a human monitor it is refused.
#[test]
fn pretty_on_a_human_monitor() {
    let k = kernel();
    let dir = std::env::temp_dir().join(format!("nicvm-pretty-{}", std::process::id()));
    let chardev = format!("socket,id=m,path={},server=on,wait=off", dir.display());
    let a = [
        "-kernel",
        &k,
        "-chardev",
        &chardev,
        "-mon",
        "chardev=m,pretty=on",
    ];
    let o = run(&args(&a), Duration::from_secs(20));
    expect_error_in(&a, &o, "-mon");
    assert!(o.stderr.contains("not compatible with HMP"), "{}", o.dump());
    assert!(!dir.exists(), "no socket made");
}
