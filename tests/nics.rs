//! Each emulated NIC with its stock Linux driver, end to end. One guest per model carries it
//! twice: eth0 on user-mode networking, eth1 on a tap in the test's own network namespace
//! (dnsmasq there). Both take leases; then 8 MiB cross the tap each way, byte-exact.

mod support;
use support::net::*;
use support::*;

/// Boots the guest with `device` (a -device string without netdev=) on both backends.
fn user_and_tap_then_8mib(device: &str, driver: &str, subnet: u8) {
    let Some(img) = image() else { return };
    let mut ns = Netns::new(&format!("nic{subnet}"));
    let host = format!("192.168.{subnet}.1");
    ns.sh(&format!(
        "ip tuntap add dev tap0 mode tap && ip addr add {host}/24 dev tap0 && ip link set tap0 up"
    ));
    let range = (
        format!("192.168.{subnet}.50"),
        format!("192.168.{subnet}.60"),
    );
    ns.dnsmasq("tap0", (&range.0, &range.1), &[]);
    let receiver = receive_from_guest(&ns, &host);
    let mut g = ns.guest(
        &img,
        &format!("nicvm.run=recv:5001,send:{host}:5002:8,exit"),
        &[
            "-netdev",
            "user,id=u",
            "-device",
            &format!("{device},netdev=u"),
            "-netdev",
            "tap,id=t,ifname=tap0,script=no,downscript=no",
            "-device",
            &format!("{device},netdev=t"),
        ],
        &[],
    );
    let user = g.wait_line("NIC");
    assert_eq!(user["iface"], "eth0");
    assert_eq!(user["driver"], driver);
    assert_eq!(user["mac"], "52:54:00:12:34:56");
    assert_eq!(user["lease"], "10.0.2.15/24", "lease from slirp's DHCP");
    assert_eq!(user["router"], "10.0.2.2");
    let tap = g.wait_line("NIC");
    assert_eq!(tap["iface"], "eth1");
    assert_eq!(tap["driver"], driver);
    assert_eq!(tap["mac"], "52:54:00:12:34:57");
    let lease = tap["lease"].clone();
    assert!(
        lease.starts_with(&format!("192.168.{subnet}.5")) && lease.ends_with("/24"),
        "lease from the test's dnsmasq: {lease}\ndnsmasq:\n{}console:\n{}",
        ns.dnsmasq_log(),
        g.console()
    );
    let ip = lease.trim_end_matches("/24").to_string();
    exchange_8mib(&ns, &mut g, &ip, receiver);
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());
}

#[test]
fn rtl8139_cplus_with_8139cp() {
    user_and_tap_then_8mib("rtl8139", "8139cp", 92);
}

#[test]
fn rtl8139_plain_with_8139too() {
    user_and_tap_then_8mib("rtl8139,cplus=off", "8139too", 93);
}

#[test]
fn e1000_with_e1000() {
    user_and_tap_then_8mib("e1000", "e1000", 94);
}

