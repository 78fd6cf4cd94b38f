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
    // udhcpc resends after 1 s without an answer, which a slow guest can miss, and slirp
    // answers each (Discover, Offer, Discover, Offer, ...): the first of each kind in DHCP's
    // order, and the lease acknowledged last.
    let mut firsts: Vec<&str> = vec![];
    for k in &kinds {
        if !firsts.contains(k) {
            firsts.push(k);
        }
    }
    assert_eq!(firsts, ["Discover", "Offer", "Request", "ACK"], "{text}");
    assert_eq!(kinds.last(), Some(&"ACK"), "{text}");
}

/// What a scenario script printed: each line is `WHO: TEXT`; NICVM lines are parsed.
struct Script {
    out: String,
}

impl Script {
    /// Runs `scripts/scenarios/NAME` with this build's nicvm and the test guest image.
    fn run(name: &str, img: &Image, env: &[(&str, &str)]) -> Script {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap();
        let guest_dir = img.kernel.parent().expect("the guest image's directory");
        let tag = format!("{}{}", &name[..1], std::process::id());
        let out = std::process::Command::new("timeout")
            .arg("600")
            .arg(repo.join("scripts/scenarios").join(name))
            .env("NICVM", nicvm())
            .env("NICVM_GUEST_DIR", guest_dir)
            .env("NICVM_SCENARIO_TAG", &tag)
            .envs(env.iter().copied())
            .output()
            .expect("run the scenario script");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success(),
            "{name} failed ({}):\n{text}",
            out.status
        );
        // Nothing of the run's may remain.
        let left = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap();
        let left = String::from_utf8_lossy(&left.stdout);
        let procs = std::process::Command::new("pgrep")
            .args(["-af", &format!("nicvm-{tag}-")])
            .output()
            .unwrap();
        assert!(
            procs.stdout.is_empty(),
            "{name} left processes: {}",
            String::from_utf8_lossy(&procs.stdout)
        );
        assert!(
            !left.contains(&format!("nicvm-{tag}-")),
            "{name} left namespaces: {left}"
        );
        Script { out: text }
    }

    /// The fields of `WHO: NICVM-TAG ...` lines, in order.
    fn lines(&self, who: &str, tag: &str) -> Vec<std::collections::HashMap<String, String>> {
        let prefix = format!("{who}: NICVM-{tag}");
        self.out
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter(|rest| rest.is_empty() || rest.starts_with(' '))
            .map(fields)
            .collect()
    }

    fn line(&self, who: &str, tag: &str) -> std::collections::HashMap<String, String> {
        self.lines(who, tag)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no '{who}: NICVM-{tag}' line in:\n{}", self.out))
    }
}

#[test]
fn scenario_1_user_mode_nat_to_an_outside_service() {
    let Some(img) = image() else { return };
    let s = Script::run("1-user-nat", &img, &[]);
    let nic = s.line("guest", "NIC");
    assert_eq!(nic["lease"], "10.0.2.15/24", "{}", s.out);
    let sent = s.line("guest", "SENT");
    let recv = s.line("outside", "RECV");
    assert_eq!(sent["result"], "ok", "{}", s.out);
    assert_eq!(recv["bytes"], "1048576");
    assert_eq!(
        recv["fnv1a64"], sent["fnv1a64"],
        "the outside service got the guest's bytes"
    );
}

#[test]
fn scenario_2_tap_with_static_addresses() {
    let Some(img) = image() else { return };
    let s = Script::run("2-tap-static", &img, &[("NIC", "e1000")]);
    assert_eq!(s.line("guest", "NIC")["driver"], "e1000");
    assert_eq!(
        s.line("guest", "NIC")["lease"],
        "none",
        "no DHCP in this scenario"
    );
    assert_eq!(s.line("guest", "PING")["result"], "ok", "{}", s.out);
    assert!(
        s.out.contains("host: 3 received"),
        "host pings guest: {}",
        s.out
    );
    let recv = s.line("guest", "RECV");
    let sent = s.line("host", "SENT");
    assert_eq!(sent["result"], "ok", "{}", s.out);
    assert_eq!(recv["fnv1a64"], sent["fnv1a64"]);
}

