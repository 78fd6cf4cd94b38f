//! `-netdev user` (libslirp) end to end: the lease, host port forwarding (TCP and UDP), the
//! guest reaching a host loopback service through the gateway, DNS through 10.0.2.3, net= and
//! dhcpstart=, restrict=on, guestfwd=, and the cost of an idle guest.

mod support;
use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::time::Duration;
use support::net::{own_share, Guest, Netns};
use support::*;

/// nicvm with a virtio-net NIC on `netdev`, whose `{port}` becomes a free loopback port
/// nicvm listens on for a `hostfwd=tcp:`; the guest and the port.
fn start(img: &Image, append: &str, netdev: &str) -> (Guest, u16) {
    Guest::spawn_on_free_port(|port| {
        command(img, append, &netdev.replace("{port}", &port.to_string()))
    })
}

fn command(img: &Image, append: &str, netdev: &str) -> std::process::Command {
    let mut cmd = nicvm_cmd();
    cmd.args(["-kernel", &img.kernel.display().to_string()])
        .args(["-initrd", &img.initrd.display().to_string()])
        .args(["-append", &format!("console=ttyS0 quiet {append}")])
        .args([
            "-nographic",
            "-netdev",
            netdev,
            "-device",
            "virtio-net-pci,netdev=n0",
        ])
        .env("NICVM_LOG", "warn");
    cmd
}

#[test]
fn lease_hostfwd_tcp_udp_host_loopback_and_idle_cost() {
    let Some(img) = image() else { return };
    let udp_port = free_port();
    let host_service = TcpListener::bind("127.0.0.1:0").unwrap();
    let service_port = host_service.local_addr().unwrap().port();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = host_service.accept().unwrap();
        let mut got = vec![];
        s.read_to_end(&mut got).unwrap();
        got
    });
    let netdev = format!(
        "user,id=n0,hostfwd=tcp:127.0.0.1:{{port}}-:5001,hostfwd=udp:127.0.0.1:{udp_port}-:5002"
    );
    let append =
        format!("nicvm.run=recv:5001,udpecho:5002:3,send:10.0.2.2:{service_port}:2,sleep:30,exit");
    let (mut g, tcp_port) = start(&img, &append, &netdev);

    let nic = g.wait_line("NIC");
    assert_eq!(nic["lease"], "10.0.2.15/24", "{}", nic["_"]);
    assert_eq!(nic["router"], "10.0.2.2");
    assert_eq!(nic["dns"], "10.0.2.3");

    // Host -> guest through the TCP forward.
    g.wait_line("LISTEN");
    let data = pseudo_random(2 << 20);
    g.receive_through(tcp_port, &data);

    // UDP forward: three datagrams echoed back, one at a time. Nothing is resent: the guest
    // echoes exactly three, and nothing on this path (loopback, slirp, an idle NIC) drops.
    g.wait_line("UDPLISTEN");
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    for i in 0..3 {
        let msg = format!("datagram {i}");
        u.send_to(msg.as_bytes(), ("127.0.0.1", udp_port)).unwrap();
        let mut b = [0u8; 64];
        let (n, _) = u.recv_from(&mut b).expect("UDP echo through hostfwd");
        assert_eq!(&b[..n], msg.as_bytes());
    }
    assert_eq!(g.wait_line("UDPECHO")["datagrams"], "3");

    // Guest -> a service on the host's loopback, through the gateway address.
    let sent = g.wait_line("SENT");
    assert_eq!(sent["result"], "ok", "{}", sent["_"]);
    let got = receiver.join().unwrap();
    assert_eq!(got.len(), 2 << 20);
    assert_eq!(fnv1a64(&got), sent["fnv1a64"]);

    // The guest now sleeps. nicvm's own threads (I/O, slirp, console) must be asleep too: a
    // busy-wait anywhere shows as a large share of a core. The vCPU's share is the idle guest's
    // timer ticks, which on an emulating host depends on the machine's load; it is printed, and
    // only bounded loosely (a vCPU loop that never sleeps would be most of a core).
    // The guest forks `sleep` after SENT, which takes a moment of emulated guest code first.
    std::thread::sleep(Duration::from_secs(6));
    let shares = g.thread_cpu_shares(Duration::from_secs(5));
    eprintln!("idle guest, share of a core per nicvm thread over 5 s: {shares:?}");
    let own = own_share(&shares);
    let all: f64 = shares.iter().map(|(_, s)| s).sum();
    assert!(
        own < 0.05,
        "nicvm's own threads busy while the guest idles: {shares:?}"
    );
    assert!(
        all < 0.3,
        "an idle guest costs {:.0}% of a core: {shares:?}",
        all * 100.0
    );
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());
}

