//! Snapshots end to end: a guest booted once and saved just before it asks for a lease
//! (`-save-on`), then ten clones restored from that one file at once (`-incoming`), each with
//! its own user network, each leasing and receiving data byte-exact — for every NIC
//! personality; a guest saved after its lease on a tap (QMP `migrate`) that keeps working once
//! restored; and snapshot files that are damaged, cut short or for another machine refused
//! with one line before any guest runs.

mod support;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::net::{Guest, Netns};
use support::*;

const CLONES: usize = 10;
/// The guest prints this line just before it starts DHCP.
const BEFORE_DHCP: &str = "NICVM-DHCP start";

/// A directory for one test's snapshots, removed with everything in it at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("nicvm-snap-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Boots the guest with `device` on a user network and saves it before DHCP to `file`.
fn save_before_dhcp(img: &Image, device: &str, append: &str, file: &Path) -> Outcome {
    let save_on = format!("console={BEFORE_DHCP},file={}", file.display());
    boot(
        img,
        append,
        &[
            "-netdev",
            "user,id=n0",
            "-device",
            &format!("{device},netdev=n0"),
            "-save-on",
            &save_on,
        ],
    )
}

/// Restores `file` with `device` on a fresh user network forwarding host `port` to the
/// guest's 5001.
fn restore(img: &Image, device: &str, file: &Path, extra: &[&str]) -> (Guest, u16) {
    restore_captured(img, device, file, extra, None)
}

/// As [`restore`], writing what crosses the NIC to `pcap`.
fn restore_captured(
    img: &Image,
    device: &str,
    file: &Path,
    extra: &[&str],
    pcap: Option<&Path>,
) -> (Guest, u16) {
    Guest::spawn_on_free_port(|port| restore_command(img, device, file, port, extra, pcap))
}

fn restore_command(
    img: &Image,
    device: &str,
    file: &Path,
    port: u16,
    extra: &[&str],
    pcap: Option<&Path>,
) -> std::process::Command {
    let mut cmd = nicvm_cmd();
    // The kernel options are what a QEMU user passes again; a restored guest does not boot.
    cmd.args(["-kernel", &img.kernel.display().to_string()])
        .arg("-nographic")
        .args([
            "-netdev",
            &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:5001"),
        ])
        .args(["-device", &format!("{device},netdev=n0")])
        .args(["-incoming", &format!("file:{}", file.display())])
        .args(extra)
        .env("NICVM_LOG", "warn");
    if let Some(p) = pcap {
        cmd.args([
            "-object",
            &format!("filter-dump,id=f0,netdev=n0,file={}", p.display()),
        ]);
    }
    cmd
}

/// What each clone receives: the stream the tests use, different per clone.
fn clone_data(i: usize) -> Vec<u8> {
    let mut d = pseudo_random(256 << 10);
    for b in d.iter_mut() {
        *b ^= i as u8 + 1;
    }
    d
}

