//! VDE switches (`-netdev vde,sock=DIR,port=N,group=G,mode=OCTAL`), spoken to natively: no
//! libvdeplug.
//!
//! The protocol, as vde_switch 2.x implements it (facts from vde2's libvdeplug and
//! datasock.c):
//! - A `SOCK_STREAM` control connection to `DIR/ctl`. Without `sock=`, the places libvdeplug
//!   tries: `$HOME/.vde2/default.switch/ctl`, `$HOME/.vde2/stdsock/ctl` when those exist,
//!   then `/var/run/vde.ctl/ctl`, `/tmp/vde.ctl/ctl` and `/tmp/vde.ctl` (see
//!   [`ctl_candidates`]). vde_switch's own default `-s` is `/var/run/vde.ctl` as root and
//!   `/tmp/vde.ctl` otherwise, so both are covered.
//! - One request on it, in host byte order, packed: magic `0xfeedface` (u32), version 3
//!   (u32), request type (u32: `port << 8`, where port 0 lets the switch choose), the
//!   `sockaddr_un` of our bound datagram socket (110 bytes), and a description (no NUL).
//! - The switch connects a datagram socket of its own to ours, binds it at `DIR/NNN.FD`
//!   (NNN the port number) and writes that `sockaddr_un` back on the control connection.
//! - Frames then travel one per datagram between the two datagram sockets; ours is
//!   `connect()`ed to the switch's, so a full switch queue shows as "not writable". The port
//!   lives as long as the control connection: closing it frees the port.
//!
//! Our datagram socket lives in a private directory under `$TMPDIR` (or /tmp), created 0700
//! and removed with the backend. `mode=` (default 0700) and `group=` set the socket's
//! permissions and group as libvdeplug does, including its rule for switches owned by
//! another (non-root) user without `mode`/`group`: the socket takes the switch's group and
//! group access, or everyone's access when that chown fails. The private directory gets the
//! matching search (x) bits so such a switch can reach the socket.
//!
//! **The switch going away.** A monitor thread waits on the control connection. EOF or an
//! error there, or ECONNREFUSED/ENOTCONN/ENOENT when sending a frame, takes the link down:
//! [`NetBackend::link_up`] turns false, one warning is logged, and frames sent meanwhile are
//! dropped and counted in [`NetBackend::dropped`]. The fd the I/O thread watches stays our
//! datagram socket, which is never readable without a frame, so nothing spins. While down,
//! the monitor thread tries the whole handshake again once a second (driven by its own poll
//! timeout, not by the guest's sends: a guest whose NIC shows no carrier sends nothing); when
//! it succeeds the link is up again, with one info message. Each change of link state also
//! makes the fd readable once (an empty datagram to ourselves, skipped by `recv`), so a NIC
//! model hears of it through a backend event without polling.
//!
//! Not covered: libvdeplug's other plug kinds (`vde://` URLs, point-to-point `sock[]`, UDP
//! `->` specs, the management port request type), and the pre-directory "ctl socket given
//! directly" fallback when `sock=` names a socket rather than a directory.