#[test]
fn scenario_3_two_guests_on_a_bridge_with_host_nat() {
    let Some(img) = image() else { return };
    let s = Script::run("3-bridge-nat", &img, &[("NIC", "rtl8139")]);
    for (i, me) in [(1, "10.10.0.10"), (2, "10.10.0.11")] {
        let g = format!("guest{i}");
        assert_eq!(s.line(&g, "NIC")["lease"], format!("{me}/24"), "{}", s.out);
        let pings = s.lines(&g, "PING");
        assert_eq!(pings.len(), 2, "{}", s.out);
        assert!(
            pings.iter().all(|p| p["result"] == "ok"),
            "{g} reaches the other guest and, through NAT, the outside:\n{}",
            s.out
        );
        assert_eq!(
            s.line(&g, "ECHOED")["result"],
            "ok",
            "{g} was pinged by the other guest:\n{}",
            s.out
        );
    }
}

#[test]
fn scenario_4_guests_bridged_onto_the_lan() {
    let Some(img) = image() else { return };
    let s = Script::run("4-bridged-lan", &img, &[]);
    assert!(
        s.out.contains("host: after: 1 received"),
        "host keeps its address: {}",
        s.out
    );
    for g in ["guest1", "guest2"] {
        let lease = s.line(g, "NIC")["lease"].clone();
        assert!(
            lease.starts_with("192.168.50.1"),
            "{g} leased from the LAN: {lease}"
        );
        assert_eq!(s.line(g, "NIC")["router"], "192.168.50.1");
        let pings = s.lines(g, "PING");
        assert!(
            pings.len() == 2 && pings.iter().all(|p| p["result"] == "ok"),
            "{g} reaches the LAN's router and the host directly:\n{}",
            s.out
        );
    }
}

#[test]
fn scenario_5_two_guests_on_a_vde_switch() {
    let Some(img) = image() else { return };
    let s = Script::run("5-vde-switch", &img, &[]);
    for (i, me) in [(1, "10.20.0.10"), (2, "10.20.0.11")] {
        let g = format!("guest{i}");
        assert_eq!(s.line(&g, "NIC")["lease"], format!("{me}/24"), "{}", s.out);
        let pings = s.lines(&g, "PING");
        assert!(
            pings.len() == 2 && pings.iter().all(|p| p["result"] == "ok"),
            "{g} pings the other guest and the host over the switch:\n{}",
            s.out
        );
        assert_eq!(
            s.line(&g, "ECHOED")["result"],
            "ok",
            "{g} was pinged by the other guest:\n{}",
            s.out
        );
    }
}

/// The switch killed under a running guest, then restarted: nicvm stays up and quiet, the
/// guest sees the link go down and come back, and traffic flows again.
#[test]
fn vde_switch_killed_and_restarted_under_a_guest() {
    use support::net::*;
    let Some(img) = image() else { return };
    let ns = Netns::new("vdekill");
    let sw = VdeSwitch::start(&ns, "kill", "vde0");
    let host_side = "ip addr add 10.21.0.1/24 dev vde0 && ip link set vde0 up";
    ns.sh(host_side);
    let mut g = ns.guest(
        &img,
        "nicvm.dhcp=off nicvm.run=addr:eth0:10.21.0.2/24,ping:10.21.0.1,carrier:eth0,sleep:15,carrier:eth0,sleep:8,ping:10.21.0.1,carrier:eth0,exit",
        &[
            "-netdev",
            &format!("vde,id=v,sock={}", sw.sock().display()),
            "-device",
            "e1000,netdev=v",
        ],
        &[],
    );
    assert_eq!(g.wait_line("PING")["result"], "ok");
    assert_eq!(g.wait_line("CARRIER")["carrier"], "1");
    sw.kill();
    std::thread::sleep(std::time::Duration::from_secs(2));
    // A spin would show as most of a core on the I/O (or monitor) thread; the vCPU's time is
    // the guest's and not counted.
    let (cpu, threads) = g.host_cpu_share(std::time::Duration::from_secs(4));
    eprintln!("switch gone: {threads}");
    assert!(
        cpu < 0.2,
        "nicvm's own threads used {:.0}% of a core with its switch gone ({threads})",
        cpu * 100.0
    );
    assert_eq!(
        g.wait_line("CARRIER")["carrier"],
        "0",
        "the guest sees the link down"
    );
    sw.run();
    ns.sh(host_side);
    let ping = g.wait_line("PING");
    assert_eq!(ping["result"], "ok", "traffic flows again: {}", ping["_"]);
    assert_eq!(g.wait_line("CARRIER")["carrier"], "1");
    let o = g.finish();
    assert_eq!(o.code, Some(0), "{}", o.dump());
}