#[test]
fn net_dhcpstart_restrict_and_guestfwd() {
    let Some(img) = image() else { return };
    let host_service = TcpListener::bind("127.0.0.1:0").unwrap();
    let service_port = host_service.local_addr().unwrap().port();
    let sink = std::env::temp_dir().join(format!("nicvm-guestfwd-{}", std::process::id()));
    // The command also says what it got from nicvm: its blocked signals (read by the shell's
    // builtins before it forks: dash empties its children's masks) and descriptors.
    let seen = sink.with_extension("seen");
    let netdev = format!(
        "user,id=n0,net=192.168.100.0/24,dhcpstart=192.168.100.50,restrict=on,hostfwd=tcp:127.0.0.1:{{port}}-:5001,\
         guestfwd=tcp:192.168.100.100:7000-cmd:/bin/sh -c 'while read -r k v; do [ \"$k\" = SigBlk: ] \
         && echo \"$k $v\"; done < /proc/$$/status > {seen}; \
         ls -l /proc/$$/fd >> {seen}; cat > {sink}'",
        seen = seen.display(),
        sink = sink.display()
    );
    let append = format!(
        "nicvm.run=recv:5001,send:192.168.100.100:7000:1,send:192.168.100.2:{service_port}:1,exit"
    );
    let (mut g, tcp_port) = start(&img, &append, &netdev);
    let nic = g.wait_line("NIC");
    assert_eq!(nic["lease"], "192.168.100.50/24", "{}", nic["_"]);
    // libslirp offers no router in restricted mode: there is nowhere to route to.
    assert_eq!(nic["router"], "", "{}", nic["_"]);
    // hostfwd still works with restrict=on.
    g.wait_line("LISTEN");
    let data = pseudo_random(64 << 10);
    g.receive_through(tcp_port, &data);
    // So does guestfwd: the guest's connection feeds a command on the host.
    let fwd = g.wait_line("SENT");
    assert_eq!(fwd["result"], "ok", "{}", fwd["_"]);
    let got = std::fs::read(&sink).unwrap_or_default();
    std::fs::remove_file(&sink).ok();
    assert_eq!(got.len(), 1 << 20);
    assert_eq!(fnv1a64(&got), fwd["fnv1a64"], "guestfwd data");
    // libslirp starts the command from the slirp thread, where nicvm blocks its exit
    // signals: the command must not keep them blocked (it could not be stopped), nor hold
    // nicvm's descriptors. libslirp (its child set-up empties the mask) and GLib's spawn
    // (it closes descriptors above 2) see to both today; this holds them to it.
    let said = std::fs::read_to_string(&seen).unwrap_or_default();
    std::fs::remove_file(&seen).ok();
    assert!(
        said.starts_with("SigBlk: 0000000000000000\n"),
        "the guestfwd command's blocked signals:\n{said}"
    );
    assert!(!said.contains("anon_inode"), "nicvm's descriptors:\n{said}");
    // ...but the guest cannot reach out.
    let sent = g.wait_line("SENT");
    assert_eq!(
        sent["result"], "fail",
        "restrict=on must block the guest: {}",
        sent["_"]
    );
    host_service.set_nonblocking(true).unwrap();
    assert!(
        host_service.accept().is_err(),
        "nothing reached the host service"
    );
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());
}