use crate::link::{Helper, Link};
use crate::sys::{self, RawAddr};
use crate::{Capabilities, NetBackend};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SWITCH_MAGIC: u32 = 0xfeed_face;
const VERSION: u32 = 3;
/// Longest description the switch keeps (libvdeplug's MAXDESCR, less its NUL).
const MAX_DESCR: usize = 127;
/// How often the monitor retries a switch that went away.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How long a handshake may wait for the switch's answer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Control sockets libvdeplug falls back to when no `sock=` is given.
pub const DEFAULT_CTL_PATHS: [&str; 3] =
    ["/var/run/vde.ctl/ctl", "/tmp/vde.ctl/ctl", "/tmp/vde.ctl"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdeOptions {
    /// The switch's directory (`sock=`); None: the defaults in [`ctl_candidates`].
    pub sock: Option<PathBuf>,
    /// The switch port to ask for; 0 lets the switch choose.
    pub port: u32,
    /// Group owner for our datagram socket (a name or a number).
    pub group: Option<String>,
    /// Permissions of our datagram socket.
    pub mode: u32,
    /// How the switch lists us (`port/print`).
    pub description: String,
}

impl Default for VdeOptions {
    fn default() -> Self {
        VdeOptions {
            sock: None,
            port: 0,
            group: None,
            mode: 0o700,
            description: "nicvm".into(),
        }
    }
}

/// Control socket paths to try, in order: `sock/ctl`, or libvdeplug's defaults.
pub fn ctl_candidates(sock: Option<&Path>) -> Vec<PathBuf> {
    if let Some(s) = sock {
        return vec![s.join("ctl")];
    }
    let mut v = vec![];
    if let Some(home) = std::env::var_os("HOME") {
        for std in [".vde2/default.switch", ".vde2/stdsock"] {
            let p = Path::new(&home).join(std);
            if std::fs::symlink_metadata(&p).is_ok() {
                v.push(p.join("ctl"));
                break;
            }
        }
    }
    v.extend(DEFAULT_CTL_PATHS.iter().map(PathBuf::from));
    v
}

/// A private directory removed (with what is left in it) when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> io::Result<PrivateDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        for _ in 0..100 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let p = base.join(format!(
                "nicvm-vde.{}.{}.{nanos:x}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&p) {
                Ok(()) => return Ok(PrivateDir(p)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free private directory name",
        ))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Vde {
    // Dropped first: the monitor thread stops before the socket it uses closes.
    _monitor: Helper,
    /// Our datagram socket, connected to the switch's port socket while the link is up.
    data: Arc<OwnedFd>,
    data_path: PathBuf,
    link: Arc<Link>,
    port: u32,
    // Dropped last: the directory holding `data_path`.
    _dir: PrivateDir,
}

fn group_id(g: &str) -> Result<libc::gid_t, String> {
    let c = std::ffi::CString::new(g).map_err(|_| format!("group: '{g}' is not a group"))?;
    // SAFETY: `group` is plain old data; getgrnam_r fills it.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut res: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is to a live object of the type and size declared; the strings
    // getgrnam_r points into `buf` are not used.
    let r =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut res) };
    if r == 0 && !res.is_null() {
        return Ok(grp.gr_gid);
    }
    g.parse()
        .map_err(|_| format!("group: no group named '{g}'"))
}

/// The request the switch expects, in host byte order.
fn request(port: u32, ours: &Path, description: &str) -> Result<Vec<u8>, String> {
    let RawAddr::Unix(sun) = RawAddr::unix(ours).map_err(|e| e.to_string())? else {
        unreachable!()
    };
    let mut r = Vec::with_capacity(12 + 110 + MAX_DESCR);
    r.extend_from_slice(&SWITCH_MAGIC.to_ne_bytes());
    r.extend_from_slice(&VERSION.to_ne_bytes());
    r.extend_from_slice(&(port << 8).to_ne_bytes());
    r.extend_from_slice(&sun.sun_family.to_ne_bytes());
    r.extend(sun.sun_path.iter().map(|c| *c as u8));
    let d = description.as_bytes();
    r.extend_from_slice(&d[..d.len().min(MAX_DESCR)]);
    Ok(r)
}

/// The switch's answer: the `sockaddr_un` of its datagram socket for our port.
fn parse_reply(b: &[u8]) -> Result<PathBuf, String> {
    let fam = u16::from_ne_bytes([b[0], b[1]]);
    if fam != libc::AF_UNIX as u16 {
        return Err(format!(
            "the switch answered with address family {fam}, not AF_UNIX"
        ));
    }
    let path: Vec<u8> = b[2..].iter().copied().take_while(|c| *c != 0).collect();
    if path.is_empty() {
        return Err("the switch answered with an empty socket path".into());
    }
    use std::os::unix::ffi::OsStrExt;
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&path)))
}

