//! `-netdev user`: QEMU's option names, defaults and checks for the user-mode network, and
//! the IPv4 arithmetic they need.

use super::{on_off, OptionError};
use crate::keyval::KeyVal;
use net_backends::slirp::{GuestFwd, HostFwd, SlirpOptions};
use std::net::{Ipv4Addr, Ipv6Addr};

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
    "tftp-server-name",
    "bootfile",
    "ipv4",
    "ipv6",
    "ipv6-net",
    "ipv6-prefix",
    "ipv6-prefixlen",
    "ipv6-host",
    "ipv6-dns",
];

/// `net=ADDR[/MASK]`: MASK a prefix length or dotted; without it, the address's class decides
/// (as QEMU does). The host bits must be zero.
pub fn parse_net(v: &str) -> Option<(Ipv4Addr, u8)> {
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

fn ip(key: &str, v: &str) -> Result<Ipv4Addr, OptionError> {
    v.parse().map_err(|_| OptionError::NotA {
        key: key.into(),
        value: v.into(),
        what: "an IPv4 address",
    })
}

fn ip6(key: &str, v: &str) -> Result<Ipv6Addr, OptionError> {
    v.parse().map_err(|_| OptionError::NotA {
        key: key.into(),
        value: v.into(),
        what: "an IPv6 address",
    })
}

/// `-netdev user` options with QEMU's names, defaults and checks.
pub fn slirp_options(kv: &KeyVal) -> Result<SlirpOptions, OptionError> {
    if let Some(k) = kv.unknown_key(KEYS) {
        return Err(OptionError::Unknown(k.into()));
    }
    let mut o = SlirpOptions::default();
    if let Some(v) = kv.get("net") {
        let (net, prefix) = parse_net(v).ok_or_else(|| OptionError::NotA {
            key: "net".into(),
            value: v.into(),
            what: "a network (ADDR[/MASK], host bits zero)",
        })?;
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
    if let Some(v) = kv.get("restrict") {
        o.restrict = on_off("restrict", v)?;
    }
    for (key, addr) in [
        ("host", o.host),
        ("dns", o.dns),
        ("dhcpstart", o.dhcp_start),
    ] {
        // As QEMU: a DNS address outside the network is reached through the gateway, which
        // a restricted guest may not use.
        if !o.contains(addr) && (key != "dns" || o.restrict) {
            return Err(OptionError::OutsideNet {
                key: key.into(),
                addr,
                net: o.net,
                prefix: o.prefix,
            });
        }
    }
    // As QEMU: the guest must not be handed the gateway's or the DNS server's address.
    for (key, addr, other, taken) in [
        ("dns", o.dns, "host", o.host),
        ("dhcpstart", o.dhcp_start, "host", o.host),
        ("dhcpstart", o.dhcp_start, "dns", o.dns),
    ] {
        if addr == taken {
            return Err(OptionError::SameAddr {
                key: key.into(),
                addr,
                other,
            });
        }
    }
    if let Some(v) = kv.get("ipv4") {
        o.ipv4 = on_off("ipv4", v)?;
    }
    if let Some(v) = kv.get("ipv6") {
        o.ipv6 = on_off("ipv6", v)?;
    }
    if !o.ipv4 && !o.ipv6 {
        return Err(OptionError::NoIp);
    }
    if !o.ipv6 {
        // As QEMU: IPv6 settings with IPv6 turned off are a mistake, not ignored.
        let v6 = [
            "ipv6-net",
            "ipv6-prefix",
            "ipv6-prefixlen",
            "ipv6-host",
            "ipv6-dns",
        ];
        if let Some(k) = v6.into_iter().find(|k| kv.get(k).is_some()) {
            return Err(OptionError::NotUsedWith {
                key: k.into(),
                other: "ipv6=off".into(),
            });
        }
    }
    if let Some(v) = kv.get("ipv6-net").or(kv.get("ipv6-prefix")) {
        let (a, len) = match v.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (v, None),
        };
        o.ipv6_prefix = ip6("ipv6-net", a)?;
        if let Some(l) = len {
            o.ipv6_prefix_len = l.parse().map_err(|_| OptionError::NotA {
                key: "ipv6-net".into(),
                value: v.into(),
                what: "an IPv6 prefix (ADDR[/LEN])",
            })?;
        }
    }
    if let Some(v) = kv.get("ipv6-prefixlen") {
        o.ipv6_prefix_len = v.parse().map_err(|_| OptionError::NotA {
            key: "ipv6-prefixlen".into(),
            value: v.into(),
            what: "a number",
        })?;
    }
    if !(1..=126).contains(&o.ipv6_prefix_len) {
        return Err(OptionError::OutOfRange {
            key: "ipv6-prefixlen".into(),
            value: o.ipv6_prefix_len.to_string(),
            range: "1-126",
        });
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
    o.tftp_server_name = kv.get("tftp-server-name").map(String::from);
    o.bootfile = kv.get("bootfile").map(String::from);
    // What DHCP can carry (QEMU's limits for the names; libslirp's for the boot file, which
    // it would otherwise refuse with a message of its own).
    for (key, value, max) in [
        ("hostname", &o.hostname, 255),
        ("domainname", &o.domainname, 255),
        ("tftp-server-name", &o.tftp_server_name, 255),
        ("bootfile", &o.bootfile, BOOTFILE_MAX),
    ] {
        match value {
            Some(v) if v.is_empty() && key == "domainname" => {
                return Err(OptionError::Empty {
                    key: key.into(),
                    what: "name",
                })
            }
            Some(v) if v.len() > max => {
                return Err(OptionError::TooLong {
                    key: key.into(),
                    max,
                })
            }
            _ => {}
        }
    }
    for (k, v) in &kv.pairs {
        match k.as_str() {
            "dnssearch" => o.dnssearch.push(v.clone()),
            "hostfwd" => {
                o.hostfwd
                    .push(v.parse::<HostFwd>().map_err(|why| OptionError::Forward {
                        key: "hostfwd",
                        why,
                    })?)
            }
            "guestfwd" => {
                let f = v.parse::<GuestFwd>().map_err(|why| OptionError::Forward {
                    key: "guestfwd",
                    why,
                })?;
                if !o.contains(f.addr) || [o.host, o.dns].contains(&f.addr) {
                    return Err(OptionError::GuestFwdAddr {
                        addr: f.addr,
                        net: o.net,
                        prefix: o.prefix,
                    });
                }
                o.guestfwd.push(f);
            }
            _ => {}
        }
    }
    Ok(o)
}

/// The longest boot file name DHCP's `file` field holds (128 bytes, one of them the NUL).
const BOOTFILE_MAX: usize = 127;

/// Whether a `dnssearch=` domain is one DHCP's search option can carry: labels of 1-63
/// characters between dots (a dot at the end allowed), 253 characters at most without it.
/// libslirp leaves out one that is not, with a multi-line warning of its own; so does nicvm,
/// with a line naming the option (QEMU starts with it too).
pub fn domain_ok(v: &str) -> bool {
    let name = v.strip_suffix('.').unwrap_or(v);
    name.len() <= 253 && name.split('.').all(|l| !l.is_empty() && l.len() <= 63)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Result<SlirpOptions, OptionError> {
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
            ("hostfwd=tcp:2222:22", "hostfwd"),
            ("restrict=maybe", "restrict"),
            ("guestfwd=tcp:10.0.2.100:1-tcp:127.0.0.1:2", "guestfwd"),
            ("guestfwd=tcp:10.0.2.2:1-cmd:x", "guestfwd"),
            ("smb=/tmp", "smb"),
            ("ipv4=off,ipv6=off", "ipv6=off"),
            ("ipv6=off,ipv6-net=fec0::/64", "ipv6=off"),
            ("ipv6=off,ipv6-dns=fec0::3", "ipv6-dns"),
            ("ipv6-net=fec0::/x", "ipv6-net"),
            ("ipv6-prefixlen=127", "ipv6-prefixlen"),
            ("ipv6-host=10.0.2.2", "ipv6-host"),
            ("dns=10.0.2.2", "dns"),
            ("dhcpstart=10.0.2.2", "dhcpstart"),
            ("dhcpstart=10.0.2.3", "dhcpstart"),
            (
                "net=10.1.0.0/16,dns=10.1.0.9,dhcpstart=10.1.0.9",
                "dhcpstart",
            ),
            ("restrict=on,dns=1.2.3.4", "dns"),
            ("domainname=", "domainname"),
        ] {
            let e = opts(s).unwrap_err().to_string();
            assert!(e.contains(key), "{s}: {e}");
            assert!(!e.contains('\n'), "{s}: {e}");
        }
        assert_eq!(
            opts("restrict=on,dns=1.2.3.4").unwrap_err().to_string(),
            "dns: 1.2.3.4 is outside net=10.0.2.0/24"
        );
        assert_eq!(
            opts("dhcpstart=10.0.2.2").unwrap_err().to_string(),
            "dhcpstart: 10.0.2.2 is also the host= address; they must differ"
        );
        let long = |n: usize| "a".repeat(n);
        for (key, max) in [
            ("hostname", 255),
            ("domainname", 255),
            ("tftp-server-name", 255),
            ("bootfile", 127),
        ] {
            assert!(opts(&format!("{key}={}", long(max))).is_ok(), "{key}");
            let e = opts(&format!("{key}={}", long(max + 1))).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("{key}: the name is longer than {max} characters")
            );
        }
    }

    #[test]
    fn search_domains_dhcp_can_carry() {
        let label = |n: usize| "a".repeat(n);
        let name253 = [label(63), label(63), label(63), label(61)].join(".");
        assert_eq!(name253.len(), 253);
        for good in [
            "example.org",
            "example.org.",
            &name253,
            &format!("{name253}."),
        ] {
            assert!(domain_ok(good), "{good}");
        }
        let too_long = format!("{name253}a");
        for bad in ["", ".", "a..b", ".example", &label(64), &too_long] {
            assert!(!domain_ok(bad), "{bad}");
        }
    }

    /// As QEMU: without restrict=on the DNS server may lie outside the network (the guest
    /// reaches it through the gateway); a domain may end in a dot.
    #[test]
    fn good_user_options_qemu_takes() {
        assert_eq!(opts("dns=1.2.3.4").unwrap().dns, Ipv4Addr::new(1, 2, 3, 4));
        assert_eq!(opts("dnssearch=example.org.").unwrap().dnssearch.len(), 1);
    }
}
