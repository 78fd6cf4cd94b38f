//! Frames as datagrams, one frame per datagram with no header, as QEMU's
//! `-netdev socket,mcast=|udp=` and `-netdev dgram` send them: UDP unicast, IPv4 UDP
//! multicast, and Unix datagram sockets.
//!
//! The backend's fd is the socket itself. There is no connection, so the link is always up;
//! a frame the peer cannot take (a Unix peer not there yet or gone, an unreachable UDP port)
//! is dropped and counted.
//!
//! - UDP unicast: bound to the local address, sends to the remote one, takes datagrams from
//!   anyone (as QEMU does).
//! - Multicast: bound to GROUP:PORT with SO_REUSEADDR, a member of GROUP on `localaddr`'s
//!   interface (or the default one), loopback on, so every process on the host bound to the
//!   group sees every frame, its own included (QEMU does not filter them either; a guest
//!   ignores its own frames). TTL stays the kernel's default of 1.
//! - Unix: bound to the local path (a stale socket there is replaced; the file is removed
//!   with the backend if it is still ours). The socket is connected to the remote path on
//!   the first send that finds it, so a peer that cannot keep up makes `send` return
//!   WouldBlock and the fd turn writable when it catches up; a peer that went away
//!   (ECONNREFUSED) is let go and looked up again by the next send.
//!
//! Not covered: IPv6 multicast, QEMU's `fd=` sockets, abstract Unix addresses.

use crate::sys::{self, SocketFile};
use crate::{Capabilities, NetBackend};
use socket2::{Domain, SockAddr, Socket, Type};
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DgramOptions {
    Udp {
        local: SocketAddr,
        remote: SocketAddr,
    },
    Mcast {
        group: SocketAddrV4,
        localaddr: Option<Ipv4Addr>,
    },
    Unix {
        local: PathBuf,
        remote: PathBuf,
    },
}

/// Why a datagram backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DgramError {
    #[error("{local} and {remote} are not of the same IP version")]
    IpVersions {
        local: SocketAddr,
        remote: SocketAddr,
    },
    #[error("{0} is not a multicast address")]
    NotMulticast(IpAddr),
    /// `what` failed: "cannot bind 127.0.0.1:5555", "SO_REUSEADDR", ...
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// A Unix path that cannot be a socket address.
    #[error("{}: {source}", .path.display())]
    Path { path: PathBuf, source: io::Error },
}

pub struct DgramBackend {
    sock: Socket,
    remote: SockAddr,
    /// Unix: connected to `remote` (see the module docs).
    unix_connected: Option<bool>,
    dropped: u64,
    label: String,
    _file: Option<SocketFile>,
}

impl DgramBackend {
    pub fn new(o: &DgramOptions) -> Result<DgramBackend, DgramError> {
        let io = |what: String| move |source: io::Error| DgramError::Io { what, source };
        let socket = |d: Domain| {
            Socket::new(d, Type::DGRAM.nonblocking(), None).map_err(io("socket".into()))
        };
        match o {
            DgramOptions::Udp { local, remote } => {
                if local.is_ipv4() != remote.is_ipv4() {
                    return Err(DgramError::IpVersions {
                        local: *local,
                        remote: *remote,
                    });
                }
                let sock = socket(Domain::for_address(*local))?;
                sock.bind(&(*local).into())
                    .map_err(io(format!("cannot bind {local}")))?;
                Ok(DgramBackend {
                    sock,
                    remote: (*remote).into(),
                    unix_connected: None,
                    dropped: 0,
                    label: format!("udp {local} -> {remote}"),
                    _file: None,
                })
            }
            DgramOptions::Mcast { group, localaddr } => {
                if !group.ip().is_multicast() {
                    return Err(DgramError::NotMulticast(IpAddr::V4(*group.ip())));
                }
                let sock = socket(Domain::IPV4)?;
                sock.set_reuse_address(true)
                    .map_err(io("SO_REUSEADDR".into()))?;
                sock.bind(&SocketAddr::V4(*group).into())
                    .map_err(io(format!("cannot bind {group}")))?;
                let ifaddr = localaddr.unwrap_or(Ipv4Addr::UNSPECIFIED);
                sock.join_multicast_v4(group.ip(), &ifaddr)
                    .map_err(io(format!("cannot join {} on {ifaddr}", group.ip())))?;
                sock.set_multicast_loop_v4(true)
                    .map_err(io("IP_MULTICAST_LOOP".into()))?;
                if let Some(a) = localaddr {
                    sock.set_multicast_if_v4(a)
                        .map_err(io(format!("localaddr={a}")))?;
                }
                Ok(DgramBackend {
                    sock,
                    remote: SocketAddr::V4(*group).into(),
                    unix_connected: None,
                    dropped: 0,
                    label: format!("mcast {group}"),
                    _file: None,
                })
            }
            DgramOptions::Unix { local, remote } => {
                let path_error = |path: &Path| {
                    let path = path.to_path_buf();
                    move |source| DgramError::Path { path, source }
                };
                let la = sys::unix_addr(local).map_err(path_error(local))?;
                let ra = sys::unix_addr(remote).map_err(path_error(remote))?;
                let sock = socket(Domain::UNIX)?;
                let bind = || format!("cannot bind {}", local.display());
                sys::unlink_stale_socket(local).map_err(io(bind()))?;
                sock.bind(&la).map_err(io(bind()))?;
                let file = SocketFile::record(local).map_err(io(bind()))?;
                let _ = sock.set_send_buffer_size(1 << 20);
                Ok(DgramBackend {
                    sock,
                    remote: ra,
                    unix_connected: Some(false),
                    dropped: 0,
                    label: format!("unix {} -> {}", local.display(), remote.display()),
                    _file: Some(file),
                })
            }
        }
    }

    /// The Unix socket file this backend bound (removed when it is dropped, if still ours).
    pub fn socket_path(&self) -> Option<&std::path::Path> {
        self._file.as_ref().map(|f| f.path())
    }

    /// The bound address of an IP socket (to learn the port when 0 was asked for).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.sock.local_addr().ok()?.as_socket()
    }

    fn drop_frame(&mut self, e: &io::Error) {
        self.dropped += 1;
        if self.dropped.is_power_of_two() {
            log::debug!(
                "dgram {}: dropped a frame ({e}); {} so far",
                self.label,
                self.dropped
            );
        }
    }
}

impl NetBackend for DgramBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<()> {
        if self.unix_connected == Some(false) {
            if let Err(e) = self.sock.connect(&self.remote) {
                // Not there (yet), or still tied to a dead peer: the frame is lost.
                self.drop_frame(&e);
                return Ok(());
            }
            self.unix_connected = Some(true);
        }
        let to = if self.unix_connected.is_some() {
            None
        } else {
            Some(&self.remote)
        };
        match sys::send(&self.sock, frame, to) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            Err(e) => {
                if self.unix_connected == Some(true)
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNREFUSED | libc::ENOTCONN | libc::ECONNRESET)
                    )
                {
                    let _ = sys::disconnect(&self.sock);
                    self.unix_connected = Some(false);
                }
                self.drop_frame(&e);
                Ok(())
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // A queued error (ICMP port unreachable, a peer gone) is consumed, not a frame.
        sys::recv_frame(&self.sock, buf)
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }
}
