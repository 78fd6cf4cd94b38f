//! One `-netdev` (or the backend half of `-nic`/`-net`) parsed into its backend's options:
//! every key checked, addresses resolved, nothing opened.

use super::addr::{host_port, inet_addrs, prefixed, qapi_addr, v4_mcast, QapiAddr};
use super::slirp::slirp_options;
use super::{
    on_off, Backend, BridgeOptions, InheritedFds, OptionError, Script, SocketKind, TapDevice,
    TapOptions,
};
use crate::keyval::KeyVal;
use net_backends::dgram::DgramOptions;
use net_backends::stream::{StreamAddr, StreamOptions};
use net_backends::vde::VdeOptions;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::RawFd;
use std::time::Duration;

/// The `-netdev` types, as QEMU names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetdevType {
    User,
    Tap,
    Vde,
    Socket,
    Stream,
    Dgram,
    Bridge,
}

const TYPES: [(&str, NetdevType); 7] = [
    ("user", NetdevType::User),
    ("tap", NetdevType::Tap),
    ("vde", NetdevType::Vde),
    ("socket", NetdevType::Socket),
    ("stream", NetdevType::Stream),
    ("dgram", NetdevType::Dgram),
    ("bridge", NetdevType::Bridge),
];

/// "user, tap, vde, socket, stream, dgram, bridge"
fn type_list() -> String {
    TYPES.map(|(n, _)| n).join(", ")
}

impl NetdevType {
    pub fn parse(s: &str) -> Option<NetdevType> {
        TYPES.iter().find(|(n, _)| *n == s).map(|(_, t)| *t)
    }

    pub fn name(self) -> &'static str {
        TYPES
            .iter()
            .find(|(_, t)| *t == self)
            .map_or("?", |(n, _)| n)
    }
}

/// The part of a `-netdev` every type has: its type and its id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("a backend type is needed: one of {}", type_list())]
    NoType,
    #[error("unknown backend type '{0}' (expected one of {types})", types = type_list())]
    UnknownType(String),
    #[error("needs an id (id=NAME)")]
    NoId,
}

/// Takes the type (the leading word or `type=`) and `id=` out of `kv` (the CLI holds a
/// user's id to QEMU's rule). `netdev`: the options are `-netdev`'s (not `-nic`'s or
/// `-net`'s), which QEMU reads with keyval for stream and dgram.
pub fn header(kv: &mut KeyVal, netdev: bool) -> Result<(NetdevType, String), HeaderError> {
    let kind = kv.first.take().ok_or(HeaderError::NoType)?;
    let ty = NetdevType::parse(&kind).ok_or(HeaderError::UnknownType(kind))?;
    // A repeated id= is no error in QEMU: the first counts where it reads the options as
    // QemuOpts, the last for -netdev stream and dgram (read by keyval: each key's last value
    // stands).
    let id = match ty {
        NetdevType::Stream | NetdevType::Dgram if netdev => kv.take_last("id"),
        _ => kv.take_first("id"),
    }
    .ok_or(HeaderError::NoId)?;
    Ok((ty, id))
}

/// The options of netdev `id` of type `ty` (type and id already taken out), every one checked.
pub fn backend(
    ty: NetdevType,
    id: &str,
    kv: &KeyVal,
    fds: &InheritedFds,
) -> Result<Backend, OptionError> {
    Ok(match ty {
        NetdevType::User => Backend::User(slirp_options(kv)?),
        NetdevType::Tap if kv.get("helper").is_some() => {
            Backend::Bridge(tap_helper_options(kv, fds)?)
        }
        NetdevType::Tap => Backend::Tap(tap_options(kv, fds)?),
        NetdevType::Vde => {
            let mut o = vde_options(kv)?;
            o.description = format!("nicvm id={id}");
            Backend::Vde(o)
        }
        NetdevType::Socket => Backend::Socket(socket_options(kv)?),
        NetdevType::Stream => Backend::Stream(stream_options(kv)?),
        NetdevType::Dgram => Backend::Dgram(dgram_options(kv)?),
        NetdevType::Bridge => Backend::Bridge(bridge_options(kv)?),
    })
}

/// `-netdev bridge`: `br=` (br0 when not given, as QEMU), `helper=`.
pub fn bridge_options(kv: &KeyVal) -> Result<BridgeOptions, OptionError> {
    unknown(kv, &["br", "helper"])?;
    bridge_keys(kv)
}

/// The tap keys that name or set up a tap (or its queues): not with `helper=`, which makes
/// the tap itself.
const TAP_SETUP_KEYS: [&str; 8] = [
    "ifname",
    "fd",
    "fds",
    "script",
    "downscript",
    "vnet_hdr",
    "queues",
    "vhostfds",
];

/// The tap keys that go with `helper=` too: QEMU's vhost ones (nicvm has no vhost-net) and
/// `sndbuf=`.
const TAP_VHOST_KEYS: [&str; 4] = ["vhost", "vhostforce", "vhostfd", "sndbuf"];