#[test]
fn dns_through_the_virtual_nameserver() {
    let Some(img) = image() else { return };
    // A namespace whose resolver is a dnsmasq this test starts (ip netns exec bind-mounts
    // /etc/netns/NAME/resolv.conf over /etc/resolv.conf for processes run in it).
    let mut ns = Netns::new("dns");
    let etc = format!("/etc/netns/{}", ns.name);
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(format!("{etc}/resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
    struct RmDir(String);
    impl Drop for RmDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _etc = RmDir(etc);
    ns.spawn_kept(&[
        "dnsmasq",
        "--no-daemon",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--address=/nicvm-test.example/192.0.2.7",
    ]);
    let mut g = ns.guest(
        &img,
        "nicvm.run=resolve:nicvm-test.example,exit",
        // The one-option form: -nic TYPE,model=MODEL; on q35 without defaults, where the NIC
        // is in PCI slot 1, as under QEMU (the slot 2 of pc without defaults is the
        // benchmark's, which uses -nodefaults).
        &[
            "-M",
            "q35",
            "-nodefaults",
            "-serial",
            "stdio",
            "-nic",
            "user,model=virtio-net-pci",
        ],
        &[],
    );
    assert_eq!(g.wait_line("NIC")["dns"], "10.0.2.3");
    let r = g.wait_line("RESOLVE");
    assert_eq!(r["addr"], "192.0.2.7", "{}", r["_"]);
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());
}

#[test]
fn bad_user_options_are_one_line_errors() {
    let Some(img) = image() else { return };
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    for (netdev, what) in [
        ("user,id=n0,hostfwd=tcp:2222:22".to_string(), "hostfwd"),
        (
            format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22"),
            "hostfwd",
        ),
        ("user,id=n0,net=10.0.2.7/24".to_string(), "net"),
        (
            "user,id=n0,net=192.168.5.0/24,dhcpstart=10.0.2.15".to_string(),
            "dhcpstart",
        ),
    ] {
        let o = run(
            &args(&[
                "-kernel",
                &img.kernel.display().to_string(),
                "-netdev",
                &netdev,
                "-device",
                "virtio-net-pci,netdev=n0",
            ]),
            Duration::from_secs(30),
        );
        assert_eq!(o.code, Some(1), "{netdev}\n{}", o.dump());
        assert_eq!(
            o.stderr.lines().count(),
            1,
            "one line: {netdev}\n{}",
            o.dump()
        );
        let line = o.stderr.lines().next().unwrap_or("");
        assert!(
            line.starts_with("nicvm: -netdev user,id=n0: ") && line.contains(what),
            "{netdev}: {line}"
        );
        assert!(o.stdout.is_empty());
    }
}

/// The harness's answer to a port something takes between its choice and nicvm's bind (once
/// in CI): nicvm says its hostfwd cannot listen, exits, and is started again on another port;
/// the taker's listener is never taken for nicvm's.
#[test]
fn a_port_taken_before_nicvm_binds_it_is_traded_for_another() {
    let Some(img) = image() else { return };
    let mut taker = None;
    let (mut g, port) = Guest::spawn_on_free_port(|port| {
        if taker.is_none() {
            // Taken between the choice and nicvm's bind, by a listener of its own.
            taker = Some((port, TcpListener::bind(("127.0.0.1", port)).unwrap()));
        }
        command(
            &img,
            "",
            &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:5001"),
        )
    });
    let (taken, _listener) = taker.unwrap();
    assert_ne!(port, taken);
    assert!(support::net::tcp_listener_of(g.pid(), port));
    assert!(!support::net::tcp_listener_of(g.pid(), taken));
    g.stop_for_stderr();
}

/// HMP's hostfwd_add and hostfwd_remove while the guest runs (QEMU's way to forward a port
/// chosen after boot): data crosses the new forward to the guest, `info usernet` lists it,
/// and once removed the port is closed; the errors are QEMU's.
#[test]
fn a_forward_added_and_removed_while_the_guest_runs() {
    use std::os::unix::net::UnixStream;
    let Some(img) = image() else { return };
    let dir = std::env::temp_dir().join(format!("nicvm-hostfwd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("hmp.sock");
    let mut cmd = command(&img, "nicvm.run=recv:5001,sleep:60,exit", "user,id=n0");
    cmd.args([
        "-monitor",
        &format!("unix:{},server=on,wait=off", sock.display()),
    ]);
    let mut g = Guest::spawn(cmd);
    assert_eq!(g.wait_line("NIC")["lease"], "10.0.2.15/24");
    g.wait_line("LISTEN");
    let s = UnixStream::connect(&sock).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = std::io::BufReader::new(s);
    hmp_read(&mut r);

    // A port picked now; another if something took it first (libslirp cannot bind it).
    let port = (0..5)
        .map(|_| free_port())
        .find(|port| {
            let out = hmp(
                &mut r,
                &format!("hostfwd_add n0 tcp:127.0.0.1:{port}-:5001"),
            );
            assert!(
                out.is_empty() || out.starts_with("Could not set up"),
                "{out}"
            );
            out.is_empty()
        })
        .expect("five free ports taken before nicvm bound them");
    let table = hmp(&mut r, "info usernet");
    assert!(
        table
            .lines()
            .any(|l| l.contains("TCP[HOST_FORWARD]") && l.contains(&format!(" {port} "))),
        "{table}"
    );
    let data = pseudo_random(1 << 20);
    g.receive_through(port, &data);

    let rule = format!("tcp:127.0.0.1:{port}");
    assert_eq!(
        hmp(&mut r, &format!("hostfwd_remove n0 {rule}")),
        format!("host forwarding rule for {rule} removed\n")
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    // Without a netdev id: the first user network, as QEMU.
    assert_eq!(
        hmp(&mut r, &format!("hostfwd_remove {rule}")),
        format!("host forwarding rule for {rule} not found\n")
    );
    assert_eq!(
        hmp(&mut r, "hostfwd_add nope tcp::1-:2"),
        "unrecognized netdev id 'nope'\n"
    );
    assert_eq!(
        hmp(&mut r, "hostfwd_add tcp:1-:2"),
        "Invalid host forwarding rule 'tcp:1-:2' (Bad host address)\n"
    );
    assert_eq!(
        hmp(&mut r, "hostfwd_remove"),
        "hostfwd_remove: string expected\nTry \"help hostfwd_remove\" for more information\n"
    );
    assert_eq!(hmp(&mut r, "hostfwd_remove tcp:x"), "invalid format\n");
    assert!(hmp(&mut r, "help").contains("hostfwd_add [netdev_id]"));
    r.get_mut().write_all(b"quit\n").unwrap();
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());
}