/// The port number in the switch's data socket name (`DIR/NNN.FD`).
fn port_of(switch_sock: &Path) -> u32 {
    switch_sock
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Makes our data socket readable once (an empty datagram, which `recv` skips), so the I/O
/// thread calls the NIC model, which can then look at `link_up()`. Only works while our
/// socket is not connected to a switch socket (the kernel refuses other senders then).
fn nudge(data_path: &Path) {
    if let (Ok(s), Ok(a)) = (
        sys::socket(libc::AF_UNIX, libc::SOCK_DGRAM),
        RawAddr::unix(data_path),
    ) {
        let _ = sys::send_iov(s.as_raw_fd(), &[], Some(&a));
    }
}

/// One handshake: a new control connection, our request, the switch's answer, and our data
/// socket connected to the switch's. Returns the control connection and the port.
fn handshake(
    ctl_path: &Path,
    data: &OwnedFd,
    data_path: &Path,
    port: u32,
    description: &str,
) -> Result<(UnixStream, u32), String> {
    // A datagram socket still associated with a dead switch socket would make the new
    // switch's connect() to us fail with EPERM.
    let _ = sys::disconnect(data);
    let mut ctl =
        UnixStream::connect(ctl_path).map_err(|e| format!("{}: {e}", ctl_path.display()))?;
    let io = |e: io::Error| format!("{}: {e}", ctl_path.display());
    ctl.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
    ctl.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
    ctl.write_all(&request(port, data_path, description)?)
        .map_err(io)?;
    let mut reply = [0u8; std::mem::size_of::<libc::sockaddr_un>()];
    ctl.read_exact(&mut reply).map_err(|e| {
        let hint = if port != 0 {
            format!(" (does it have port {port}?)")
        } else {
            " (no free port, or it cannot reach our socket?)".into()
        };
        match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                format!(
                    "{}: the switch refused the connection{hint}",
                    ctl_path.display()
                )
            }
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                "{}: the switch did not answer within {}s{hint}",
                ctl_path.display(),
                HANDSHAKE_TIMEOUT.as_secs()
            ),
            _ => io(e),
        }
    })?;
    let theirs = parse_reply(&reply)?;
    let addr = RawAddr::unix(&theirs).map_err(|e| e.to_string())?;
    nudge(data_path);
    sys::connect(data, &addr).map_err(|e| format!("{}: {e}", theirs.display()))?;
    ctl.set_nonblocking(true).map_err(io)?;
    Ok((ctl, port_of(&theirs)))
}

