//! Typed netdev configuration in, a backend out: taps (with their scripts), libslirp, VDE,
//! stream and datagram sockets.

use super::guard::{NetdevGuard, RemoveDir, SocketFile};
use super::script::{self, DownScript, ScriptError, DEFAULT_IFDOWN, DEFAULT_IFUP};
use crate::config::{Backend, NetdevConfig, SocketKind, TapDevice, TapOptions};
use net_backends::dgram::{DgramBackend, DgramError, DgramOptions};
use net_backends::slirp::{SlirpBackend, SlirpError};
use net_backends::stream::{StreamBackend, StreamError, StreamOptions};
use net_backends::tap::{Tap, TapError};
use net_backends::vde::{Vde, VdeError, VdeOptions};
use net_backends::NetBackend;
use std::path::Path;

pub struct Opened {
    pub backend: Box<dyn NetBackend>,
    /// A multiqueue tap's other queues (`queues=N`: N - 1 of them).
    pub more_queues: Vec<Box<dyn NetBackend>>,
    /// What to call it in messages (the tap's name, ...).
    pub label: String,
    /// What `info network` says of it after its type, as QEMU does (a tap's
    /// `ifname=,script=,downscript=`, or `fd=`); None: what the configuration says.
    pub info: Option<String>,
    /// Undoes what opening did; keep it until the VM has ended.
    pub guard: NetdevGuard,
}