/// Saves a guest with `device` before DHCP, then restores ten clones of it at once: every one
/// must take its lease and receive its own 256 KiB byte-exact through its own hostfwd.
fn clones(device: &str, driver: &str) {
    let Some(img) = image() else { return };
    let dir = Scratch::new(&device.replace([',', '='], "-"));
    let file = dir.0.join("guest.snap");
    let t0 = Instant::now();
    // Ten guests asking at once on one slow CPU (hardware KVM nested under TCG) can each go
    // for seconds without running; a clone gives DHCP 30 s before it goes without a lease.
    let o = save_before_dhcp(
        &img,
        device,
        "nicvm.run=recv:5001,exit nicvm.dhcp_tries=30",
        &file,
    );
    let boot_secs = t0.elapsed().as_secs_f64();
    assert_eq!(o.code, Some(0), "{}", o.dump());
    assert!(o.stdout.contains(BEFORE_DHCP), "{}", o.dump());
    assert!(
        !o.stdout.contains("NICVM-NIC"),
        "the guest went on past the snapshot point:\n{}",
        o.dump()
    );
    assert!(o.stderr.contains("snapshot written"), "{}", o.dump());

    let t1 = Instant::now();
    let workers: Vec<_> = (0..CLONES)
        .map(|i| {
            let (img, device, file) = (img.clone(), device.to_string(), file.clone());
            let driver = driver.to_string();
            let pcap = dir.0.join(format!("clone-{i}.pcap"));
            std::thread::spawn(move || {
                let (mut g, port) = restore_captured(&img, &device, &file, &[], Some(&pcap));
                let nic = g.wait_line("NIC");
                assert_eq!(nic["driver"], driver, "clone {i}: {}", nic["_"]);
                if nic["lease"] != "10.0.2.15/24" {
                    let console = g.console_now();
                    let stderr = g.stop_for_stderr();
                    panic!(
                        "clone {i} took no lease: {}\n{console}\nstderr: {stderr}\nits \
                         frames:\n{}\nthe DHCP messages among them:\n{}",
                        nic["_"],
                        last_frames(&pcap, ""),
                        dhcp_messages(&pcap)
                    );
                }
                g.wait_line("LISTEN");
                let data = clone_data(i);
                let mut s = connect_retry(&format!("127.0.0.1:{port}"));
                s.write_all(&data).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let recv = g.wait_line("RECV");
                let o = g.finish();
                if recv["bytes"] != data.len().to_string() {
                    eprintln!(
                        "clone {i}: the last TCP frames it saw:\n{}",
                        last_frames(&pcap, "tcp")
                    );
                }
                assert_eq!(
                    recv["bytes"],
                    data.len().to_string(),
                    "clone {i}: {}",
                    o.dump()
                );
                assert_eq!(recv["fnv1a64"], fnv1a64(&data), "clone {i}: {}", o.dump());
                assert_eq!(o.code, Some(0), "clone {i}: {}", o.dump());
                // Nothing of a boot: the console starts where the snapshot stopped.
                assert!(!o.stdout.contains("NICVM-BOOT"), "clone {i}: {}", o.dump());
                nic["t"].parse::<f64>().unwrap_or(f64::NAN)
            })
        })
        .collect();
    let leased_at: Vec<f64> = workers
        .into_iter()
        .map(|w| w.join().expect("a clone failed"))
        .collect();
    eprintln!(
        "{device}: boot to snapshot {boot_secs:.1} s; {CLONES} clones restored, leased (guest \
         uptime {:.1}-{:.1} s) and received in {:.1} s",
        leased_at.iter().copied().fold(f64::INFINITY, f64::min),
        leased_at.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        t1.elapsed().as_secs_f64()
    );
}

#[test]
fn virtio_net_clones_lease_and_receive() {
    clones("virtio-net-pci", "virtio_net");
}

#[test]
fn e1000_clones_lease_and_receive() {
    clones("e1000", "e1000");
}

#[test]
fn rtl8139_cplus_clones_lease_and_receive() {
    clones("rtl8139", "8139cp");
}

#[test]
fn rtl8139_too_clones_lease_and_receive() {
    clones("rtl8139,cplus=off", "8139too");
}

/// The last frames of a capture that match `filter` (all when empty), as tcpdump shows them:
/// what ended a transfer early, or what DHCP saw.
fn last_frames(pcap: &Path, filter: &str) -> String {
    tcpdump_tail(pcap, &["-nn", "-e"], filter, 40, |_| true)
}

/// The type and transaction id of the last DHCP messages in `pcap` (a server that answers
/// every discover with an offer the client never takes reads differently from one that NAKs).
fn dhcp_messages(pcap: &Path) -> String {
    tcpdump_tail(pcap, &["-nn", "-vv"], "udp", 12, |l| {
        l.contains("DHCP-Message") || l.contains("xid")
    })
}

/// The last `keep` lines tcpdump prints with `flags` for what in `pcap` passes `filter`,
/// trimmed, of those `pick` keeps; or why tcpdump did not run.
fn tcpdump_tail(
    pcap: &Path,
    flags: &[&str],
    filter: &str,
    keep: usize,
    pick: impl Fn(&str) -> bool,
) -> String {
    let out = std::process::Command::new("tcpdump")
        .args(flags)
        .arg("-r")
        .arg(pcap)
        .args(filter.split_whitespace())
        .output();
    match out {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| pick(l)).collect();
            lines[lines.len().saturating_sub(keep)..].join("\n")
        }
        Err(e) => format!("(tcpdump: {e})"),
    }
}

