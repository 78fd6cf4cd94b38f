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
