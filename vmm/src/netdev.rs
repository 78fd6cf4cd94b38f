//! Turning `-netdev` specs into backends, with their set-up scripts and what must be undone
//! when nicvm exits.

use crate::cli::NetdevSpec;
use crate::keyval::KeyVal;
use net_backends::slirp::{GuestFwd, HostFwd, SlirpOptions};
use net_backends::tap::Tap;
use net_backends::NetBackend;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

static CLEANUPS: std::sync::Mutex<Vec<Cleanup>> = std::sync::Mutex::new(Vec::new());

/// Queues work for [`run_cleanups`].
pub fn on_exit(c: Cleanup) {
    CLEANUPS.lock().unwrap().push(c);
}

/// Undoes what set-up did, newest first. Called on every exit path.
pub fn run_cleanups() {
    let list = std::mem::take(&mut *CLEANUPS.lock().unwrap_or_else(|e| e.into_inner()));
    for c in list.into_iter().rev() {
        c.run();
    }
}

/// Something to undo at exit, on every exit path.
pub enum Cleanup {
    /// Run the tap's downscript with its interface name.
    DownScript { script: PathBuf, ifname: String },
}

impl Cleanup {
    pub fn run(self) {
        match self {
            Cleanup::DownScript { script, ifname } => {
                if let Err(e) = run_script(&script, &ifname) {
                    eprintln!("nicvm: downscript: {e}");
                }
            }
        }
    }
}

pub const DEFAULT_IFUP: &str = "/etc/nicvm-ifup";
pub const DEFAULT_IFDOWN: &str = "/etc/nicvm-ifdown";

fn run_script(script: &Path, ifname: &str) -> Result<(), String> {
    let status = Command::new(script)
        .arg(ifname)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !status.success() {
        return Err(format!("{} {ifname} failed ({status})", script.display()));
    }
    Ok(())
}

/// `script=`/`downscript=`: a path, `no`, or absent (the default file when it exists).
fn script_option(value: Option<&str>, default: &str) -> Option<PathBuf> {
    match value {
        Some("no") | Some("") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => Path::new(default).exists().then(|| PathBuf::from(default)),
    }
}

pub struct Opened {
    pub backend: Box<dyn NetBackend>,
    /// What to call it in messages (the tap's name, ...).
    pub label: String,
}

/// Opens the backend for `spec`. `want_vnet_hdr`: the frontend can use a virtio-net header.
pub fn open(spec: &NetdevSpec, want_vnet_hdr: bool) -> Result<Opened, String> {
    let opt = format!("-netdev {},id={}", spec.kind, spec.id);
    let e = |m: String| format!("{opt}: {m}");
    match spec.kind.as_str() {
        "tap" => {
            let o = &spec.opts;
            if let Some(k) = o.unknown_key(&["ifname", "fd", "script", "downscript", "vnet_hdr"]) {
                return Err(e(format!("unknown parameter '{k}'")));
            }
            let vnet = match o.get("vnet_hdr") {
                None => None,
                Some("on") => Some(true),
                Some("off") => Some(false),
                Some(v) => return Err(e(format!("vnet_hdr: '{v}' is not on or off"))),
            };
            let vnet = match vnet {
                Some(true) if !want_vnet_hdr => Some(false), // e1000/rtl8139 do offloads themselves
                None => Some(want_vnet_hdr),
                v => v,
            };
            let tap = match o.get("fd") {
                Some(fd) => {
                    if o.get("ifname").is_some() {
                        return Err(e("fd= and ifname= cannot be used together".into()));
                    }
                    let fd: i32 = fd
                        .parse()
                        .map_err(|_| e(format!("fd: '{fd}' is not a number")))?;
                    Tap::from_fd(fd).map_err(|x| e(x.to_string()))?
                }
                None => {
                    Tap::open(o.get("ifname").unwrap_or(""), vnet).map_err(|x| e(x.to_string()))?
                }
            };
            let name = tap.name().to_string();
            if let Some(up) = script_option(o.get("script"), DEFAULT_IFUP) {
                run_script(&up, &name).map_err(|m| e(format!("script: {m}")))?;
            }
            if let Some(down) = script_option(o.get("downscript"), DEFAULT_IFDOWN) {
                on_exit(Cleanup::DownScript {
                    script: down,
                    ifname: name.clone(),
                });
            }
            Ok(Opened {
                backend: Box::new(tap),
                label: name,
            })
        }
        "user" => {
            let opts = slirp_options(&spec.opts).map_err(e)?;
            let b = net_backends::slirp::SlirpBackend::new(opts).map_err(e)?;
            Ok(Opened {
                backend: Box::new(b),
                label: "user".into(),
            })
        }
        other => Err(e(format!(
            "the '{other}' backend is not available in this build of nicvm yet (tap is)"
        ))),
    }
}