/// nicvm run to restore `file` with `extra` options; must fail before the guest runs.
fn refused(img: &Image, file: &Path, extra: &[&str]) -> String {
    let mut a = args(&["-kernel", &img.kernel.display().to_string(), "-nographic"]);
    a.extend(args(extra));
    a.extend(args(&["-incoming", &format!("file:{}", file.display())]));
    let o = run(&a, Duration::from_secs(60));
    assert_eq!(o.code, Some(1), "{}", o.dump());
    assert!(!o.stdout.contains("NICVM"), "a guest ran: {}", o.dump());
    let errors: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(errors.len(), 1, "one line: {}", o.dump());
    errors[0].to_string()
}

#[test]
fn damaged_or_foreign_snapshots_are_refused_in_one_line() {
    let Some(img) = image() else { return };
    let dir = Scratch::new("refused");
    let file = dir.0.join("guest.snap");
    let o = save_before_dhcp(&img, "e1000", "nicvm.run=exit", &file);
    assert_eq!(o.code, Some(0), "{}", o.dump());
    let good = std::fs::read(&file).unwrap();
    let nic = ["-netdev", "user,id=n0", "-device", "e1000,netdev=n0"];

    // Another machine shape.
    for (options, want) in [
        (
            "-m 256 -netdev user,id=n0 -device e1000,netdev=n0",
            "saved with -m 128M, restoring with -m 256M",
        ),
        (
            "-cpu host,-pcid,-movbe -netdev user,id=n0 -device e1000,netdev=n0",
            "saved with -cpu host, restoring with -cpu host,-pcid,-movbe",
        ),
        (
            "-netdev user,id=n0 -device virtio-net-pci,netdev=n0",
            "saved with NICs [e1000 52:54:00:12:34:56 in slot 3]",
        ),
        (
            "-netdev user,id=n0 -device e1000,netdev=n0,mac=52:54:00:00:00:09",
            "restoring with [e1000 52:54:00:00:00:09",
        ),
    ] {
        let options: Vec<&str> = options.split(' ').collect();
        let e = refused(&img, &file, &options);
        assert!(e.contains(want), "{options:?}: {e}");
    }

    // Damage: a flipped bit in the state, a file cut short, not a snapshot at all.
    let bad = dir.0.join("bad.snap");
    let mut b = good.clone();
    b[4096 + 100] ^= 0x20;
    std::fs::write(&bad, &b).unwrap();
    let e = refused(&img, &bad, &nic);
    assert!(e.contains("damaged snapshot (state checksum)"), "{e}");
    std::fs::write(&bad, &good[..good.len() / 2]).unwrap();
    let e = refused(&img, &bad, &nic);
    assert!(e.contains("cut short"), "{e}");
    std::fs::write(&bad, b"#!/bin/sh\necho hello\n").unwrap();
    let e = refused(&img, &bad, &nic);
    assert!(e.contains("not a nicvm snapshot"), "{e}");

    // Another nicvm version's snapshot: its state is whole (the checksum fixed up), but says
    // who wrote it.
    let len = u64::from_le_bytes(good[12..20].try_into().unwrap()) as usize;
    let json = std::str::from_utf8(&good[4096..4096 + len]).unwrap();
    let ours = format!("\"nicvm\":\"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(json.contains(&ours), "{}", &json[..200.min(json.len())]);
    let other = json.replacen(&ours, "\"nicvm\":\"9.9.9\"", 1);
    assert_eq!(
        other.len(),
        json.len() + 5 - env!("CARGO_PKG_VERSION").len()
    );
    let mut b = good[..4096].to_vec();
    b[12..20].copy_from_slice(&(other.len() as u64).to_le_bytes());
    b[20..24].copy_from_slice(&crc32fast::hash(other.as_bytes()).to_le_bytes());
    let header_crc = crc32fast::hash(&b[0..40]);
    b[40..44].copy_from_slice(&header_crc.to_le_bytes());
    b.extend_from_slice(other.as_bytes());
    b.extend_from_slice(&good[4096 + len..]);
    std::fs::write(&bad, &b).unwrap();
    let e = refused(&img, &bad, &nic);
    assert!(e.contains("written by nicvm 9.9.9"), "{e}");

    // The good file restored with -S: paused, as QEMU says of a guest that ran before (not
    // prelaunch), until cont.
    let qmp = dir.0.join("qmp.sock");
    let qmp_opt = format!("unix:{},server=on,wait=off", qmp.display());
    let (g, _) = restore(&img, "e1000", &file, &["-S", "-qmp", &qmp_opt]);
    let mut c = qmp_connect(&qmp);
    let r = qmp_cmd(&mut c, r#"{"execute":"query-status"}"#);
    assert!(r.contains(r#""status":"paused""#), "{r}");
    qmp_cmd(&mut c, r#"{"execute":"quit"}"#);
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());
}

/// A two-vCPU guest with its lease from a DHCP server on a two-queue multiqueue tap
/// (virtio-net with mq=on: two queue pairs in use), saved with QMP (stop, migrate) and
/// restored on the same tap: it keeps its address, echoes 32 UDP flows (the tap spreads
/// them over both queues, so a pair that did not come back loses some), receives data
/// byte-exact and still has both pairs in use.
#[test]
fn saved_after_its_lease_on_a_multiqueue_tap_it_keeps_working() {
    let Some(img) = image() else { return };
    let dir = Scratch::new("tap");
    let file = dir.0.join("guest.snap");
    let mut ns = Netns::new("snap");
    ns.sh("ip tuntap add dev tap0 mode tap multi_queue && ip addr add 192.168.91.1/24 dev tap0 && ip link set tap0 up");
    ns.dnsmasq("tap0", ("192.168.91.50", "192.168.91.60"), &[]);
    let qmp = dir.0.join("qmp.sock");
    let tap = [
        "-smp",
        "2",
        "-netdev",
        "tap,id=n0,ifname=tap0,script=no,downscript=no,queues=2",
        "-device",
        "virtio-net-pci,netdev=n0,mq=on",
    ];
    let qmp_opt = format!("unix:{},server=on,wait=off", qmp.display());
    let mut extra = tap.to_vec();
    extra.extend(["-qmp", &qmp_opt]);
    let mut g = ns.guest(
        &img,
        "nicvm.run=udpecho:7777:32,recv:5001,queues:eth0,exit",
        &extra,
        &[],
    );
    let nic = g.wait_line("NIC");
    let ip = nic["lease"].trim_end_matches("/24").to_string();
    assert!(ip.starts_with("192.168.91.5"), "{}", nic["_"]);
    g.wait_line("UDPLISTEN");

    // Saved while it waits for datagrams.
    let mut c = qmp_connect(&qmp);
    qmp_cmd(&mut c, r#"{"execute":"stop"}"#);
    let r = qmp_cmd(
        &mut c,
        &format!(
            r#"{{"execute":"migrate","arguments":{{"uri":"file:{}"}}}}"#,
            file.display()
        ),
    );
    assert!(
        r.contains(r#""return": {}"#) || r.contains(r#""return":{}"#),
        "{r}"
    );
    let r = qmp_cmd(&mut c, r#"{"execute":"query-migrate"}"#);
    assert!(r.contains("completed"), "{r}");
    let r = qmp_cmd(&mut c, r#"{"execute":"query-status"}"#);
    assert!(r.contains("postmigrate"), "{r}");
    qmp_cmd(&mut c, r#"{"execute":"quit"}"#);
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());

    // The restored guest is the one that was listening: no new lease, no boot.
    let mut restore = vec!["-incoming".to_string(), format!("file:{}", file.display())];
    restore.extend(tap.iter().map(|a| a.to_string()));
    let restore: Vec<&str> = restore.iter().map(String::as_str).collect();
    let mut g = ns.guest(&img, "", &restore, &[]);
    // Datagrams sent before nicvm has the tap open again are dropped by the kernel (a tap
    // nobody holds has no carrier); the guest counts 32 and no more, so none is resent.
    let t0 = Instant::now();
    while ns.sh("ip link show tap0").contains("NO-CARRIER") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the tap never came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let to = format!("{ip}:7777");
    let echoed = ns.udp_flows(to, 32);
    assert_eq!(echoed, 32, "every datagram echoed by the restored guest");
    assert_eq!(g.wait_line("UDPECHO")["datagrams"], "32");
    g.wait_line("LISTEN");
    let data = clone_data(7);
    let dest = format!("{ip}:5001");
    let sent = ns.within(move || {
        let mut s = connect_retry(&dest);
        s.write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        data
    });
    let recv = g.wait_line("RECV");
    assert_eq!(recv["bytes"], sent.len().to_string());
    assert_eq!(recv["fnv1a64"], fnv1a64(&sent));
    g.wait_queue_pairs(2);
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());
    assert!(!o.stdout.contains("NICVM-NIC"), "{}", o.dump());
}

fn qmp_connect(path: &Path) -> std::io::BufReader<std::os::unix::net::UnixStream> {
    let start = Instant::now();
    let s = loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > Duration::from_secs(30) => panic!("QMP: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    // QMP's migrate writes the snapshot before it answers: tens of seconds on nested KVM.
    s.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut greeting = String::new();
    std::io::BufRead::read_line(&mut r, &mut greeting).unwrap();
    assert!(greeting.contains("QMP"), "{greeting}");
    qmp_cmd(&mut r, r#"{"execute":"qmp_capabilities"}"#);
    r
}

/// Sends one command; returns its answer (events before it are skipped).
fn qmp_cmd(r: &mut std::io::BufReader<std::os::unix::net::UnixStream>, cmd: &str) -> String {
    r.get_mut()
        .write_all(format!("{cmd}\n").as_bytes())
        .unwrap();
    loop {
        let mut line = String::new();
        std::io::BufRead::read_line(r, &mut line).unwrap();
        assert!(!line.is_empty(), "QMP closed");
        if !line.contains("\"event\"") {
            return line;
        }
    }
}

/// A guest with two vCPUs saved after its lease on a user network (while it listens) and
/// restored on a fresh one: it keeps its address, and a new hostfwd reaches it.
#[test]
fn saved_after_its_lease_on_user_networking_it_keeps_working() {
    let Some(img) = image() else { return };
    let dir = Scratch::new("user-leased");
    let file = dir.0.join("guest.snap");
    let save_on = format!("console=NICVM-LISTEN,file={}", file.display());
    let o = boot(
        &img,
        "nicvm.run=recv:5001,exit",
        &[
            "-smp",
            "2",
            "-netdev",
            "user,id=n0",
            "-device",
            "e1000,netdev=n0",
            "-save-on",
            &save_on,
        ],
    );
    assert_eq!(o.code, Some(0), "{}", o.dump());
    assert!(o.stdout.contains("lease=10.0.2.15/24"), "{}", o.dump());

    let (mut g, port) = restore(&img, "e1000", &file, &["-smp", "2"]);
    let data = clone_data(3);
    g.receive_through(port, &data);
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());
}

/// Waits (10 s at most) until process `pid` holds a lease.
fn wait_for_a_lease(pid: u32) {
    let t0 = Instant::now();
    while !holds_a_lease(pid) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rewrites `file` in place as `cp` over it would: truncated, then `len` other bytes.
fn rewrite_in_place(file: &Path, len: usize) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(file)
        .unwrap();
    f.write_all(&vec![0xa5; len]).unwrap();
}

/// Whether process `pid` holds a lease (`/proc/locks`).
fn holds_a_lease(pid: u32) -> bool {
    std::fs::read_to_string("/proc/locks").is_ok_and(|l| {
        l.lines().any(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.get(1) == Some(&"LEASE") && f.get(4) == Some(&pid.to_string().as_str())
        })
    })
}

/// The snapshot file rewritten in place (as `cp` over it does: truncated, then written)
/// while a guest restored from it runs: the guest runs on, on its own RAM. It ran on the
/// file's pages: the truncation took them away (nicvm died of SIGBUS, or KVM failed) and
/// the rewrite would have changed them.
#[test]
fn a_snapshot_rewritten_under_its_restored_guest_leaves_it_running() {
    let Some(img) = image() else { return };
    let dir = Scratch::new("rewritten");
    let file = dir.0.join("guest.snap");
    let o = save_before_dhcp(&img, "virtio-net-pci", "nicvm.run=recv:5001,exit", &file);
    assert_eq!(o.code, Some(0), "{}", o.dump());
    let len = std::fs::metadata(&file).unwrap().len() as usize;

    let (mut g, port) = restore(&img, "virtio-net-pci", &file, &[]);
    wait_for_a_lease(g.pid());
    rewrite_in_place(&file, len);
    let nic = g.wait_line("NIC");
    assert_eq!(nic["lease"], "10.0.2.15/24", "{}", nic["_"]);
    g.wait_line("LISTEN");
    g.receive_through(port, &clone_data(5));
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());
    assert!(
        o.stderr
            .contains("is being written to: guest RAM (128 MiB) copied out of it"),
        "{}",
        o.dump()
    );
}

/// The same while the restoring nicvm still sets up, waiting for its QMP client (`wait=on`):
/// RAM is copied out at once, not once the kernel's lease-break time (45 s) has run out and
/// the file is already rewritten; the guest then starts on its own RAM.
#[test]
fn a_snapshot_rewritten_while_its_restore_waits_is_copied_at_once() {
    let Some(img) = image() else { return };
    let dir = Scratch::new("rewritten-early");
    let file = dir.0.join("guest.snap");
    let qmp = dir.0.join("qmp.sock");
    let o = save_before_dhcp(&img, "virtio-net-pci", "nicvm.run=recv:5001,exit", &file);
    assert_eq!(o.code, Some(0), "{}", o.dump());
    let len = std::fs::metadata(&file).unwrap().len() as usize;

    let qmp_arg = format!("unix:{},server=on", qmp.display());
    let (mut g, port) = restore(&img, "virtio-net-pci", &file, &["-qmp", &qmp_arg]);
    wait_for_a_lease(g.pid());
    let t1 = Instant::now();
    rewrite_in_place(&file, len);
    let held = t1.elapsed();
    // Well under the kernel's 45 s: the rewrite itself and the RAM copy took 10.2 s on
    // hardware KVM nested under QEMU TCG, where memory is slow.
    assert!(held < Duration::from_secs(30), "the writer waited {held:?}");
    // The client the set-up waits for: the guest starts.
    let _client = std::os::unix::net::UnixStream::connect(&qmp).unwrap();
    let nic = g.wait_line("NIC");
    assert_eq!(nic["lease"], "10.0.2.15/24", "{}", nic["_"]);
    g.wait_line("LISTEN");
    g.receive_through(port, &clone_data(6));
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());
    assert!(o.stderr.contains("copied out of it"), "{}", o.dump());
}

/// Where no lease can be had (the file is open for writing elsewhere), a snapshot cut short
/// under its restored nicvm ends it with status 3 and a line saying why, not a bare SIGBUS
/// (the shell's "Bus error", exit 135). Here nicvm's own thread touches the pages (a save of
/// the guest, stopped since its restore, reads all of its RAM).
#[test]
fn a_snapshot_cut_short_without_a_lease_ends_nicvm_in_one_line() {
    let Some(img) = image() else { return };
    let dir = Scratch::new("cut-no-lease");
    let (file, qmp) = (dir.0.join("guest.snap"), dir.0.join("qmp.sock"));
    let o = save_before_dhcp(&img, "virtio-net-pci", "nicvm.run=recv:5001,exit", &file);
    assert_eq!(o.code, Some(0), "{}", o.dump());
    // Open for writing: no read lease can be taken on it.
    let writer = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
    let (g, _port) = restore(&img, "virtio-net-pci", &file, &["-S", "-qmp", &qmp_arg]);
    assert!(!holds_a_lease(g.pid()));
    writer.set_len(0).unwrap();
    // Best effort: on hardware KVM nicvm may have met the missing pages already (KVM's own
    // accesses end it through KVM_RUN's error, also one line and status 3). The connection
    // stays open until nicvm has ended.
    let out = dir.0.join("again.snap");
    let _qmp = std::os::unix::net::UnixStream::connect(&qmp)
        .ok()
        .map(|mut c| {
            let _ = c.write_all(
                format!(
                    "{{\"execute\":\"qmp_capabilities\"}}\n\
                 {{\"execute\":\"migrate\",\"arguments\":{{\"uri\":\"file:{}\"}}}}\n",
                    out.display()
                )
                .as_bytes(),
            );
            c
        });
    let o = g.finish();
    assert_eq!(o.code, Some(3), "{}", o.dump());
    assert!(o.stderr.contains("nicvm: error: "), "{}", o.dump());
}

/// Frames that reach a stopped guest (QMP `stop`, then traffic, then `migrate`) land in the
/// snapshot with their interrupt: the state of the vCPUs and the irqchip is read once the
/// devices are stopped, so the restored guest takes that interrupt and its NIC goes on
/// working (with the vCPU state read at `stop`, the IOAPIC waited for an EOI that never
/// came and the guest heard nothing more).
#[test]
fn traffic_while_stopped_is_in_the_snapshot() {
    let Some(img) = image() else { return };
    let dir = Scratch::new("stopped");
    let file = dir.0.join("guest.snap");
    let qmp = dir.0.join("qmp.sock");
    let qmp_opt = format!("unix:{},server=on,wait=off", qmp.display());
    let (mut g, port) = Guest::spawn_on_free_port(|port| {
        let netdev = format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:5001");
        let mut cmd = nicvm_cmd();
        cmd.args(["-kernel", &img.kernel.display().to_string()])
            .args(["-initrd", &img.initrd.display().to_string()])
            .args(["-append", "console=ttyS0 quiet nicvm.run=recv:5001,exit"])
            .args([
                "-nographic",
                "-netdev",
                &netdev,
                "-device",
                "e1000,netdev=n0",
            ])
            .args(["-qmp", &qmp_opt])
            .env("NICVM_LOG", "warn");
        cmd
    });
    g.wait_line("LISTEN");
    let mut c = qmp_connect(&qmp);
    qmp_cmd(&mut c, r#"{"execute":"stop"}"#);
    // A connection (its SYN, slirp's retries) reaches the stopped guest's e1000.
    let early = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let r = qmp_cmd(
        &mut c,
        &format!(
            r#"{{"execute":"migrate","arguments":{{"uri":"file:{}"}}}}"#,
            file.display()
        ),
    );
    assert!(r.contains("return"), "{r}");
    qmp_cmd(&mut c, r#"{"execute":"quit"}"#);
    drop(early);
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());

    let (mut g, port) = restore(&img, "e1000", &file, &[]);
    let data = clone_data(5);
    g.receive_through(port, &data);
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());
}

/// A harness that starts nicvm stopped (`-S`) and saves at once, before the vCPUs reached
/// their parking place: the save asked them for their state before they were there, they
/// missed it, and after 2 s `migrate` failed with "the vCPUs did not stop" (2 runs in 15
/// with one vCPU, 4 in 10 with eight, found by an outside trial).
#[test]
fn a_snapshot_asked_for_right_after_start_is_taken() {
    let Some(img) = image() else { return };
    let dir = Scratch::new("at-once");
    for round in 0..8 {
        let sock = dir.0.join(format!("qmp{round}.sock"));
        let file = dir.0.join(format!("snap{round}"));
        let mut a = boot_args(&img, "", &["-S", "-m", "64", "-smp", "8", "-nic", "none"]);
        a.extend(args(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock.display()),
        ]));
        let mut child = nicvm_cmd()
            .args(&a)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Connected the moment the socket is there.
        let start = Instant::now();
        let s = loop {
            match std::os::unix::net::UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > Duration::from_secs(30) => panic!("QMP: {e}"),
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        };
        // QMP's migrate writes the snapshot before it answers: tens of seconds on nested KVM.
        s.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut greeting = String::new();
        std::io::BufRead::read_line(&mut r, &mut greeting).unwrap();
        qmp_cmd(&mut r, r#"{"execute":"qmp_capabilities"}"#);
        qmp_cmd(&mut r, r#"{"execute":"stop"}"#);
        let cmd = format!(
            r#"{{"execute":"migrate","arguments":{{"uri":"file:{}"}}}}"#,
            file.display()
        );
        let answer = qmp_cmd(&mut r, &cmd);
        qmp_cmd(&mut r, r#"{"execute":"quit"}"#);
        let status = child.wait().unwrap();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
        assert!(
            answer.contains(r#""return""#),
            "round {round}: {answer}\n{err}"
        );
        assert_eq!(status.code(), Some(0), "{err}");
        assert!(file.exists());
    }
}