/// `-netdev tap,helper=HELPER[,br=BR]`: QEMU's other way to a bridge's tap, the same as
/// `-netdev bridge,helper=`; the keys that name or set up a tap do not go with it. As in QEMU
/// a `vhostfd=` may come with it (checked, as a tap's; nicvm has no vhost-net).
fn tap_helper_options(kv: &KeyVal, fds: &InheritedFds) -> Result<BridgeOptions, OptionError> {
    for k in TAP_SETUP_KEYS {
        if kv.get(k).is_some() {
            return Err(OptionError::Together(vec!["helper".into(), k.into()]));
        }
    }
    unknown(kv, &[&["helper", "br"][..], &TAP_VHOST_KEYS].concat())?;
    if let Some(v) = kv.get("vhostfd") {
        inherited_fds("vhostfd", v, fds)?;
    }
    let vhost = vhost_asked(kv, kv.get("vhostfd").is_some())?;
    if kv.get("vhostfd").is_some() && !vhost {
        return Err(OptionError::VhostFdsWithoutVhost);
    }
    if let Some(v) = kv.get("sndbuf") {
        parse_size(v).ok_or_else(|| not_a("sndbuf", v, "a size in bytes"))?;
    }
    Ok(BridgeOptions {
        vhost,
        ..bridge_keys(kv)?
    })
}

fn bridge_keys(kv: &KeyVal) -> Result<BridgeOptions, OptionError> {
    let br = kv.get("br").unwrap_or("br0");
    if br.is_empty() {
        return Err(OptionError::Empty {
            key: "br".into(),
            what: "interface name",
        });
    }
    check_ifname("br", br)?;
    let helper = match kv.get("helper") {
        Some("") => {
            return Err(OptionError::Empty {
                key: "helper".into(),
                what: "program",
            })
        }
        h => h.map(str::to_string),
    };
    Ok(BridgeOptions {
        br: br.to_string(),
        helper,
        vhost: false,
    })
}

fn not_a(key: &str, value: &str, what: &'static str) -> OptionError {
    OptionError::NotA {
        key: key.into(),
        value: value.into(),
        what,
    }
}

fn unknown(kv: &KeyVal, allowed: &[&str]) -> Result<(), OptionError> {
    match kv.unknown_key(allowed) {
        Some(k) => Err(OptionError::Unknown(k.into())),
        None => Ok(()),
    }
}

/// `script=`/`downscript=`: a path, `no` (or empty), or not given.
fn script(v: Option<&str>) -> Script {
    match v {
        None => Script::Default,
        Some("no") | Some("") => Script::No,
        Some(p) => Script::Path(p.into()),
    }
}

/// `fd=N`: a number naming a descriptor nicvm inherited, not stdin/stdout/stderr.
/// `KEY=N`, or `KEY=N:M:...` for the `fds`/`vhostfds` keys: descriptors nicvm inherited, each
/// once, at most MAX_TAP_QUEUES.
pub(crate) fn inherited_fds(
    key: &'static str,
    v: &str,
    fds: &InheritedFds,
) -> Result<Vec<RawFd>, OptionError> {
    let many = key.ends_with('s');
    let what = if many {
        "numbers joined by ':'"
    } else {
        "a number"
    };
    let mut out: Vec<RawFd> = vec![];
    for n in v.split(if many { ':' } else { '\0' }) {
        let fd: RawFd = n
            .parse::<u32>()
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| not_a(key, v, what))?;
        if fd < 3 {
            return Err(OptionError::StdFd(key, fd));
        }
        if !fds.contains(fd) {
            return Err(OptionError::NotInherited(key, fd));
        }
        if out.contains(&fd) {
            return Err(OptionError::FdTwice(key, fd));
        }
        out.push(fd);
    }
    if out.len() > MAX_TAP_QUEUES {
        return Err(OptionError::OutOfRange {
            key: key.into(),
            value: v.into(),
            range: "1 to 16 descriptors",
        });
    }
    Ok(out)
}

/// An interface name as the kernel's dev_valid_name takes it (a name it refuses would read
/// as "no such interface" or "not a tap" later): under IFNAMSIZ bytes, not `.` or `..`, no
/// '/', ':' or white space (the kernel's isspace, on bytes: 0xa0 is one).
fn check_ifname(key: &str, name: &str) -> Result<(), OptionError> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(OptionError::TooLong {
            key: key.into(),
            max: libc::IFNAMSIZ - 1,
        });
    }
    if name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| matches!(b, b'/' | b':' | b' ' | b'\t'..=b'\r' | 0xa0))
    {
        return Err(OptionError::NotA {
            key: key.into(),
            value: name.into(),
            what: "an interface name (no '/', ':' or white space; not . or ..)",
        });
    }
    Ok(())
}

/// Queues of a multiqueue tap at most (virtio-net's queue pairs).
pub const MAX_TAP_QUEUES: usize = 16;

