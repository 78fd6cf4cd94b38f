//! Turning `-netdev` specs into backends, with their set-up scripts and what must be undone
//! when nicvm exits.

use crate::cli::NetdevSpec;
use crate::keyval::KeyVal;
use net_backends::dgram::{DgramBackend, DgramOptions};
use net_backends::slirp::{GuestFwd, HostFwd, SlirpOptions};
use net_backends::stream::{StreamAddr, StreamBackend, StreamOptions};
use net_backends::tap::Tap;
use net_backends::vde::{Vde, VdeOptions};
use net_backends::NetBackend;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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
    /// Remove a backend's private directory (VDE's socket directory).
    RemoveDir(PathBuf),
    /// Remove a Unix socket file a backend bound, unless another has replaced it since.
    RemoveSocket { path: PathBuf, ino: u64 },
}

impl Cleanup {
    pub fn run(self) {
        match self {
            Cleanup::DownScript { script, ifname } => {
                if let Err(e) = run_script(&script, &ifname) {
                    eprintln!("nicvm: downscript: {e}");
                }
            }
            Cleanup::RemoveDir(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::RemoveSocket { path, ino } => {
                use std::os::unix::fs::MetadataExt;
                if std::fs::symlink_metadata(&path).is_ok_and(|m| m.ino() == ino) {
                    let _ = std::fs::remove_file(path);
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
                    // An fd keeps the header it was opened with unless the frontend cannot
                    // use one (then it is hidden) or vnet_hdr= says otherwise.
                    let vnet = match o.get("vnet_hdr") {
                        _ if !want_vnet_hdr => Some(false),
                        None => None,
                        Some(v) => Some(v == "on"),
                    };
                    // SAFETY: nicvm inherited `fd` and nothing in it uses or closes it; the
                    // CLI hands it to exactly one -netdev, opened once.
                    unsafe { Tap::from_fd(fd, vnet) }.map_err(|x| e(x.to_string()))?
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
        "vde" => {
            let mut o = vde_options(&spec.opts).map_err(e)?;
            o.description = format!("nicvm id={}", spec.id);
            let v = Vde::open(&o).map_err(e)?;
            // Backends are not dropped when nicvm exits; the directory must still go.
            on_exit(Cleanup::RemoveDir(v.private_dir().to_path_buf()));
            let label = match &o.sock {
                Some(p) => format!("vde:{}[{}]", p.display(), v.port()),
                None => format!("vde[{}]", v.port()),
            };
            Ok(Opened {
                backend: Box::new(v),
                label,
            })
        }
        "socket" | "stream" | "dgram" => {
            let sock = match spec.kind.as_str() {
                "socket" => socket_options(&spec.opts),
                "stream" => stream_options(&spec.opts).map(SocketKind::Stream),
                _ => dgram_options(&spec.opts).map(SocketKind::Dgram),
            }
            .map_err(e)?;
            let label = format!("{}:{}", spec.kind, sock.describe());
            let (backend, bound): (Box<dyn NetBackend>, _) = match &sock {
                SocketKind::Stream(o) => {
                    let b = StreamBackend::new(o).map_err(e)?;
                    let p = b.socket_path().map(Path::to_path_buf);
                    (Box::new(b), p)
                }
                SocketKind::Dgram(o) => {
                    let b = DgramBackend::new(o).map_err(e)?;
                    let p = b.socket_path().map(Path::to_path_buf);
                    (Box::new(b), p)
                }
            };
            if let Some(path) = bound {
                use std::os::unix::fs::MetadataExt;
                if let Ok(m) = std::fs::symlink_metadata(&path) {
                    on_exit(Cleanup::RemoveSocket { path, ino: m.ino() });
                }
            }
            Ok(Opened { backend, label })
        }
        other => Err(e(format!(
            "the '{other}' backend is not available in this build of nicvm"
        ))),
    }
}

/// `-netdev vde` options: `sock=DIR`, `port=N`, `group=G`, `mode=OCTAL` (default 0700).
pub fn vde_options(kv: &KeyVal) -> Result<VdeOptions, String> {
    if let Some(k) = kv.unknown_key(&["sock", "port", "group", "mode"]) {
        return Err(format!("unknown parameter '{k}'"));
    }
    let mut o = VdeOptions::default();
    if let Some(v) = kv.get("sock") {
        if v.is_empty() {
            return Err("sock: empty path".into());
        }
        o.sock = Some(v.into());
    }
    if let Some(v) = kv.get("port") {
        o.port = v
            .parse::<u32>()
            .ok()
            .filter(|p| *p < 1 << 24)
            .ok_or_else(|| format!("port: '{v}' is not a switch port number"))?;
    }
    if let Some(v) = kv.get("group") {
        if v.is_empty() {
            return Err("group: empty group name".into());
        }
        o.group = Some(v.into());
    }
    if let Some(v) = kv.get("mode") {
        let digits = v.strip_prefix("0o").unwrap_or(v);
        o.mode = u32::from_str_radix(digits, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| format!("mode: '{v}' is not an octal permission (like 0700)"))?;
    }
    Ok(o)
}

/// What a socket-like netdev turned into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketKind {
    Stream(StreamOptions),
    Dgram(DgramOptions),
}

impl SocketKind {
    fn describe(&self) -> String {
        match self {
            SocketKind::Stream(o) => {
                format!(
                    "{}{}",
                    if o.server { "listen=" } else { "connect=" },
                    o.addr
                )
            }
            SocketKind::Dgram(DgramOptions::Udp { local, remote }) => format!("{local}->{remote}"),
            SocketKind::Dgram(DgramOptions::Mcast { group, .. }) => format!("mcast={group}"),
            SocketKind::Dgram(DgramOptions::Unix { local, remote }) => {
                format!("{}->{}", local.display(), remote.display())
            }
        }
    }
}

/// `HOST:PORT` (`[V6]:PORT` for IPv6), resolved. An empty host is the wildcard address when
/// `empty_host_ok` (listening), an error otherwise.
fn host_port(key: &str, v: &str, empty_host_ok: bool) -> Result<Vec<SocketAddr>, String> {
    let bad = || format!("{key}: '{v}' is not HOST:PORT");
    let (host, port) = v.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        if !empty_host_ok {
            return Err(format!("{key}: '{v}' needs a host"));
        }
        return Ok(vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))]);
    }
    inet_addrs(key, host, port)
}

