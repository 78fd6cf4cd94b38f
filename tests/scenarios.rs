//! The classic KVM networking set-ups end to end, and packet capture. Every network piece a
//! test needs (namespaces standing in for the LAN, bridges, taps, DHCP servers) is made by
//! the test and removed with it.

mod support;
use support::*;

/// `-object filter-dump` on the default network: the guest's DHCP exchange, as tcpdump
/// reads it from the capture.
#[test]
fn filter_dump_captures_the_dhcp_exchange() {
    let Some(img) = image() else { return };
    let dir = std::env::temp_dir().join(format!("nicvm-capture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pcap = dir.join("dhcp.pcap");
    let o = boot(
        &img,
        "nicvm.run=exit",
        &[
            "-object",
            &format!("filter-dump,id=cap,netdev=net0,file={}", pcap.display()),
        ],
    );
    let tcpdump = std::process::Command::new("tcpdump")
        .args(["-n", "-v", "-r"])
        .arg(&pcap)
        .output()
        .expect("tcpdump (scripts/setup installs it)");
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(o.code, Some(0), "{}", o.dump());
    assert_eq!(
        o.line("NIC").unwrap()["lease"],
        "10.0.2.15/24",
        "{}",
        o.dump()
    );
    let text = String::from_utf8_lossy(&tcpdump.stdout);
    assert!(
        tcpdump.status.success(),
        "tcpdump: {}",
        String::from_utf8_lossy(&tcpdump.stderr)
    );
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("DHCP-Message (53), length 1: "))
        .collect();
    assert_eq!(kinds, ["Discover", "Offer", "Request", "ACK"], "{text}");
}