/// The receive filter as the guest programs it: frames for another station arrive only in
/// promiscuous mode, and a multicast group's frames arrive once the guest joins it.
#[test]
fn e1000_promiscuous_mode_and_multicast_join() {
    let Some(img) = image() else { return };
    let mut ns = Netns::new("filter");
    ns.sh("ip tuntap add dev tap0 mode tap && ip addr add 192.168.95.1/24 dev tap0 && ip link set tap0 up");
    // Frames to .77 leave with a MAC nobody on the segment has.
    ns.sh("ip neigh add 192.168.95.77 lladdr 52:54:00:99:99:99 dev tap0 nud permanent && ip route add 224.0.0.0/4 dev tap0");
    ns.dnsmasq("tap0", ("192.168.95.50", "192.168.95.60"), &[]);
    let mut g = ns.guest(
        &img,
        "nicvm.run=stat:eth0,sleep:5,stat:eth0,promisc:eth0,rxwait:eth0:40,stat:eth0,mcast:eth0:239.1.2.3:6000:20,exit",
        &[
            "-netdev",
            "tap,id=t,ifname=tap0,script=no,downscript=no",
            "-device",
            "e1000,netdev=t",
        ],
        &[],
    );
    let nic = g.wait_line("NIC");
    assert_eq!(nic["driver"], "e1000");
    assert!(nic["lease"].starts_with("192.168.95.5"), "{}", nic["_"]);
    let send = |to: &'static str, n: usize| {
        ns.within(move || {
            let s = std::net::UdpSocket::bind("192.168.95.1:0").unwrap();
            for i in 0..n {
                s.send_to(&[i as u8; 100], to).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };
    let count = |g: &mut Guest| -> u64 { g.wait_line("STAT")["rx_packets"].parse().unwrap() };
    let before = count(&mut g);
    send("192.168.95.77:7", 40);
    let filtered = count(&mut g);
    g.wait_line("PROMISC");
    send("192.168.95.77:7", 40);
    let promisc = count(&mut g);
    assert!(
        filtered - before < 40,
        "frames for another MAC must not reach a filtering NIC ({before} -> {filtered})"
    );
    assert!(
        promisc - filtered >= 40,
        "promiscuous mode lets them in ({filtered} -> {promisc})"
    );
    g.wait_line("MCASTLISTEN");
    send("239.1.2.3:6000", 20);
    let m = g.wait_line("MCAST");
    assert_eq!(m["result"], "ok", "{}", m["_"]);
    assert_eq!(m["datagrams"], "20");
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());
}

/// A -device NIC given no netdev=, as QEMU makes it: warned of ("nic NAME has no peer"), its
/// link up, what the guest sends dropped (each driver counts its frames sent, nicvm counts
/// them dropped), `info network` lists it without a peer line.
#[test]
fn a_nic_without_a_peer_as_in_qemu() {
    let Some(img) = image() else { return };
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Dir(std::env::temp_dir().join(format!("nicvm-nopeer.{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let (sock, stats) = (dir.0.join("hmp.sock"), dir.0.join("stats.json"));
    let monitor = format!("unix:{},server=on,wait=off", sock.display());
    // IGMP reports when each NIC joins a group and leaves it.
    let steps = "nicvm.dhcp=off nicvm.run=addr:eth0:10.9.9.2/24,addr:eth1:10.9.8.2/24,\
                 carrierwait:eth0:1,carrierwait:eth1:1,mcast:eth0:239.1.2.3:5000:0,\
                 mcast:eth1:239.1.2.3:5000:0,sleep:2,stat:eth0,stat:eth1,poweroff";
    let mut cmd = nicvm_cmd();
    cmd.args(boot_args(
        &img,
        steps,
        &[
            "-nic",
            "none",
            "-device",
            "e1000",
            "-device",
            "virtio-net-pci,id=v",
            "-monitor",
            &monitor,
        ],
    ))
    .env("NICVM_LOG", "warn")
    .env("NICVM_STATS", &stats);
    let mut g = Guest::spawn(cmd);

    let t0 = std::time::Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed().as_secs() < 60, "no monitor socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut r = std::io::BufReader::new(s);
    hmp_read(&mut r);
    assert_eq!(
        hmp(&mut r, "info network"),
        "e1000.0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:56\n\
         v: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:57\n"
    );
    drop(r);

    let mut drivers = vec![];
    for _ in 0..2 {
        let nic = g.wait_line("NIC");
        drivers.push(nic["driver"].clone());
    }
    drivers.sort();
    assert_eq!(drivers, ["e1000", "virtio_net"]);
    for _ in 0..2 {
        assert_eq!(g.wait_line("CARRIER")["carrier"], "1", "QEMU's link is up");
    }
    for _ in 0..2 {
        let stat = g.wait_line("STAT");
        let sent: u64 = stat["tx_packets"].parse().unwrap();
        assert!(sent >= 1, "the driver saw its frames go: {}", stat["_"]);
        assert_eq!(stat["rx_packets"], "0", "nothing arrives");
    }
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());
    for name in ["e1000.0", "v"] {
        let warning = format!("nicvm: warning: nic {name} has no peer\n");
        assert_eq!(o.stderr.matches(&warning).count(), 1, "{}", o.stderr);
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    for nic in json["nics"].as_array().unwrap() {
        assert_eq!(nic["backend"], "none", "{nic}");
        assert!(nic["netdev"].is_null(), "{nic}");
        assert!(nic["tx_frames"].as_u64().unwrap() >= 1, "{nic}");
        assert_eq!(nic["backend_dropped"], nic["tx_frames"], "{nic}");
        assert_eq!(nic["rx_frames"], 0, "{nic}");
    }
}
