//! Socket addresses as the socket-like netdevs take them: `HOST:PORT`, multicast groups, and
//! QAPI's `SocketAddress` in dotted keys (`addr.type=inet,addr.host=...`). Host names are
//! resolved here; nothing is bound or connected.

use super::OptionError;
use crate::keyval::KeyVal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::path::PathBuf;

fn not_a(key: &str, value: &str, what: &'static str) -> OptionError {
    OptionError::NotA {
        key: key.into(),
        value: value.into(),
        what,
    }
}

/// `HOST:PORT` (`[V6]:PORT` for IPv6), resolved. An empty host is the wildcard address when
/// `empty_host_ok` (listening), an error otherwise.
pub fn host_port(key: &str, v: &str, empty_host_ok: bool) -> Result<Vec<SocketAddr>, OptionError> {
    let bad = || not_a(key, v, "HOST:PORT");
    let (host, port) = v.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        if !empty_host_ok {
            return Err(OptionError::NoHost {
                key: key.into(),
                value: v.into(),
            });
        }
        return Ok(vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))]);
    }
    inet_addrs(key, host, port)
}

/// `host` (an address or a name to resolve) with `port`.
pub fn inet_addrs(key: &str, host: &str, port: u16) -> Result<Vec<SocketAddr>, OptionError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let list: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|source| OptionError::Resolve {
            key: key.into(),
            host: host.into(),
            source,
        })?
        .collect();
    if list.is_empty() {
        return Err(OptionError::NoAddress {
            key: key.into(),
            host: host.into(),
        });
    }
    Ok(list)
}

/// `MADDR:PORT`, an IPv4 multicast group.
pub fn v4_mcast(key: &str, v: &str) -> Result<SocketAddrV4, OptionError> {
    match v.parse::<SocketAddrV4>() {
        Ok(a) if a.ip().is_multicast() => Ok(a),
        _ => Err(not_a(
            key,
            v,
            "an IPv4 multicast address and port (like 230.0.0.1:1234)",
        )),
    }
}

/// One QAPI `SocketAddress` given as dotted keys under a prefix (`addr`, `local`, `remote`):
/// `P.type=inet,P.host=H,P.port=N` or `P.type=unix,P.path=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QapiAddr {
    Inet { host: String, port: u16 },
    Unix(PathBuf),
}

const ADDR_KEYS: [&str; 4] = ["type", "host", "port", "path"];

/// The keys of a QAPI address under `prefix`.
pub fn prefixed(prefix: &str) -> impl Iterator<Item = String> + '_ {
    ADDR_KEYS.iter().map(move |k| format!("{prefix}.{k}"))
}

/// The address under `prefix`, None when none of its keys is given.
pub fn qapi_addr(kv: &KeyVal, prefix: &str) -> Result<Option<QapiAddr>, OptionError> {
    let key = |k: &str| format!("{prefix}.{k}");
    let get = |k: &str| kv.get(&key(k));
    let given: Vec<&str> = ADDR_KEYS.into_iter().filter(|k| get(k).is_some()).collect();
    let Some(ty) = get("type") else {
        if let Some(k) = given.first() {
            return Err(OptionError::Needs {
                key: Some(key(k)),
                what: key("type"),
            });
        }
        return Ok(None);
    };
    let stray = |allowed: &[&str]| -> Result<(), OptionError> {
        match given.iter().find(|k| !allowed.contains(k)) {
            Some(k) => Err(OptionError::NotUsedWith {
                key: key(k),
                other: format!("{}={ty}", key("type")),
            }),
            None => Ok(()),
        }
    };
    let needs = |k: &str| OptionError::Needs {
        key: Some(format!("{}={ty}", key("type"))),
        what: key(k),
    };
    match ty {
        "inet" => {
            stray(&["type", "host", "port"])?;
            let host = get("host").ok_or_else(|| needs("host"))?;
            let port = get("port").ok_or_else(|| needs("port"))?;
            let port = port
                .parse()
                .map_err(|_| not_a(&key("port"), port, "a port number"))?;
            Ok(Some(QapiAddr::Inet {
                host: host.into(),
                port,
            }))
        }
        "unix" => {
            stray(&["type", "path"])?;
            match get("path") {
                Some(p) if !p.is_empty() => Ok(Some(QapiAddr::Unix(p.into()))),
                _ => Err(needs("path")),
            }
        }
        "fd" | "vsock" => Err(OptionError::AddrTypeUnsupported {
            key: key("type"),
            ty: ty.into(),
        }),
        _ => Err(not_a(&key("type"), ty, "an address type (inet, unix)")),
    }
}