/// `-netdev tap`: `ifname=NAME`, `fd=N` or `fds=N:M:...` (a multiqueue tap's queues, as
/// libvirt passes them), `script=`, `downscript=`, `vnet_hdr=on|off`, `queues=N` (a
/// multiqueue tap, with `ifname=` only); QEMU's `vhost=`/`vhostforce=`/`vhostfd=`/`vhostfds=`
/// (nicvm has no vhost-net: the caller warns; the descriptors are checked and left alone)
/// and `sndbuf=` (a number, nothing to tune on a tap nicvm writes without queueing).
pub fn tap_options(kv: &KeyVal, fds: &InheritedFds) -> Result<TapOptions, OptionError> {
    unknown(kv, &[&TAP_SETUP_KEYS[..], &TAP_VHOST_KEYS].concat())?;
    // As QEMU: fd= and fds= each rule out the ways of naming a tap, its queues or its
    // vhost descriptors that do not go with them.
    for (key, not_with) in [
        ("fd", &["fds", "ifname", "queues", "vhostfds"][..]),
        ("fds", &["ifname", "queues", "vhostfd"][..]),
        ("vhostfds", &["vhostfd"][..]),
    ] {
        if kv.get(key).is_some() {
            if let Some(k) = not_with.iter().find(|k| kv.get(k).is_some()) {
                return Err(OptionError::Together(vec![key.into(), k.to_string()]));
            }
        }
    }
    if let Some(v) = kv.get("sndbuf") {
        parse_size(v).ok_or_else(|| not_a("sndbuf", v, "a size in bytes"))?;
    }
    let queues = match kv.get("queues") {
        None => 1,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_TAP_QUEUES).contains(&n) => n,
            Ok(_) => {
                return Err(OptionError::OutOfRange {
                    key: "queues".into(),
                    value: v.into(),
                    range: "1 to 16",
                })
            }
            Err(_) => return Err(not_a("queues", v, "a number")),
        },
    };
    // As QEMU: a tap the caller opened is used as it is, with no script run on it (QEMU
    // refuses script= and downscript= with fd=; `no` is taken, it asks for nothing) and its
    // queues as the caller made them. vnet_hdr= is nicvm's own (QEMU refuses it here).
    for fd_key in ["fd", "fds"] {
        if kv.get(fd_key).is_none() {
            continue;
        }
        for k in ["script", "downscript"] {
            if kv.get(k).is_some() && script(kv.get(k)) != Script::No {
                return Err(OptionError::Together(vec![fd_key.into(), k.into()]));
            }
        }
    }
    let tap_fds = match (kv.get("fd"), kv.get("fds")) {
        (Some(v), _) => Some(inherited_fds("fd", v, fds)?),
        (None, Some(v)) => Some(inherited_fds("fds", v, fds)?),
        (None, None) => None,
    };
    let mut vhost_fds = false;
    for key in ["vhostfd", "vhostfds"] {
        if let Some(v) = kv.get(key) {
            if key == "vhostfds" && kv.get("fds").is_none() {
                return Err(OptionError::Needs {
                    key: Some("vhostfds=".into()),
                    what: "fds=".into(),
                });
            }
            let given = inherited_fds(key, v, fds)?;
            let taps = tap_fds.as_deref().unwrap_or_default();
            if key == "vhostfds" && taps.len() != given.len() {
                return Err(OptionError::FdCount(key, given.len(), taps.len()));
            }
            if let Some(fd) = given.iter().find(|fd| taps.contains(fd)) {
                return Err(OptionError::VhostFdIsTap(key, *fd));
            }
            vhost_fds = true;
        }
    }
    let vhost = vhost_asked(kv, vhost_fds)?;
    if vhost_fds && !vhost {
        return Err(OptionError::VhostFdsWithoutVhost);
    }
    let vnet_hdr = match kv.get("vnet_hdr") {
        Some(v) => Some(on_off("vnet_hdr", v)?),
        None => None,
    };
    let device = match (tap_fds, kv.get("ifname")) {
        (Some(fds), _) => TapDevice::Fds {
            key: if kv.get("fd").is_some() { "fd" } else { "fds" },
            fds,
        },
        (None, name) => {
            if let Some(name) = name {
                check_ifname("ifname", name)?;
            }
            TapDevice::Ifname(name.filter(|n| !n.is_empty()).map(String::from))
        }
    };
    let (up, down) = match device {
        TapDevice::Fds { .. } => (Script::No, Script::No),
        TapDevice::Ifname(_) => (script(kv.get("script")), script(kv.get("downscript"))),
    };
    let queues = match &device {
        TapDevice::Fds { fds, .. } => fds.len(),
        TapDevice::Ifname(_) => queues,
    };
    Ok(TapOptions {
        queues,
        device,
        script: up,
        downscript: down,
        vnet_hdr,
        vhost,
    })
}

/// Whether a tap asks for vhost-net, by QEMU's rule: `vhost=` when given, else `vhostforce=on`
/// or vhost descriptors (`given_fds`).
fn vhost_asked(kv: &KeyVal, given_fds: bool) -> Result<bool, OptionError> {
    let force = match kv.get("vhostforce") {
        Some(v) => on_off("vhostforce", v)?,
        None => false,
    };
    match kv.get("vhost") {
        Some(v) => on_off("vhost", v),
        None => Ok(force || given_fds),
    }
}

