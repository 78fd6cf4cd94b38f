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

use crate::sys::{self, RawAddr, SocketFile};
use crate::{Capabilities, NetBackend};
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

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

pub struct DgramBackend {
    fd: OwnedFd,
    remote: RawAddr,
    /// Unix: connected to `remote` (see the module docs).
    unix_connected: Option<bool>,
    dropped: u64,
    label: String,
    _file: Option<SocketFile>,
}

impl DgramBackend {
    pub fn new(o: &DgramOptions) -> Result<DgramBackend, String> {
        let io = |what: String| move |e: io::Error| format!("{what}: {e}");
        match o {
            DgramOptions::Udp { local, remote } => {
                if local.is_ipv4() != remote.is_ipv4() {
                    return Err(format!(
                        "{local} and {remote} are not of the same IP version"
                    ));
                }
                let fam = if local.is_ipv4() {
                    libc::AF_INET
                } else {
                    libc::AF_INET6
                };
                let fd = sys::socket(fam, libc::SOCK_DGRAM).map_err(io("socket".into()))?;
                sys::bind(&fd, &RawAddr::inet(*local))
                    .map_err(io(format!("cannot bind {local}")))?;
                Ok(DgramBackend {
                    fd,
                    remote: RawAddr::inet(*remote),
                    unix_connected: None,
                    dropped: 0,
                    label: format!("udp {local} -> {remote}"),
                    _file: None,
                })
            }
            DgramOptions::Mcast { group, localaddr } => {
                if !group.ip().is_multicast() {
                    return Err(format!("{} is not a multicast address", group.ip()));
                }
                let fd =
                    sys::socket(libc::AF_INET, libc::SOCK_DGRAM).map_err(io("socket".into()))?;
                let set = |level, name, v: libc::c_int, what: &str| {
                    sys::setsockopt(&fd, level, name, v).map_err(io(what.into()))
                };
                set(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR")?;
                sys::bind(&fd, &RawAddr::inet(SocketAddr::V4(*group)))
                    .map_err(io(format!("cannot bind {group}")))?;
                let ifaddr = localaddr.unwrap_or(Ipv4Addr::UNSPECIFIED);
                let mreq = libc::ip_mreq {
                    imr_multiaddr: libc::in_addr {
                        s_addr: u32::from(*group.ip()).to_be(),
                    },
                    imr_interface: libc::in_addr {
                        s_addr: u32::from(ifaddr).to_be(),
                    },
                };
                sys::setsockopt(&fd, libc::IPPROTO_IP, libc::IP_ADD_MEMBERSHIP, mreq)
                    .map_err(io(format!("cannot join {} on {ifaddr}", group.ip())))?;
                set(
                    libc::IPPROTO_IP,
                    libc::IP_MULTICAST_LOOP,
                    1,
                    "IP_MULTICAST_LOOP",
                )?;
                if let Some(a) = localaddr {
                    let ia = libc::in_addr {
                        s_addr: u32::from(*a).to_be(),
                    };
                    sys::setsockopt(&fd, libc::IPPROTO_IP, libc::IP_MULTICAST_IF, ia)
                        .map_err(io(format!("localaddr={a}")))?;
                }
                Ok(DgramBackend {
                    fd,
                    remote: RawAddr::inet(SocketAddr::V4(*group)),
                    unix_connected: None,
                    dropped: 0,
                    label: format!("mcast {group}"),
                    _file: None,
                })
            }
            DgramOptions::Unix { local, remote } => {
                let fd =
                    sys::socket(libc::AF_UNIX, libc::SOCK_DGRAM).map_err(io("socket".into()))?;
                let la = RawAddr::unix(local).map_err(|e| e.to_string())?;
                let ra = RawAddr::unix(remote).map_err(|e| e.to_string())?;
                sys::unlink_stale_socket(local)
                    .map_err(io(format!("cannot bind {}", local.display())))?;
                sys::bind(&fd, &la).map_err(io(format!("cannot bind {}", local.display())))?;
                let file = SocketFile::record(local).map_err(|e| e.to_string())?;
                let _ = sys::setsockopt(&fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 1i32 << 20);
                Ok(DgramBackend {
                    fd,
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
        // SAFETY: sockaddr_storage is plain old data; all zeroes is valid.
        let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: getsockname writes at most `len` bytes into `st` and updates `len`.
        let r = unsafe {
            libc::getsockname(
                self.fd.as_raw_fd(),
                (&mut st as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return None;
        }
        match st.ss_family as libc::c_int {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in (family AF_INET) into `st`, which is
                // large and aligned enough for it.
                let s =
                    unsafe { *(&st as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr))),
                    u16::from_be(s.sin_port),
                ))
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for sockaddr_in6.
                let s =
                    unsafe { *(&st as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                Some(SocketAddr::new(
                    IpAddr::V6(s.sin6_addr.s6_addr.into()),
                    u16::from_be(s.sin6_port),
                ))
            }
            _ => None,
        }
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
        let fd = self.fd.as_raw_fd();
        if self.unix_connected == Some(false) {
            if let Err(e) = sys::connect(&self.fd, &self.remote) {
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
        match sys::send_iov(fd, frame, to) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            Err(e) => {
                if self.unix_connected == Some(true)
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNREFUSED | libc::ENOTCONN | libc::ECONNRESET)
                    )
                {
                    let _ = sys::disconnect(&self.fd);
                    self.unix_connected = Some(false);
                }
                self.drop_frame(&e);
                Ok(())
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // A queued error (ICMP port unreachable, a peer gone) is consumed, not a frame.
        sys::recv_frame(self.fd.as_raw_fd(), buf)
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }
}