impl Vde {
    /// Connects to the switch (failing when none answers) and starts the monitor thread.
    pub fn open(o: &VdeOptions) -> Result<Vde, String> {
        let dir = PrivateDir::new().map_err(|e| {
            format!(
                "cannot create a private directory in {}: {e}",
                std::env::temp_dir().display()
            )
        })?;
        let data_path = dir.0.join("data");
        let data = sys::socket(libc::AF_UNIX, libc::SOCK_DGRAM).map_err(|e| e.to_string())?;
        sys::bind(
            &data,
            &RawAddr::unix(&data_path).map_err(|e| format!("TMPDIR too long: {e}"))?,
        )
        .map_err(|e| format!("{}: {e}", data_path.display()))?;
        // Frames of up to 64 KiB in both directions.
        let _ = sys::setsockopt(&data, libc::SOL_SOCKET, libc::SO_SNDBUF, 1i32 << 20);
        let _ = sys::setsockopt(&data, libc::SOL_SOCKET, libc::SO_RCVBUF, 1i32 << 20);

        let candidates = ctl_candidates(o.sock.as_deref());
        let mut errors = vec![];
        for ctl_path in &candidates {
            if !ctl_path.exists() && o.sock.is_none() {
                continue;
            }
            set_permissions(&dir.0, &data_path, o, ctl_path)?;
            match handshake(ctl_path, &data, &data_path, o.port, &o.description) {
                Ok((ctl, port)) => return Vde::start(dir, data, data_path, ctl, ctl_path, port, o),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            errors.push(format!(
                "no switch found at {}",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Err(format!(
            "cannot connect to a VDE switch: {}",
            errors.join("; ")
        ))
    }

    fn start(
        dir: PrivateDir,
        data: OwnedFd,
        data_path: PathBuf,
        ctl: UnixStream,
        ctl_path: &Path,
        port: u32,
        o: &VdeOptions,
    ) -> Result<Vde, String> {
        let link = Link::new(
            format!("vde {}", ctl_path.display()),
            true,
            format!("it is back (retrying every {}s)", RETRY_INTERVAL.as_secs()),
        )?;
        let data = Arc::new(data);
        let m = Monitor {
            link: link.clone(),
            ctl_path: ctl_path.to_path_buf(),
            data: data.clone(),
            data_path: data_path.clone(),
            port: o.port,
            description: o.description.clone(),
        };
        let monitor = Helper::spawn(&link, "vde-monitor", move || m.run(ctl))?;
        log::debug!("{}: connected on port {port}", link.name);
        Ok(Vde {
            _monitor: monitor,
            data,
            data_path,
            link,
            port,
            _dir: dir,
        })
    }

    /// Where our datagram socket is (inside the private directory).
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// The private directory holding our socket (removed when the backend is dropped).
    pub fn private_dir(&self) -> &Path {
        &self._dir.0
    }

    /// The switch port of the first connection.
    pub fn port(&self) -> u32 {
        self.port
    }
}

/// `mode=`/`group=` on our socket, and the directory's search bits to match.
fn set_permissions(dir: &Path, sock: &Path, o: &VdeOptions, ctl_path: &Path) -> Result<(), String> {
    let mut mode = o.mode & 0o777;
    let mut gid = match &o.group {
        Some(g) => Some(group_id(g)?),
        None => None,
    };
    if gid.is_none() && mode & 0o077 == 0 {
        // libvdeplug: a switch owned by someone else (not root) needs access granted.
        if let Ok(m) = std::fs::metadata(ctl_path) {
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            if m.uid() != 0 && m.uid() != euid {
                if std::os::unix::fs::chown(sock, None, Some(m.gid())).is_ok() {
                    mode |= 0o070;
                    gid = Some(m.gid());
                } else {
                    mode |= 0o077;
                }
            }
        }
    }
    let err = |p: &Path, e: io::Error| format!("{}: {e}", p.display());
    if let Some(g) = gid {
        std::os::unix::fs::chown(sock, None, Some(g)).map_err(|e| err(sock, e))?;
        std::os::unix::fs::chown(dir, None, Some(g)).map_err(|e| err(dir, e))?;
    }
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err(sock, e))?;
    // Search permission on the directory for whoever may use the socket.
    let mut dmode = 0o700;
    if mode & 0o070 != 0 {
        dmode |= 0o010;
    }
    if mode & 0o007 != 0 {
        dmode |= 0o001;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dmode)).map_err(|e| err(dir, e))
}

struct Monitor {
    link: Arc<Link>,
    ctl_path: PathBuf,
    data: Arc<OwnedFd>,
    data_path: PathBuf,
    port: u32,
    description: String,
}

impl Monitor {
    fn run(self, ctl: UnixStream) {
        let s = &*self.link;
        let mut ctl = Some(ctl);
        let mut next_try = Instant::now();
        let wake = s.wake.as_raw_fd();
        loop {
            if s.stopping() {
                return;
            }
            match &mut ctl {
                Some(c) if s.is_up() => {
                    let r =
                        match sys::poll(&[(wake, libc::POLLIN), (c.as_raw_fd(), libc::POLLIN)], -1)
                        {
                            Ok(r) => r,
                            Err(e) => {
                                log::error!("vde monitor: poll: {e}");
                                return;
                            }
                        };
                    if r[0] != 0 {
                        let _ = s.wake.read();
                    }
                    if r[1] != 0 {
                        let mut buf = [0u8; 512];
                        match c.read(&mut buf) {
                            Ok(0) => s.set_down("the switch closed the control connection"),
                            Ok(_) => {} // the switch says nothing more after its answer
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => s.set_down(&format!("control connection: {e}")),
                        }
                    }
                }
                _ => {
                    if ctl.take().is_some() {
                        // Down, by a send or the control connection: let the port go.
                        let _ = sys::disconnect(&self.data);
                        nudge(&self.data_path);
                        next_try = Instant::now() + RETRY_INTERVAL;
                    }
                    let now = Instant::now();
                    if now >= next_try {
                        next_try = now + RETRY_INTERVAL;
                        match handshake(
                            &self.ctl_path,
                            &self.data,
                            &self.data_path,
                            self.port,
                            &self.description,
                        ) {
                            Ok((c, port)) => {
                                ctl = Some(c);
                                s.set_up(&format!("the switch is back (port {port})"));
                                continue;
                            }
                            Err(e) => log::debug!("vde: reconnect: {e}"),
                        }
                    }
                    let wait = next_try.saturating_duration_since(Instant::now());
                    match sys::poll(&[(wake, libc::POLLIN)], wait.as_millis() as i32 + 1) {
                        Ok(r) if r[0] != 0 => {
                            let _ = s.wake.read();
                        }
                        Ok(_) => {}
                        Err(e) => {
                            log::error!("vde monitor: poll: {e}");
                            return;
                        }
                    }
                }
            }
        }
    }
}

impl NetBackend for Vde {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<()> {
        if !self.link.is_up() {
            self.link.count_dropped();
            return Ok(());
        }
        match sys::send_iov(self.data.as_raw_fd(), frame, None) {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) => Err(e),
                Some(
                    libc::ECONNREFUSED
                    | libc::ENOTCONN
                    | libc::ENOENT
                    | libc::ECONNRESET
                    | libc::EDESTADDRREQ,
                ) => {
                    self.link
                        .set_down(&format!("the switch's socket is gone ({e})"));
                    self.link.count_dropped();
                    Ok(())
                }
                _ => {
                    // Too large, or refused for another reason: the frame's problem.
                    log::debug!("vde: dropped a frame: {e}");
                    self.link.count_dropped();
                    Ok(())
                }
            },
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // Empty datagrams are our own link-state nudges; the switch never sends one.
        sys::recv_frame(self.data.as_raw_fd(), buf)
    }

    fn fd(&self) -> RawFd {
        self.data.as_raw_fd()
    }

    fn link_up(&self) -> bool {
        self.link.is_up()
    }

    fn dropped(&self) -> u64 {
        self.link.dropped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let r = request(5, Path::new("/tmp/x/data"), "nicvm").unwrap();
        assert_eq!(r.len(), 4 + 4 + 4 + 110 + 5);
        assert_eq!(&r[0..4], &0xfeed_faceu32.to_ne_bytes());
        assert_eq!(&r[4..8], &3u32.to_ne_bytes());
        assert_eq!(&r[8..12], &(5u32 << 8).to_ne_bytes());
        assert_eq!(&r[12..14], &(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(&r[14..25], b"/tmp/x/data");
        assert!(r[25..122].iter().all(|b| *b == 0));
        assert_eq!(&r[122..], b"nicvm");
        let long = "d".repeat(300);
        assert_eq!(
            request(0, Path::new("/a"), &long).unwrap().len(),
            122 + MAX_DESCR
        );
    }

    #[test]
    fn reply_and_port() {
        let mut b = [0u8; 110];
        b[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        b[2..2 + 14].copy_from_slice(b"/sw/ctl/005.12");
        let p = parse_reply(&b).unwrap();
        assert_eq!(p, Path::new("/sw/ctl/005.12"));
        assert_eq!(port_of(&p), 5);
        b[0] = 99;
        assert!(parse_reply(&b).is_err());
    }

    #[test]
    fn defaults() {
        assert_eq!(
            ctl_candidates(Some(Path::new("/s"))),
            vec![PathBuf::from("/s/ctl")]
        );
        let d = ctl_candidates(None);
        assert_eq!(d.last().unwrap(), Path::new("/tmp/vde.ctl"));
        assert!(d.contains(&PathBuf::from("/var/run/vde.ctl/ctl")));
    }

    #[test]
    fn no_switch_is_a_clear_error_and_leaves_nothing() {
        let before = leftovers();
        let e = Vde::open(&VdeOptions {
            sock: Some("/nonexistent/nicvm-vde".into()),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(e.contains("/nonexistent/nicvm-vde/ctl"), "{e}");
        assert_eq!(leftovers(), before);
    }

    pub(crate) fn leftovers() -> usize {
        let me = format!("nicvm-vde.{}.", std::process::id());
        std::fs::read_dir(std::env::temp_dir())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&me))
                    .count()
            })
            .unwrap_or(0)
    }
}