/// A byte count as QEMU's size options take it: a number with an optional k/M/G suffix.
fn parse_size(v: &str) -> Option<u64> {
    let (num, mult) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&v[..i], 1 << 20),
        (i, 'g' | 'G') => (&v[..i], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// `-netdev vde` options: `sock=DIR`, `port=N`, `group=G`, `mode=OCTAL` (default 0700).
pub fn vde_options(kv: &KeyVal) -> Result<VdeOptions, OptionError> {
    unknown(kv, &["sock", "port", "group", "mode"])?;
    let mut o = VdeOptions::default();
    if let Some(v) = kv.get("sock") {
        if v.is_empty() {
            return Err(OptionError::Empty {
                key: "sock".into(),
                what: "path",
            });
        }
        o.sock = Some(v.into());
    }
    if let Some(v) = kv.get("port") {
        o.port = v
            .parse::<u32>()
            .ok()
            .filter(|p| *p < 1 << 24)
            .ok_or_else(|| not_a("port", v, "a switch port number"))?;
    }
    if let Some(v) = kv.get("group") {
        if v.is_empty() {
            return Err(OptionError::Empty {
                key: "group".into(),
                what: "group name",
            });
        }
        o.group = Some(v.into());
    }
    if let Some(v) = kv.get("mode") {
        let digits = v.strip_prefix("0o").unwrap_or(v);
        o.mode = u32::from_str_radix(digits, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| not_a("mode", v, "an octal permission (like 0700)"))?;
    }
    Ok(o)
}

/// QEMU's legacy `-netdev socket`: exactly one of `listen=[HOST]:PORT`, `connect=HOST:PORT`,
/// `mcast=MADDR:PORT[,localaddr=ADDR]`, `udp=HOST:PORT,localaddr=HOST:PORT`.
pub fn socket_options(kv: &KeyVal) -> Result<SocketKind, OptionError> {
    unknown(
        kv,
        &["listen", "connect", "mcast", "udp", "localaddr", "fd"],
    )?;
    if kv.get("fd").is_some() {
        return Err(OptionError::SocketFd);
    }
    let modes: Vec<&str> = ["listen", "connect", "mcast", "udp"]
        .into_iter()
        .filter(|k| kv.get(k).is_some())
        .collect();
    let (mode, v) = match modes.as_slice() {
        [m] => (*m, kv.get(m).unwrap_or_default()),
        [] => {
            return Err(OptionError::Needs {
                key: None,
                what: "one of listen=, connect=, mcast=, udp=".into(),
            })
        }
        _ => {
            return Err(OptionError::Together(
                modes.iter().map(|m| m.to_string()).collect(),
            ))
        }
    };
    let localaddr = kv.get("localaddr");
    if localaddr.is_some() && matches!(mode, "listen" | "connect") {
        return Err(OptionError::NotUsedWith {
            key: "localaddr".into(),
            other: format!("{mode}="),
        });
    }
    Ok(match mode {
        "listen" | "connect" => SocketKind::Stream(StreamOptions {
            addr: StreamAddr::Inet(host_port(mode, v, mode == "listen")?),
            server: mode == "listen",
            reconnect: None,
        }),
        "mcast" => SocketKind::Dgram(DgramOptions::Mcast {
            group: v4_mcast("mcast", v)?,
            localaddr: match localaddr {
                None => None,
                Some(a) => Some(
                    a.parse()
                        .map_err(|_| not_a("localaddr", a, "an IPv4 address"))?,
                ),
            },
        }),
        _ => {
            let remote = host_port("udp", v, false)?[0];
            let l = localaddr.ok_or_else(|| OptionError::Needs {
                key: Some("udp=".into()),
                what: "localaddr=HOST:PORT".into(),
            })?;
            let local = host_port("localaddr", l, false)?
                .into_iter()
                .find(|a| a.is_ipv4() == remote.is_ipv4())
                .ok_or_else(|| OptionError::IpVersion {
                    key: "localaddr".into(),
                    other: "udp=".into(),
                })?;
            SocketKind::Dgram(DgramOptions::Udp { local, remote })
        }
    })
}

fn allowed_keys(keys: &[String]) -> Vec<&str> {
    keys.iter().map(String::as_str).collect()
}

/// `-netdev stream`: `addr.*` (see [`qapi_addr`]), `server=on|off` (default off),
/// `reconnect=SECONDS` or `reconnect-ms=MS` for clients.
pub fn stream_options(kv: &KeyVal) -> Result<StreamOptions, OptionError> {
    let mut keys: Vec<String> = prefixed("addr").collect();
    keys.extend(["server", "reconnect", "reconnect-ms"].map(String::from));
    unknown(kv, &allowed_keys(&keys))?;
    let server = match kv.get("server") {
        Some(v) => on_off("server", v)?,
        None => false,
    };
    let mut reconnect = None;
    if let Some(v) = kv.get("reconnect") {
        // QEMU's type: uint32 (a timer much further off is refused by the kernel).
        let s: u32 = v.parse().map_err(|_| match v.parse::<u64>() {
            Ok(_) => OptionError::OutOfRange {
                key: "reconnect".into(),
                value: v.into(),
                range: "0 to 4294967295 seconds",
            },
            Err(_) => not_a("reconnect", v, "a number of seconds"),
        })?;
        reconnect = (s > 0).then(|| Duration::from_secs(s.into()));
    }
    if let Some(v) = kv.get("reconnect-ms") {
        if kv.get("reconnect").is_some() {
            return Err(OptionError::Together(vec![
                "reconnect".into(),
                "reconnect-ms".into(),
            ]));
        }
        let ms: u64 = v
            .parse()
            .map_err(|_| not_a("reconnect-ms", v, "a number of milliseconds"))?;
        reconnect = (ms > 0).then(|| Duration::from_millis(ms));
    }
    if server && reconnect.is_some() {
        return Err(OptionError::ClientOnly {
            key: "reconnect".into(),
        });
    }
    let addr = match qapi_addr(kv, "addr")? {
        None => {
            return Err(OptionError::Needs {
                key: None,
                what: "addr.type=inet|unix and its address".into(),
            })
        }
        Some(QapiAddr::Unix(p)) => StreamAddr::Unix(p),
        Some(QapiAddr::Inet { host, port }) => {
            if host.is_empty() && server {
                StreamAddr::Inet(vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))])
            } else {
                StreamAddr::Inet(inet_addrs("addr.host", &host, port)?)
            }
        }
    };
    Ok(StreamOptions {
        addr,
        server,
        reconnect,
    })
}