/// `net=ADDR[/MASK]`: MASK a prefix length or dotted; without it, the address's class decides
/// (as QEMU does).
fn parse_net(v: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, m) = match v.split_once('/') {
        Some((a, m)) => (a, Some(m)),
        None => (v, None),
    };
    let addr: Ipv4Addr = a.parse().ok()?;
    let prefix = match m {
        None => match addr.octets()[0] {
            0..=127 => 8,
            128..=191 => 16,
            _ => 24,
        },
        Some(m) => match m.parse::<u8>() {
            Ok(p) if (1..=30).contains(&p) => p,
            Ok(_) => return None,
            Err(_) => {
                let mask = u32::from(m.parse::<Ipv4Addr>().ok()?);
                if mask.leading_ones() + mask.trailing_zeros() != 32
                    || !(1..=30).contains(&mask.leading_ones())
                {
                    return None;
                }
                mask.leading_ones() as u8
            }
        },
    };
    let host_bits = u32::from(addr) & !(u32::MAX << (32 - prefix));
    (host_bits == 0).then_some((addr, prefix))
}

pub fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("{key}: '{v}' is not on or off")),
    }
}

/// `-netdev user` options with QEMU's names, defaults and checks.
pub fn slirp_options(kv: &KeyVal) -> Result<SlirpOptions, String> {
    const KEYS: &[&str] = &[
        "net",
        "host",
        "dhcpstart",
        "dns",
        "hostname",
        "domainname",
        "dnssearch",
        "restrict",
        "hostfwd",
        "guestfwd",
        "tftp",
        "bootfile",
        "ipv4",
        "ipv6",
        "ipv6-net",
        "ipv6-prefix",
        "ipv6-prefixlen",
        "ipv6-host",
        "ipv6-dns",
    ];
    if let Some(k) = kv.unknown_key(KEYS) {
        return Err(format!("unknown parameter '{k}'"));
    }
    let mut o = SlirpOptions::default();
    let ip = |key: &str, v: &str| {
        v.parse::<Ipv4Addr>()
            .map_err(|_| format!("{key}: '{v}' is not an IPv4 address"))
    };
    let ip6 = |key: &str, v: &str| {
        v.parse::<Ipv6Addr>()
            .map_err(|_| format!("{key}: '{v}' is not an IPv6 address"))
    };
    if let Some(v) = kv.get("net") {
        let (net, prefix) = parse_net(v)
            .ok_or_else(|| format!("net: '{v}' is not a network (ADDR[/MASK], host bits zero)"))?;
        o.net = net;
        o.prefix = prefix;
        let base = u32::from(net);
        o.host = Ipv4Addr::from(base + 2);
        o.dns = Ipv4Addr::from(base + 3);
        o.dhcp_start = Ipv4Addr::from(base + 15);
    }
    for (key, slot) in [
        ("host", &mut o.host),
        ("dns", &mut o.dns),
        ("dhcpstart", &mut o.dhcp_start),
    ] {
        if let Some(v) = kv.get(key) {
            *slot = ip(key, v)?;
        }
    }
    for (key, a) in [
        ("host", o.host),
        ("dns", o.dns),
        ("dhcpstart", o.dhcp_start),
    ] {
        if !o.contains(a) {
            return Err(format!("{key}: {a} is outside net={}/{}", o.net, o.prefix));
        }
    }
    if let Some(v) = kv.get("restrict") {
        o.restrict = on_off("restrict", v)?;
    }
    if let Some(v) = kv.get("ipv4") {
        o.ipv4 = on_off("ipv4", v)?;
    }
    if let Some(v) = kv.get("ipv6") {
        o.ipv6 = on_off("ipv6", v)?;
    }
    if !o.ipv4 && !o.ipv6 {
        return Err("ipv4=off and ipv6=off leave nothing to do".into());
    }
    let v6net = kv.get("ipv6-net").or(kv.get("ipv6-prefix"));
    if let Some(v) = v6net {
        let (a, len) = match v.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (v, None),
        };
        o.ipv6_prefix = ip6("ipv6-net", a)?;
        if let Some(l) = len {
            o.ipv6_prefix_len = l
                .parse()
                .map_err(|_| format!("ipv6-net: '{v}' has a bad prefix length"))?;
        }
    }
    if let Some(v) = kv.get("ipv6-prefixlen") {
        o.ipv6_prefix_len = v
            .parse()
            .map_err(|_| format!("ipv6-prefixlen: '{v}' is not a number"))?;
    }
    if !(1..=126).contains(&o.ipv6_prefix_len) {
        return Err(format!(
            "ipv6-prefixlen: {} is out of range (1-126)",
            o.ipv6_prefix_len
        ));
    }
    if let Some(v) = kv.get("ipv6-host") {
        o.ipv6_host = ip6("ipv6-host", v)?;
    }
    if let Some(v) = kv.get("ipv6-dns") {
        o.ipv6_dns = ip6("ipv6-dns", v)?;
    }
    o.hostname = kv.get("hostname").map(String::from);
    o.domainname = kv.get("domainname").map(String::from);
    o.tftp = kv.get("tftp").map(String::from);
    o.bootfile = kv.get("bootfile").map(String::from);
    for (k, v) in &kv.pairs {
        match k.as_str() {
            "dnssearch" => o.dnssearch.push(v.clone()),
            "hostfwd" => o
                .hostfwd
                .push(v.parse::<HostFwd>().map_err(|m| format!("hostfwd: {m}"))?),
            "guestfwd" => {
                let f = v
                    .parse::<GuestFwd>()
                    .map_err(|m| format!("guestfwd: {m}"))?;
                if !o.contains(f.addr) || [o.host, o.dns].contains(&f.addr) {
                    return Err(format!(
                        "guestfwd: {} must be a free address inside net={}/{}",
                        f.addr, o.net, o.prefix
                    ));
                }
                o.guestfwd.push(f);
            }
            _ => {}
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Result<SlirpOptions, String> {
        slirp_options(&KeyVal::parse(s, None).unwrap())
    }

    #[test]
    fn user_defaults_and_derived_addresses() {
        let o = opts("hostfwd=tcp::2222-:22").unwrap();
        assert_eq!(
            (o.net, o.prefix, o.host, o.dns, o.dhcp_start),
            (
                Ipv4Addr::new(10, 0, 2, 0),
                24,
                Ipv4Addr::new(10, 0, 2, 2),
                Ipv4Addr::new(10, 0, 2, 3),
                Ipv4Addr::new(10, 0, 2, 15)
            )
        );
        let o = opts("net=192.168.100.0/24,dhcpstart=192.168.100.50").unwrap();
        assert_eq!(o.host, Ipv4Addr::new(192, 168, 100, 2));
        assert_eq!(o.dhcp_start, Ipv4Addr::new(192, 168, 100, 50));
        assert_eq!(opts("net=10.1.0.0/255.255.0.0").unwrap().prefix, 16);
        assert_eq!(opts("net=10.0.0.0").unwrap().prefix, 8, "classful default");
        assert!(opts("restrict=on").unwrap().restrict);
        assert_eq!(
            opts("dnssearch=a.example,dnssearch=b.example")
                .unwrap()
                .dnssearch
                .len(),
            2
        );
    }

    #[test]
    fn bad_user_options_say_which() {
        for (s, key) in [
            ("net=10.0.2.1/24", "net"),
            ("net=banana", "net"),
            ("net=10.0.2.0/33", "net"),
            ("net=192.168.100.0/24,dhcpstart=10.0.2.15", "dhcpstart"),
            ("dns=1.2.3.4", "dns"),
            ("hostfwd=tcp:2222:22", "hostfwd"),
            ("restrict=maybe", "restrict"),
            ("guestfwd=tcp:10.0.2.100:1-tcp:127.0.0.1:2", "guestfwd"),
            ("guestfwd=tcp:10.0.2.2:1-cmd:x", "guestfwd"),
            ("smb=/tmp", "smb"),
        ] {
            let e = opts(s).unwrap_err();
            assert!(e.contains(key), "{s}: {e}");
        }
    }
}
