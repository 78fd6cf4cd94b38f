//! VM-to-VM and VM-to-program networking without taps or root-only set-up: QEMU's stream
//! framing between two nicvm guests, and passt (a user-mode network stack) attached through
//! `-netdev stream` the way it attaches to QEMU.

mod support;
use support::net::*;
use support::*;

#[test]
fn passt_attaches_through_a_stream_socket() {
    let Some(img) = image() else { return };
    let mut ns = Netns::new("passt");
    // passt copies the address and route of the namespace's uplink to the guest over DHCP.
    ns.sh("ip link add up0 type veth peer name up1 && ip addr add 192.0.2.10/24 dev up0 && ip link set up0 up && ip link set up1 up && ip route add default via 192.0.2.1");
    let sock = std::env::temp_dir().join(format!("nicvm-passt-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    ns.spawn_kept(&["passt", "-f", "-4", "-1", "-s", &sock.display().to_string()]);
    let mut g = ns.guest(
        &img,
        "nicvm.run=exit",
        &[
            "-netdev",
            &format!(
                "stream,id=p,server=off,addr.type=unix,addr.path={},reconnect=1",
                sock.display()
            ),
            "-device",
            "rtl8139,netdev=p",
        ],
        &[],
    );
    let nic = g.wait_line("NIC");
    let o = g.finish();
    let _ = std::fs::remove_file(&sock);
    assert_eq!(
        nic["lease"],
        "192.0.2.10/24",
        "passt's DHCP answer: {}",
        o.dump()
    );
    assert_eq!(nic["router"], "192.0.2.1");
    assert_eq!(o.code, Some(0), "{}", o.dump());
}

#[test]
fn two_guests_over_a_stream_socket() {
    let Some(img) = image() else { return };
    let ns = Netns::new("stream");
    let sock = std::env::temp_dir().join(format!("nicvm-stream-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let path = sock.display().to_string();
    let server = format!("stream,id=s,server=on,addr.type=unix,addr.path={path}");
    let client = format!("stream,id=s,server=off,addr.type=unix,addr.path={path},reconnect=1");
    // The client takes its address 20 s late, so the server's first pings go unanswered:
    // the guest's ping step has to keep trying while its peer is still coming up.
    let mut guests: Vec<Guest> = [
        ("10.30.0.1", "10.30.0.2", server, "52:54:00:00:30:01", ""),
        (
            "10.30.0.2",
            "10.30.0.1",
            client,
            "52:54:00:00:30:02",
            "sleep:20,",
        ),
    ]
    .into_iter()
    .map(|(me, peer, netdev, mac, wait)| {
        ns.guest(
            &img,
            &format!("nicvm.dhcp=off nicvm.run={wait}addr:eth0:{me}/24,ping:{peer},echoed:1,exit"),
            &[
                "-netdev",
                &netdev,
                "-device",
                &format!("e1000,netdev=s,mac={mac}"),
            ],
            &[],
        )
    })
    .collect();
    for (i, g) in guests.iter_mut().enumerate() {
        let ping = g.wait_line("PING");
        assert_eq!(ping["result"], "ok", "guest {i}: {}", ping["_"]);
        let echoed = g.wait_line("ECHOED");
        assert_eq!(
            echoed["result"], "ok",
            "guest {i} was pinged: {}",
            echoed["_"]
        );
    }
    for g in guests {
        let o = g.finish();
        assert_eq!(o.code, Some(0), "{}", o.dump());
    }
    assert!(
        !sock.exists(),
        "the server's socket file is removed at exit"
    );
}