fn inet_addrs(key: &str, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let list: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|x| format!("{key}: cannot resolve '{host}': {x}"))?
        .collect();
    if list.is_empty() {
        return Err(format!("{key}: '{host}' has no address"));
    }
    Ok(list)
}

fn v4_mcast(key: &str, v: &str) -> Result<SocketAddrV4, String> {
    match v.parse::<SocketAddrV4>() {
        Ok(a) if a.ip().is_multicast() => Ok(a),
        _ => Err(format!(
            "{key}: '{v}' is not an IPv4 multicast address and port (like 230.0.0.1:1234)"
        )),
    }
}

/// QEMU's legacy `-netdev socket`: exactly one of `listen=[HOST]:PORT`, `connect=HOST:PORT`,
/// `mcast=MADDR:PORT[,localaddr=ADDR]`, `udp=HOST:PORT,localaddr=HOST:PORT`.
pub fn socket_options(kv: &KeyVal) -> Result<SocketKind, String> {
    if let Some(k) = kv.unknown_key(&["listen", "connect", "mcast", "udp", "localaddr", "fd"]) {
        return Err(format!("unknown parameter '{k}'"));
    }
    if kv.get("fd").is_some() {
        return Err("fd: passing a socket descriptor is not supported by nicvm".into());
    }
    let modes: Vec<&str> = ["listen", "connect", "mcast", "udp"]
        .into_iter()
        .filter(|k| kv.get(k).is_some())
        .collect();
    let mode = match modes.as_slice() {
        [m] => *m,
        [] => return Err("needs one of listen=, connect=, mcast=, udp=".into()),
        _ => {
            return Err(format!(
                "{} cannot be used together",
                modes.join("= and ") + "="
            ))
        }
    };
    let v = kv.get(mode).unwrap();
    let localaddr = kv.get("localaddr");
    if localaddr.is_some() && matches!(mode, "listen" | "connect") {
        return Err(format!("localaddr: not used with {mode}="));
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
                        .map_err(|_| format!("localaddr: '{a}' is not an IPv4 address"))?,
                ),
            },
        }),
        _ => {
            let remote = host_port("udp", v, false)?[0];
            let l = localaddr.ok_or("udp= needs localaddr=HOST:PORT")?;
            let local = host_port("localaddr", l, false)?
                .into_iter()
                .find(|a| a.is_ipv4() == remote.is_ipv4())
                .ok_or_else(|| format!("localaddr: '{l}' is not of the same IP version as udp="))?;
            SocketKind::Dgram(DgramOptions::Udp { local, remote })
        }
    })
}

