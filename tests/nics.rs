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
        "lease from the test's dnsmasq: {lease}"
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