/// `-netdev dgram`: `remote.*` and `local.*` (see [`qapi_addr`]), combined as QEMU allows:
/// a multicast remote with or without a local inet address (its host picks the interface),
/// otherwise both, of the same type.
pub fn dgram_options(kv: &KeyVal) -> Result<DgramOptions, OptionError> {
    let keys: Vec<String> = prefixed("local").chain(prefixed("remote")).collect();
    unknown(kv, &allowed_keys(&keys))?;
    let local = qapi_addr(kv, "local")?;
    let Some(remote) = qapi_addr(kv, "remote")? else {
        return Err(OptionError::Needs {
            key: None,
            what: "remote.type=inet|unix and its address (a local-only fd socket is not supported)"
                .into(),
        });
    };
    match remote {
        QapiAddr::Inet { host, port } => {
            let r = inet_addrs("remote.host", &host, port)?[0];
            if let SocketAddr::V4(g) = r {
                if g.ip().is_multicast() {
                    let localaddr = match local {
                        None => None,
                        Some(QapiAddr::Inet { host, .. }) => Some(
                            host.parse()
                                .map_err(|_| not_a("local.host", &host, "an IPv4 address"))?,
                        ),
                        Some(QapiAddr::Unix(_)) => return Err(OptionError::LocalType("inet")),
                    };
                    return Ok(DgramOptions::Mcast {
                        group: g,
                        localaddr,
                    });
                }
            }
            match local {
                None => Err(OptionError::Needs {
                    key: Some("remote.type=inet (not multicast)".into()),
                    what: "local.type=inet too".into(),
                }),
                Some(QapiAddr::Unix(_)) => Err(OptionError::LocalType("inet")),
                Some(QapiAddr::Inet { host, port }) => {
                    let l = inet_addrs("local.host", &host, port)?
                        .into_iter()
                        .find(|a| a.is_ipv4() == r.is_ipv4())
                        .ok_or_else(|| OptionError::IpVersion {
                            key: "local.host".into(),
                            other: "remote.host".into(),
                        })?;
                    Ok(DgramOptions::Udp {
                        local: l,
                        remote: r,
                    })
                }
            }
        }
        QapiAddr::Unix(rp) => match local {
            Some(QapiAddr::Unix(lp)) => Ok(DgramOptions::Unix {
                local: lp,
                remote: rp,
            }),
            Some(QapiAddr::Inet { .. }) => Err(OptionError::LocalType("unix")),
            None => Err(OptionError::Needs {
                key: Some("remote.type=unix".into()),
                what: "local.type=unix,local.path=PATH".into(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(s: &str) -> KeyVal {
        if s.is_empty() {
            return KeyVal::default();
        }
        KeyVal::parse(s, None).unwrap()
    }

    /// Every error is one line that names `key`.
    fn check_errors<T: std::fmt::Debug>(
        f: impl Fn(&KeyVal) -> Result<T, OptionError>,
        cases: &[(&str, &str)],
    ) {
        for (s, key) in cases {
            let e = f(&kv(s)).unwrap_err().to_string();
            assert!(e.contains(key), "{s}: '{e}' does not name {key}");
            assert!(!e.contains('\n'), "{s}: '{e}' is not one line");
        }
    }

    #[test]
    fn bridge_options_and_errors() {
        let o = bridge_options(&kv("")).unwrap();
        assert_eq!((o.br.as_str(), o.helper), ("br0", None));
        let o = bridge_options(&kv("br=virbr0,helper=/usr/local/bin/h --x")).unwrap();
        assert_eq!(o.br, "virbr0");
        assert_eq!(o.helper.as_deref(), Some("/usr/local/bin/h --x"));
        check_errors(
            bridge_options,
            &[
                ("br=", "br"),
                ("br=a/b", "br"),
                ("br=a b", "br"),
                ("br=..", "br"),
                ("br=sixteen-chars-xy", "br"),
                ("helper=", "helper"),
                ("ifname=tap0", "ifname"),
            ],
        );
        // tap,helper= is the same; the tap's own set-up keys do not go with it.
        let fds = InheritedFds::from_fds([5]);
        let helper = |k: &KeyVal| tap_helper_options(k, &fds);
        let o = helper(&kv("helper=/h,br=virbr0,vhost=on,sndbuf=1k")).unwrap();
        assert_eq!((o.br.as_str(), o.helper.as_deref()), ("virbr0", Some("/h")));
        assert!(helper(&kv("helper=/h,vhostfd=5")).unwrap().vhost);
        check_errors(
            helper,
            &[
                ("helper=/h,ifname=tap0", "ifname"),
                ("helper=/h,fd=3", "fd"),
                ("helper=/h,fds=5", "fds"),
                ("helper=/h,vhostfd=6", "vhostfd"),
                ("helper=/h,vhostfd=5,vhost=off", "vhost"),
                ("helper=/h,script=no", "script"),
                ("helper=/h,queues=2", "queues"),
                ("helper=/h,vnet_hdr=on", "vnet_hdr"),
                ("helper=/h,vhost=maybe", "vhost"),
                ("helper=/h,br=a:b", "br"),
                ("helper=", "helper"),
                ("helper=/h,bogus=1", "bogus"),
            ],
        );
    }

    #[test]
    fn header_takes_type_and_id() {
        let mut k = KeyVal::parse("tap,id=n0,ifname=t", Some("type")).unwrap();
        assert_eq!(
            header(&mut k, true).unwrap(),
            (NetdevType::Tap, "n0".into())
        );
        assert_eq!(k.pairs, [("ifname".to_string(), "t".to_string())]);
        for (s, netdev, id) in [
            ("user,id=a,ipv6=on,id=b", true, "a"),
            ("tap,id=a,id=b", true, "a"),
            ("stream,id=a,server=on,id=b", true, "b"),
            ("dgram,id=a,id=b", true, "b"),
            ("stream,id=a,server=on,id=b", false, "a"),
        ] {
            let mut k = KeyVal::parse(s, Some("type")).unwrap();
            assert_eq!(header(&mut k, netdev).unwrap().1, id, "{s}");
            assert!(k.get("id").is_none(), "{s}");
        }
        for (s, e) in [
            ("id=n0", HeaderError::NoType),
            ("bogus,id=n0", HeaderError::UnknownType("bogus".into())),
            ("user", HeaderError::NoId),
        ] {
            let mut k = KeyVal::parse(s, Some("type")).unwrap();
            assert_eq!(header(&mut k, true).unwrap_err(), e, "{s}");
        }
        assert_eq!(
            HeaderError::NoType.to_string(),
            "a backend type is needed: one of user, tap, vde, socket, stream, dgram, bridge"
        );
        for (n, t) in TYPES {
            assert_eq!(t.name(), n);
        }
    }

    #[test]
    fn tap_options_and_errors() {
        let fds = InheritedFds::from_fds([0, 1, 2, 5, 6]);
        let tap = |s: &str| tap_options(&kv(s), &fds);
        assert_eq!(
            tap("").unwrap(),
            TapOptions {
                device: TapDevice::Ifname(None),
                script: Script::Default,
                downscript: Script::Default,
                vnet_hdr: None,
                vhost: false,
                queues: 1,
            }
        );
        let o = tap("vhost=on,sndbuf=1048576,queues=1").unwrap();
        assert!(
            o.vhost,
            "accepted; the caller warns that vhost-net is not used"
        );
        assert!(!tap("vhost=off,sndbuf=64k").unwrap().vhost);
        let o = tap("ifname=tap0,script=no,downscript=/x/down,vnet_hdr=off").unwrap();
        assert_eq!(o.device, TapDevice::Ifname(Some("tap0".into())));
        assert_eq!(
            (o.script, o.downscript, o.vnet_hdr),
            (Script::No, Script::Path("/x/down".into()), Some(false))
        );
        assert_eq!(
            tap("fd=5").unwrap().device,
            TapDevice::Fds {
                key: "fd",
                fds: vec![5]
            }
        );
        assert_eq!(tap("ifname=t,queues=4").unwrap().queues, 4);
        // A tap the caller opened: no script runs on it, not even the default one (QEMU's
        // rule; it ran /etc/qemu-ifup, which bridged the caller's tap).
        let o = tap("fd=5").unwrap();
        assert_eq!((o.script, o.downscript), (Script::No, Script::No));
        let o = tap("fd=5,script=no,downscript=,vnet_hdr=off").unwrap();
        assert_eq!((o.script, o.downscript), (Script::No, Script::No));
        for k in ["ifname=t", "script=/x/up", "downscript=/x/down", "queues=1"] {
            let e = tap(&format!("fd=5,{k}")).unwrap_err().to_string();
            let key = k.split('=').next().unwrap();
            assert_eq!(e, format!("fd= and {key}= cannot be used together"), "{k}");
        }
        assert_eq!(tap("script=").unwrap().script, Script::No);
        check_errors(
            |k| tap_options(k, &fds),
            &[
                ("fd=3x", "fd"),
                ("fd=-1", "fd"),
                ("fd=1", "fd"),
                ("fd=7", "fd"),
                ("fd=5,ifname=t", "ifname="),
                ("ifname=a-name-of-sixteen", "ifname"),
                ("ifname=a/b", "ifname"),
                ("ifname=a:b", "ifname"),
                ("ifname=a b", "ifname"),
                ("ifname=..", "ifname"),
                ("ifname=t\u{e0}", "ifname"),
                ("vnet_hdr=maybe", "vnet_hdr"),
                ("queues=17", "queues"),
                ("queues=0", "queues"),
                ("queues=x", "queues"),
                ("fd=5,queues=2", "queues"),
                ("sndbuf=lots", "sndbuf"),
                ("vhost=maybe", "vhost"),
            ],
        );
        assert_eq!(
            tap("fd=3x").unwrap_err().to_string(),
            "fd: '3x' is not a number"
        );
        assert_eq!(
            tap("fd=1").unwrap_err().to_string(),
            "fd: 1 is nicvm's stdout"
        );
        assert!(matches!(
            tap("fd=7"),
            Err(OptionError::NotInherited("fd", 7))
        ));
        assert_eq!(
            tap("fd=5,ifname=t").unwrap_err().to_string(),
            "fd= and ifname= cannot be used together"
        );
    }

    #[test]
    fn vde_options_and_errors() {
        let o = vde_options(&KeyVal::default()).unwrap();
        assert_eq!((o.sock, o.port, o.group, o.mode), (None, 0, None, 0o700));
        let o = vde_options(&kv("sock=/run/sw,port=5,group=kvm,mode=0770")).unwrap();
        assert_eq!(o.sock.as_deref(), Some(std::path::Path::new("/run/sw")));
        assert_eq!(
            (o.port, o.group.as_deref(), o.mode),
            (5, Some("kvm"), 0o770)
        );
        assert_eq!(
            vde_options(&kv("mode=660")).unwrap().mode,
            0o660,
            "octal even without 0"
        );
        let Backend::Vde(o) =
            backend(NetdevType::Vde, "sw", &kv(""), &InheritedFds::default()).unwrap()
        else {
            panic!()
        };
        assert_eq!(o.description, "nicvm id=sw");
        check_errors(
            vde_options,
            &[
                ("port=x", "port"),
                ("port=-1", "port"),
                ("mode=0999", "mode"),
                ("mode=01777", "mode"),
                ("sock=", "sock"),
                ("group=", "group"),
                ("ifname=x", "ifname"),
            ],
        );
    }

    #[test]
    fn socket_options_and_errors() {
        let SocketKind::Stream(o) = socket_options(&kv("listen=:1234")).unwrap() else {
            panic!()
        };
        assert!(o.server);
        assert_eq!(
            o.addr,
            StreamAddr::Inet(vec!["0.0.0.0:1234".parse().unwrap()])
        );
        let SocketKind::Stream(o) = socket_options(&kv("connect=127.0.0.1:1234")).unwrap() else {
            panic!()
        };
        assert!(!o.server && o.reconnect.is_none());
        let SocketKind::Stream(o) = socket_options(&kv("connect=[::1]:99")).unwrap() else {
            panic!()
        };
        assert_eq!(o.addr, StreamAddr::Inet(vec!["[::1]:99".parse().unwrap()]));
        assert_eq!(
            socket_options(&kv("mcast=230.0.0.1:1234,localaddr=127.0.0.1")).unwrap(),
            SocketKind::Dgram(DgramOptions::Mcast {
                group: "230.0.0.1:1234".parse().unwrap(),
                localaddr: Some(Ipv4Addr::LOCALHOST)
            })
        );
        assert_eq!(
            socket_options(&kv("udp=127.0.0.1:2,localaddr=127.0.0.1:1")).unwrap(),
            SocketKind::Dgram(DgramOptions::Udp {
                local: "127.0.0.1:1".parse().unwrap(),
                remote: "127.0.0.1:2".parse().unwrap()
            })
        );
        check_errors(
            socket_options,
            &[
                ("", "listen="),
                ("listen=:1,connect=127.0.0.1:2", "connect"),
                ("listen=1234", "listen"),
                ("listen=:99999", "listen"),
                ("connect=:1234", "connect"),
                ("mcast=10.0.0.1:5", "mcast"),
                ("mcast=230.0.0.1:5,localaddr=banana", "localaddr"),
                ("udp=127.0.0.1:2", "localaddr"),
                ("udp=127.0.0.1:2,localaddr=[::1]:3", "localaddr"),
                ("listen=:1,localaddr=127.0.0.1", "localaddr"),
                ("fd=3", "fd"),
                ("listen=:1,reconnect=1", "reconnect"),
            ],
        );
        assert_eq!(
            socket_options(&kv("listen=:1,connect=127.0.0.1:2"))
                .unwrap_err()
                .to_string(),
            "listen= and connect= cannot be used together"
        );
    }

    #[test]
    fn stream_options_and_errors() {
        let o = stream_options(&kv(
            "server=on,addr.type=inet,addr.host=127.0.0.1,addr.port=1234",
        ))
        .unwrap();
        assert!(o.server);
        assert_eq!(
            o.addr,
            StreamAddr::Inet(vec!["127.0.0.1:1234".parse().unwrap()])
        );
        let o = stream_options(&kv("addr.type=unix,addr.path=/tmp/s,reconnect=2")).unwrap();
        assert_eq!(
            (o.server, o.addr, o.reconnect),
            (
                false,
                StreamAddr::Unix("/tmp/s".into()),
                Some(Duration::from_secs(2))
            )
        );
        let o = stream_options(&kv("addr.type=unix,addr.path=/s,reconnect-ms=250")).unwrap();
        assert_eq!(o.reconnect, Some(Duration::from_millis(250)));
        let o = stream_options(&kv("addr.type=unix,addr.path=/s,reconnect=0")).unwrap();
        assert_eq!(o.reconnect, None, "0 turns reconnecting off");
        let o = stream_options(&kv("server=on,addr.type=inet,addr.host=,addr.port=5")).unwrap();
        assert_eq!(o.addr, StreamAddr::Inet(vec!["0.0.0.0:5".parse().unwrap()]));
        check_errors(
            stream_options,
            &[
                ("server=on", "addr.type"),
                ("addr.host=127.0.0.1,addr.port=1", "addr.type"),
                ("addr.type=fd", "addr.type"),
                ("addr.type=tcp", "addr.type"),
                ("addr.type=inet,addr.host=127.0.0.1", "addr.port"),
                ("addr.type=inet,addr.port=1", "addr.host"),
                (
                    "addr.type=inet,addr.host=127.0.0.1,addr.port=x",
                    "addr.port",
                ),
                (
                    "addr.type=inet,addr.host=127.0.0.1,addr.port=1,addr.path=/x",
                    "addr.path",
                ),
                ("addr.type=unix", "addr.path"),
                ("addr.type=unix,addr.path=/s,server=maybe", "server"),
                (
                    "addr.type=unix,addr.path=/s,server=on,reconnect=1",
                    "reconnect",
                ),
                ("addr.type=unix,addr.path=/s,reconnect=soon", "reconnect"),
                (
                    "addr.type=unix,addr.path=/s,reconnect=4294967296",
                    "reconnect",
                ),
                (
                    "addr.type=unix,addr.path=/s,reconnect=9223372036854775808",
                    "reconnect",
                ),
                (
                    "addr.type=unix,addr.path=/s,reconnect=1,reconnect-ms=5",
                    "reconnect-ms",
                ),
                (
                    "addr.type=unix,addr.path=/s,addr.abstract=on",
                    "addr.abstract",
                ),
                ("addr.type=unix,addr.path=/s,local.type=unix", "local.type"),
            ],
        );
    }

    #[test]
    fn dgram_options_and_errors() {
        assert_eq!(
            dgram_options(&kv(
                "remote.type=inet,remote.host=230.0.0.1,remote.port=1234"
            ))
            .unwrap(),
            DgramOptions::Mcast {
                group: "230.0.0.1:1234".parse().unwrap(),
                localaddr: None
            }
        );
        assert_eq!(
            dgram_options(&kv(
                "remote.type=inet,remote.host=230.0.0.1,remote.port=1234,local.type=inet,local.host=127.0.0.1,local.port=0"
            ))
            .unwrap(),
            DgramOptions::Mcast {
                group: "230.0.0.1:1234".parse().unwrap(),
                localaddr: Some(Ipv4Addr::LOCALHOST)
            }
        );
        assert_eq!(
            dgram_options(&kv(
                "local.type=inet,local.host=127.0.0.1,local.port=1,remote.type=inet,remote.host=127.0.0.1,remote.port=2"
            ))
            .unwrap(),
            DgramOptions::Udp {
                local: "127.0.0.1:1".parse().unwrap(),
                remote: "127.0.0.1:2".parse().unwrap()
            }
        );
        assert_eq!(
            dgram_options(&kv(
                "local.type=unix,local.path=/a,remote.type=unix,remote.path=/b"
            ))
            .unwrap(),
            DgramOptions::Unix {
                local: "/a".into(),
                remote: "/b".into()
            }
        );
        check_errors(
            dgram_options,
            &[
                ("", "remote.type"),
                ("local.type=unix,local.path=/a", "remote.type"),
                ("remote.type=unix,remote.path=/b", "local.type"),
                ("remote.type=inet,remote.host=127.0.0.1,remote.port=2", "local.type"),
                ("remote.type=inet,remote.host=127.0.0.1", "remote.port"),
                (
                    "local.type=inet,local.host=127.0.0.1,local.port=1,remote.type=unix,remote.path=/b",
                    "local.type",
                ),
                (
                    "local.type=unix,local.path=/a,remote.type=inet,remote.host=127.0.0.1,remote.port=2",
                    "local.type",
                ),
                ("remote.type=inet,remote.host=230.0.0.1,remote.port=1,local.type=inet,local.host=x,local.port=0", "local.host"),
                ("remote.type=unix,remote.path=/b,local.type=unix,local.path=/a,local.mode=1", "local.mode"),
                ("remote.type=unix,remote.path=/b,local.type=unix,local.path=/a,local.port=1", "local.port"),
            ],
        );
    }
}