/// One QAPI `SocketAddress` given as dotted keys under `prefix` (`addr`, `local`, `remote`):
/// `P.type=inet,P.host=H,P.port=N` or `P.type=unix,P.path=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum QapiAddr {
    Inet { host: String, port: u16 },
    Unix(std::path::PathBuf),
}

fn qapi_addr(kv: &KeyVal, prefix: &str) -> Result<Option<QapiAddr>, String> {
    let key = |k: &str| format!("{prefix}.{k}");
    let get = |k: &str| kv.get(&key(k));
    let given: Vec<&str> = ["type", "host", "port", "path"]
        .into_iter()
        .filter(|k| get(k).is_some())
        .collect();
    let Some(ty) = get("type") else {
        if let Some(k) = given.first() {
            return Err(format!("{}: needs {}", key(k), key("type")));
        }
        return Ok(None);
    };
    let stray = |allowed: &[&str]| -> Result<(), String> {
        match given.iter().find(|k| !allowed.contains(k)) {
            Some(k) => Err(format!("{}: not used with {}={ty}", key(k), key("type"))),
            None => Ok(()),
        }
    };
    match ty {
        "inet" => {
            stray(&["type", "host", "port"])?;
            let host =
                get("host").ok_or_else(|| format!("{}=inet needs {}", key("type"), key("host")))?;
            let port =
                get("port").ok_or_else(|| format!("{}=inet needs {}", key("type"), key("port")))?;
            let port = port
                .parse()
                .map_err(|_| format!("{}: '{port}' is not a port number", key("port")))?;
            Ok(Some(QapiAddr::Inet {
                host: host.into(),
                port,
            }))
        }
        "unix" => {
            stray(&["type", "path"])?;
            match get("path") {
                Some(p) if !p.is_empty() => Ok(Some(QapiAddr::Unix(p.into()))),
                _ => Err(format!("{}=unix needs {}", key("type"), key("path"))),
            }
        }
        "fd" | "vsock" => Err(format!(
            "{}: '{ty}' addresses are not supported by nicvm (inet, unix are)",
            key("type")
        )),
        _ => Err(format!(
            "{}: '{ty}' is not an address type (inet, unix)",
            key("type")
        )),
    }
}

const ADDR_KEYS: [&str; 4] = ["type", "host", "port", "path"];

fn prefixed(prefix: &str) -> impl Iterator<Item = String> + '_ {
    ADDR_KEYS.iter().map(move |k| format!("{prefix}.{k}"))
}