/// A netdev that could not be opened: `-netdev tap,id=n0: ifname=tap0: busy (...)`.
#[derive(Debug, thiserror::Error)]
#[error("{option}: {error}")]
pub struct OpenError {
    /// The option the netdev came from.
    pub option: String,
    #[source]
    pub error: OpenErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenErrorKind {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("script: {0}")]
    Script(#[from] ScriptError),
    #[error(transparent)]
    Vde(#[from] VdeError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Dgram(#[from] DgramError),
    #[error(transparent)]
    Slirp(#[from] SlirpError),
    #[error(transparent)]
    Bridge(#[from] super::bridge::BridgeError),
}

/// Opens the backend `nd` describes. Call it at most once per netdev: a tap `fd=` is taken
/// over.
pub fn open(nd: &NetdevConfig) -> Result<Opened, OpenError> {
    let kind = nd.backend.kind();
    match &nd.backend {
        Backend::Tap(o) => open_tap(o),
        Backend::User(o) => SlirpBackend::new(o.clone())
            .map(|b| Opened {
                backend: Box::new(b),
                more_queues: vec![],
                label: "user".into(),
                info: None,
                guard: NetdevGuard::default(),
            })
            .map_err(OpenErrorKind::Slirp),
        Backend::Vde(o) => open_vde(o),
        Backend::Stream(o) | Backend::Socket(SocketKind::Stream(o)) => open_stream(kind, o),
        Backend::Dgram(o) | Backend::Socket(SocketKind::Dgram(o)) => open_dgram(kind, o),
        Backend::Bridge(o) => open_bridge(o),
    }
    .map_err(|error| OpenError {
        option: nd.option.clone(),
        error,
    })
}

/// A tap carries a virtio-net header unless `vnet_hdr=off` (an `fd=` keeps the one it was
/// opened with): every model hands it checksum and segmentation offloads through the header
/// (virtio-net passes the guest's on; e1000 and rtl8139 C+ fill one in).
fn open_tap(o: &TapOptions) -> Result<Opened, OpenErrorKind> {
    let mut taps = match &o.device {
        // SAFETY: the CLI checked that nicvm inherited each descriptor (none is nicvm's own),
        // that each is named once, by this netdev only; a netdev is opened once.
        TapDevice::Fds { key, fds } => unsafe { Tap::from_queue_fds(key, fds, o.vnet_hdr) }?,
        TapDevice::Ifname(name) => {
            Tap::open_queues(name.as_deref().unwrap_or(""), o.vnet_hdr, o.queues)?
        }
    };
    let tap = taps.remove(0);
    let more_queues = taps
        .into_iter()
        .map(|t| Box::new(t) as Box<dyn NetBackend>)
        .collect();
    let name = tap.name().to_string();
    let passed_in = matches!(o.device, TapDevice::Fds { .. });
    match script::resolve(&o.script, DEFAULT_IFUP) {
        Some(up) => {
            if let Err(e) = script::run_in_setup(&up, &name) {
                // Killed by an exit signal: what it did so far is undone as at any exit (QEMU
                // lets it finish, and runs the downscript as it ends).
                if matches!(e, script::ScriptError::Interrupted { .. }) {
                    if let Some(d) = script::resolve(&o.downscript, DEFAULT_IFDOWN) {
                        drop(DownScript::new(d, name.clone()));
                    }
                }
                return Err(e.into());
            }
        }
        None if passed_in && !tap_is_up(&name) => log::warn!(
            "tap {name} ({}): it is down on the host; whoever opened it brings it up \
             (ip link set {name} up)",
            match &o.device {
                TapDevice::Fds { key, fds } => format!(
                    "{key}={}",
                    fds.iter()
                        .map(|fd| fd.to_string())
                        .collect::<Vec<_>>()
                        .join(":")
                ),
                TapDevice::Ifname(_) => String::new(),
            }
        ),
        None if !tap_is_up(&name) => log::warn!(
            "tap {name}: no ifup script ran ({}), so the tap stays down on the host; \
             bring it up yourself (ip link set {name} up) or give script=",
            if o.script == crate::config::Script::No {
                "script=no".to_string()
            } else {
                format!("neither of {} exists", DEFAULT_IFUP.join(", "))
            }
        ),
        None => {}
    }
    let downscript =
        script::resolve(&o.downscript, DEFAULT_IFDOWN).map(|s| DownScript::new(s, name.clone()));
    let info = match &o.device {
        TapDevice::Fds { fds, .. } => format!("fd={}", fds[0]),
        TapDevice::Ifname(_) => {
            let shown = |s: &crate::config::Script, defaults: &[&str]| {
                script::resolve(s, defaults).map_or("no".to_string(), |p| p.display().to_string())
            };
            format!(
                "ifname={name},script={},downscript={}",
                shown(&o.script, DEFAULT_IFUP),
                shown(&o.downscript, DEFAULT_IFDOWN)
            )
        }
    };
    Ok(Opened {
        backend: Box::new(tap),
        more_queues,
        label: name,
        info: Some(info),
        guard: NetdevGuard {
            downscript,
            ..Default::default()
        },
    })
}

/// A tap of the VM's own on a host bridge: no scripts (the bridge is the set-up), nothing to
/// undo (the tap goes when nicvm closes it).
fn open_bridge(o: &crate::config::BridgeOptions) -> Result<Opened, OpenErrorKind> {
    let (tap, by) = super::bridge::open(o)?;
    let name = tap.name().to_string();
    log::info!(
        "-netdev bridge: tap {name} on bridge {} (made by {by})",
        o.br
    );
    let info = match &o.helper {
        Some(h) => format!("helper={h},br={}", o.br),
        None => format!("ifname={name},br={}", o.br),
    };
    Ok(Opened {
        backend: Box::new(tap),
        more_queues: vec![],
        label: name,
        info: Some(info),
        guard: NetdevGuard::default(),
    })
}

/// Whether the interface is administratively up on the host (IFF_UP in sysfs).
fn tap_is_up(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{name}/flags"))
        .ok()
        .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|f| f & libc::IFF_UP as u32 != 0)
}

fn open_vde(o: &VdeOptions) -> Result<Opened, OpenErrorKind> {
    let v = Vde::open(o)?;
    let label = match &o.sock {
        Some(p) => format!("vde:{}[{}]", p.display(), v.port()),
        None => format!("vde[{}]", v.port()),
    };
    let dir = RemoveDir(v.private_dir().to_path_buf());
    Ok(Opened {
        backend: Box::new(v),
        more_queues: vec![],
        label,
        info: None,
        guard: NetdevGuard {
            dir: Some(dir),
            ..Default::default()
        },
    })
}

fn socket_guard(bound: Option<&Path>) -> NetdevGuard {
    NetdevGuard {
        socket: bound.and_then(SocketFile::record),
        ..Default::default()
    }
}

fn open_stream(kind: &str, o: &StreamOptions) -> Result<Opened, OpenErrorKind> {
    let b = StreamBackend::new(o)?;
    let side = if o.server { "listen=" } else { "connect=" };
    Ok(Opened {
        more_queues: vec![],
        label: format!("{kind}:{side}{}", o.addr),
        info: None,
        guard: socket_guard(b.socket_path()),
        backend: Box::new(b),
    })
}

fn open_dgram(kind: &str, o: &DgramOptions) -> Result<Opened, OpenErrorKind> {
    let b = DgramBackend::new(o)?;
    let what = match o {
        DgramOptions::Udp { local, remote } => format!("{local}->{remote}"),
        DgramOptions::Mcast { group, .. } => format!("mcast={group}"),
        DgramOptions::Unix { local, remote } => {
            format!("{}->{}", local.display(), remote.display())
        }
    };
    Ok(Opened {
        more_queues: vec![],
        label: format!("{kind}:{what}"),
        info: None,
        guard: socket_guard(b.socket_path()),
        backend: Box::new(b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::netdev::{backend, header};
    use crate::config::InheritedFds;
    use crate::keyval::KeyVal;
    use crate::netdev::script::tests::{logging_script, temp_dir};
    use std::time::Duration;

    /// `-netdev SPEC` as the CLI would make it, with `fds` inherited.
    fn netdev_with(spec: &str, fds: &InheritedFds) -> NetdevConfig {
        let mut kv = KeyVal::parse(spec, Some("type")).unwrap();
        let (ty, id) = header(&mut kv, true).unwrap();
        NetdevConfig {
            option: format!("-netdev {},id={id}", ty.name()),
            backend: backend(ty, &id, &kv, fds).unwrap(),
            id,
            hub: None,
        }
    }

    fn netdev(spec: &str) -> NetdevConfig {
        netdev_with(spec, &InheritedFds::default())
    }

    #[test]
    fn open_errors_name_the_netdev_and_fit_one_line() {
        for (spec, key) in [
            (
                "vde,id=n0,sock=/nonexistent/nicvm-sw",
                "/nonexistent/nicvm-sw/ctl",
            ),
            ("socket,id=n0,connect=127.0.0.1:1", "127.0.0.1:1"),
            (
                "stream,id=n0,addr.type=unix,addr.path=/nonexistent/nicvm.sock",
                "nicvm.sock",
            ),
        ] {
            let nd = netdev(spec);
            let e = open(&nd).err().unwrap().to_string();
            let kind = spec.split(',').next().unwrap();
            assert!(e.starts_with(&format!("-netdev {kind},id=n0: ")), "{e}");
            assert!(e.contains(key), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn open_a_unix_stream_pair_and_a_dgram_pair() {
        let dir = temp_dir("netdev-test");
        let p = dir.join("s.sock");
        let mut server = open(&netdev(&format!(
            "stream,id=s,server=on,addr.type=unix,addr.path={}",
            p.display()
        )))
        .unwrap();
        assert!(!server.backend.capabilities().vnet_hdr);
        let client = open(&netdev(&format!(
            "stream,id=c,addr.type=unix,addr.path={}",
            p.display()
        )))
        .unwrap();
        assert!(
            client.label.starts_with("stream:connect=unix:"),
            "{}",
            client.label
        );
        let t0 = std::time::Instant::now();
        while !server.backend.link_up() && t0.elapsed() < Duration::from_secs(5) {
            // The server accepts when the I/O thread reports its listening socket ready.
            let mut fds = vec![];
            server.backend.watch(true, false, &mut fds);
            for (fd, _) in fds {
                server.backend.ready(fd, net_backends::EventSet::IN);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(server.backend.link_up() && client.backend.link_up());
        let (a, b) = (dir.join("a"), dir.join("b"));
        let d = open(&netdev(&format!(
            "dgram,id=d,local.type=unix,local.path={},remote.type=unix,remote.path={}",
            a.display(),
            b.display()
        )))
        .unwrap();
        assert!(d.backend.link_up());
        drop((server, client, d));
        assert!(!p.exists() && !a.exists(), "socket files are removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// At exit the backends are still alive (their NIC models' threads hold them): the guard
    /// alone removes what they left.
    #[test]
    fn the_guard_removes_socket_files_while_the_backend_lives() {
        let dir = temp_dir("guard-test");
        let p = dir.join("g.sock");
        let Opened { backend, guard, .. } = open(&netdev(&format!(
            "stream,id=s,server=on,addr.type=unix,addr.path={}",
            p.display()
        )))
        .unwrap();
        assert!(p.exists());
        drop(guard);
        assert!(!p.exists(), "the guard removed the socket file");
        // A file someone else put there since is not ours to remove.
        std::fs::write(&p, b"not ours").unwrap();
        drop(backend);
        assert!(p.exists(), "a replaced file stays");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Runs `f` on a thread in a network namespace of its own (gone when the thread ends,
    /// also when `f` fails); None when this host cannot make one.
    fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare affects this thread only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("SKIPPED: no network namespace");
                return None;
            }
            if !Path::new("/dev/net/tun").exists() {
                eprintln!("SKIPPED: no /dev/net/tun");
                return None;
            }
            Some(f())
        })
        .join()
        .expect("the namespace thread failed")
    }

    /// A tap nicvm creates: the up script runs with its name at open, the downscript when
    /// the guard is dropped (the backend still alive, as at nicvm's exit).
    #[test]
    fn a_created_tap_runs_its_scripts_and_the_guard_runs_the_downscript() {
        let dir = temp_dir("tap-scripts-test");
        let (up_log, down_log) = (dir.join("up.log"), dir.join("down.log"));
        let up = logging_script(&dir, "up", &up_log, 0);
        let down = logging_script(&dir, "down", &down_log, 0);
        let spec = format!(
            "tap,id=t,script={},downscript={}",
            up.display(),
            down.display()
        );
        let logs = (up_log.clone(), down_log.clone());
        let r = in_netns(move || {
            let Opened {
                backend,
                label,
                info,
                guard,
                ..
            } = open(&netdev(&spec)).unwrap();
            assert!(
                backend.capabilities().vnet_hdr,
                "a created tap carries a virtio-net header"
            );
            assert_eq!(
                std::fs::read_to_string(&logs.0).unwrap(),
                format!("{label}\n")
            );
            assert!(!logs.1.exists(), "no downscript yet");
            assert!(
                info.as_deref()
                    .is_some_and(|i| i.starts_with(&format!("ifname={label},script="))),
                "{info:?}"
            );
            drop(guard);
            assert_eq!(
                std::fs::read_to_string(&logs.1).unwrap(),
                format!("{label}\n")
            );
            drop(backend);
        });
        std::fs::remove_dir_all(&dir).unwrap();
        let _ = r;
    }

    /// A tap opened with IFF_VNET_HDR by someone else, handed over as fd=: it keeps the
    /// header unless vnet_hdr=off hides it.
    #[test]
    fn a_tap_fd_with_a_vnet_header() {
        in_netns(|| {
            // A name each: a tap closed here can stay attached a moment longer through a
            // child another test thread is forking.
            for (name, opt, seen) in [("nvf0", ",vnet_hdr=off", false), ("nvf1", "", true)] {
                let fd = vnet_tap_fd(name);
                let nd = netdev_with(
                    &format!("tap,id=t,fd={fd},script=no,downscript=no{opt}"),
                    &InheritedFds::from_fds([fd]),
                );
                let o = open(&nd).unwrap();
                assert_eq!(o.label, name);
                assert_eq!(o.backend.capabilities().vnet_hdr, seen, "{opt}");
            }
            let f = std::fs::File::open("/dev/null").unwrap();
            let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
            let nd = netdev_with(
                &format!("tap,id=t,fd={fd},script=no,downscript=no"),
                &InheritedFds::from_fds([fd]),
            );
            let e = open(&nd).err().unwrap().to_string();
            assert!(
                e.starts_with(&format!("-netdev tap,id=t: fd={fd}: not an open tap")),
                "{e}"
            );
        });
    }

    /// A new tap opened with IFF_VNET_HDR; the descriptor is the caller's to hand over.
    fn vnet_tap_fd(name: &str) -> std::os::fd::RawFd {
        use std::os::fd::IntoRawFd;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        // SAFETY: ifreq is plain data; all zeroes is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and updates the ifreq we own.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                libc::TUNSETIFF,
                &mut req,
            )
        };
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        f.into_raw_fd()
    }
}