/// `-netdev stream`: `addr.*` (see [`qapi_addr`]), `server=on|off` (default off),
/// `reconnect=SECONDS` or `reconnect-ms=MS` for clients.
pub fn stream_options(kv: &KeyVal) -> Result<StreamOptions, String> {
    let mut allowed: Vec<String> = prefixed("addr").collect();
    allowed.extend(["server", "reconnect", "reconnect-ms"].map(String::from));
    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
    if let Some(k) = kv.unknown_key(&allowed) {
        return Err(format!("unknown parameter '{k}'"));
    }
    let server = match kv.get("server") {
        Some(v) => on_off("server", v)?,
        None => false,
    };
    let mut reconnect = None;
    if let Some(v) = kv.get("reconnect") {
        let s: u64 = v
            .parse()
            .map_err(|_| format!("reconnect: '{v}' is not a number of seconds"))?;
        reconnect = (s > 0).then(|| Duration::from_secs(s));
    }
    if let Some(v) = kv.get("reconnect-ms") {
        if kv.get("reconnect").is_some() {
            return Err("reconnect-ms: cannot be used with reconnect".into());
        }
        let ms: u64 = v
            .parse()
            .map_err(|_| format!("reconnect-ms: '{v}' is not a number of milliseconds"))?;
        reconnect = (ms > 0).then(|| Duration::from_millis(ms));
    }
    if server && reconnect.is_some() {
        return Err("reconnect: only for clients (server=off)".into());
    }
    let addr = match qapi_addr(kv, "addr")? {
        None => return Err("needs addr.type=inet|unix and its address".into()),
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
pub fn dgram_options(kv: &KeyVal) -> Result<DgramOptions, String> {
    let allowed: Vec<String> = prefixed("local").chain(prefixed("remote")).collect();
    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
    if let Some(k) = kv.unknown_key(&allowed) {
        return Err(format!("unknown parameter '{k}'"));
    }
    let local = qapi_addr(kv, "local")?;
    let Some(remote) = qapi_addr(kv, "remote")? else {
        return Err(
            "needs remote.type=inet|unix and its address (a local-only fd socket is not supported)"
                .into(),
        );
    };
    match remote {
        QapiAddr::Inet { host, port } => {
            let r = inet_addrs("remote.host", &host, port)?[0];
            if let SocketAddr::V4(g) = r {
                if g.ip().is_multicast() {
                    let localaddr = match local {
                        None => None,
                        Some(QapiAddr::Inet { host, .. }) => {
                            Some(host.parse().map_err(|_| {
                                format!("local.host: '{host}' is not an IPv4 address")
                            })?)
                        }
                        Some(QapiAddr::Unix(_)) => {
                            return Err("local.type: must be inet with an inet remote".into())
                        }
                    };
                    return Ok(DgramOptions::Mcast {
                        group: g,
                        localaddr,
                    });
                }
            }
            match local {
                None => Err("remote.type=inet (not multicast) needs local.type=inet too".into()),
                Some(QapiAddr::Unix(_)) => {
                    Err("local.type: must be inet with an inet remote".into())
                }
                Some(QapiAddr::Inet { host, port }) => {
                    let l = inet_addrs("local.host", &host, port)?
                        .into_iter()
                        .find(|a| a.is_ipv4() == r.is_ipv4())
                        .ok_or("local.host: not of the same IP version as remote.host")?;
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
            Some(QapiAddr::Inet { .. }) => {
                Err("local.type: must be unix with a unix remote".into())
            }
            None => Err("remote.type=unix needs local.type=unix,local.path=PATH".into()),
        },
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

    fn kv(s: &str) -> KeyVal {
        if s.is_empty() {
            return KeyVal::default();
        }
        KeyVal::parse(s, None).unwrap()
    }

    /// Every error is one line that names `key`.
    fn check_errors<T: std::fmt::Debug>(
        f: impl Fn(&KeyVal) -> Result<T, String>,
        cases: &[(&str, &str)],
    ) {
        for (s, key) in cases {
            let e = f(&kv(s)).unwrap_err();
            assert!(e.contains(key), "{s}: '{e}' does not name {key}");
            assert!(!e.contains('\n'), "{s}: '{e}' is not one line");
        }
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

    fn spec(kind: &str, opts: &str) -> NetdevSpec {
        NetdevSpec {
            id: "n0".into(),
            kind: kind.into(),
            opts: kv(opts),
        }
    }

    #[test]
    fn open_errors_name_the_netdev_and_fit_one_line() {
        for (kind, opts, key) in [
            (
                "vde",
                "sock=/nonexistent/nicvm-sw",
                "/nonexistent/nicvm-sw/ctl",
            ),
            ("vde", "bogus=1", "bogus"),
            ("socket", "connect=127.0.0.1:1", "127.0.0.1:1"),
            (
                "stream",
                "addr.type=unix,addr.path=/nonexistent/nicvm.sock",
                "nicvm.sock",
            ),
            ("dgram", "remote.type=unix,remote.path=/x", "local.type"),
        ] {
            let e = open(&spec(kind, opts), false).err().unwrap();
            assert!(e.starts_with(&format!("-netdev {kind},id=n0: ")), "{e}");
            assert!(e.contains(key), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn open_a_unix_stream_pair_and_a_dgram_pair() {
        let dir = std::env::temp_dir().join(format!("nicvm-netdev-test.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let p = dir.join("s.sock");
        let server = open(
            &spec(
                "stream",
                &format!("server=on,addr.type=unix,addr.path={}", p.display()),
            ),
            true,
        )
        .unwrap();
        assert!(!server.backend.capabilities().vnet_hdr);
        let client = open(
            &spec(
                "stream",
                &format!("addr.type=unix,addr.path={}", p.display()),
            ),
            true,
        )
        .unwrap();
        assert!(
            client.label.starts_with("stream:connect=unix:"),
            "{}",
            client.label
        );
        let t0 = std::time::Instant::now();
        while !server.backend.link_up() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(server.backend.link_up() && client.backend.link_up());
        let (a, b) = (dir.join("a"), dir.join("b"));
        let d = open(
            &spec(
                "dgram",
                &format!(
                    "local.type=unix,local.path={},remote.type=unix,remote.path={}",
                    a.display(),
                    b.display()
                ),
            ),
            false,
        )
        .unwrap();
        assert!(d.backend.link_up());
        drop((server, client, d));
        assert!(!p.exists() && !a.exists(), "socket files are removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
