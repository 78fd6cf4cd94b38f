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
//! **In the event loop.** No thread: the I/O thread watches what [`NetBackend::watch`] lists
//! and calls [`NetBackend::ready`] for what reported.
//!
//! - While up: our datagram socket (readable with frames while the frontend wants them,
//!   writable when it waits for room) and the control connection (readable only when the
//!   switch closes it, or says something it never says).
//! - EOF, an error or a hang-up on the control connection, or ECONNREFUSED/ENOTCONN/ENOENT
//!   when sending a frame, takes the link down: [`NetBackend::link_up`] turns false, one
//!   warning is logged, our socket lets go of the switch's, and frames sent meanwhile are
//!   dropped and counted in [`NetBackend::dropped`].
//! - While down, a timerfd fires once a second (not the guest's sends: a guest whose NIC
//!   shows no carrier sends nothing). Each tick starts a handshake that never blocks: a new
//!   non-blocking control connection, our request written on it, and the control socket
//!   watched; when it turns readable the switch's answer is read (in pieces if need be), our
//!   socket is connected to the switch's, the timer stops and the link is up again, with one
//!   info message. A switch that refuses, or does not answer within 2 s, is tried again at a
//!   later tick. Only the first handshake, in [`Vde::open`] before the guest runs, blocks
//!   (up to 2 s per step).
//! - The port compares `link_up()` after every backend event, so the NIC model hears of a
//!   change at the event that made it (the control connection's EOF, the tick that
//!   reconnected): nothing wakes the loop otherwise, and an idle backend costs nothing.
//!
//! Not covered: libvdeplug's other plug kinds (`vde://` URLs, point-to-point `sock[]`, UDP
//! `->` specs, the management port request type), and the pre-directory "ctl socket given
//! directly" fallback when `sock=` names a socket rather than a directory.

use crate::link::{Link, Retired, Timer};
use crate::sys;
use crate::{Capabilities, EventSet, NetBackend};
use socket2::{Domain, Socket, Type};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SWITCH_MAGIC: u32 = 0xfeed_face;
const VERSION: u32 = 3;
/// Longest description the switch keeps (libvdeplug's MAXDESCR, less its NUL).
const MAX_DESCR: usize = 127;
/// How often a switch that went away is tried again.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How long a handshake may wait for the switch's answer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// The switch's answer: a `sockaddr_un` (family, then 108 bytes of path).
pub const REPLY_LEN: usize = std::mem::size_of::<libc::sockaddr_un>();

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

/// What the switch's answer can be wrong about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("the switch answered with {0} bytes, not a {REPLY_LEN}-byte socket address")]
    Length(usize),
    #[error("the switch answered with address family {0}, not AF_UNIX")]
    Family(u16),
    #[error("the switch answered with an empty socket path")]
    EmptyPath,
}

/// The hint after a refused or unanswered handshake.
#[derive(Debug, Clone, Copy)]
pub struct PortHint(pub u32);

impl std::fmt::Display for PortHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => write!(f, " (no free port, or it cannot reach our socket?)"),
            p => write!(f, " (does it have port {p}?)"),
        }
    }
}

/// One error per switch tried, joined on one line.
#[derive(Debug)]
pub struct Attempts(pub Vec<VdeError>);

impl std::fmt::Display for Attempts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VdeError {
    #[error("cannot create a private directory in {}: {source}", .dir.display())]
    PrivateDir { dir: PathBuf, source: io::Error },
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("TMPDIR too long: {0}")]
    DataPath(io::Error),
    #[error("cannot create a socket: {0}")]
    Socket(io::Error),
    #[error("cannot create the timerfd a VDE backend needs: {0}")]
    Timer(io::Error),
    #[error("group: '{0}' is not a group")]
    BadGroup(String),
    #[error("group: no group named '{0}'")]
    NoGroup(String),
    #[error("{}: the switch refused the connection{hint}", .ctl.display())]
    Refused { ctl: PathBuf, hint: PortHint },
    #[error("{}: the switch did not answer within {}s{hint}", .ctl.display(), HANDSHAKE_TIMEOUT.as_secs())]
    NoAnswer { ctl: PathBuf, hint: PortHint },
    #[error("{}: {source}", .ctl.display())]
    Reply { ctl: PathBuf, source: ReplyError },
    #[error("no switch found at {0}")]
    NoSwitch(String),
    #[error("cannot connect to a VDE switch: {0}")]
    Connect(Attempts),
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> VdeError + '_ {
    move |source| VdeError::Io {
        path: path.to_path_buf(),
        source,
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

/// Removes the private directories of nicvm processes that are gone (killed with SIGKILL,
/// so their Drop never ran): `nicvm-vde.PID.*` whose PID no longer exists.
fn remove_stale_private_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten().take(10_000) {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("nicvm-vde.")) else {
            continue;
        };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid <= 0 || pid == std::process::id() as i32 {
            continue;
        }
        // SAFETY: signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        // Only our own directories (same owner) are touched.
        let ours = e
            .metadata()
            .map(|m| {
                // SAFETY: getuid cannot fail.
                m.is_dir() && m.uid() == unsafe { libc::getuid() }
            })
            .unwrap_or(false);
        if gone && ours {
            log::debug!("removing stale VDE directory {}", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl PrivateDir {
    fn new() -> io::Result<PrivateDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        remove_stale_private_dirs(&base);
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

fn group_id(g: &str) -> Result<libc::gid_t, VdeError> {
    let c = std::ffi::CString::new(g).map_err(|_| VdeError::BadGroup(g.into()))?;
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
    g.parse().map_err(|_| VdeError::NoGroup(g.into()))
}

/// The request the switch expects, in host byte order: magic, version, request type, the
/// `sockaddr_un` of our socket, our description.
fn request(port: u32, ours: &Path, description: &str) -> Result<Vec<u8>, VdeError> {
    use std::os::unix::ffi::OsStrExt;
    sys::unix_addr(ours).map_err(VdeError::DataPath)?;
    let path = ours.as_os_str().as_bytes();
    let mut r = Vec::with_capacity(12 + REPLY_LEN + MAX_DESCR);
    r.extend_from_slice(&SWITCH_MAGIC.to_ne_bytes());
    r.extend_from_slice(&VERSION.to_ne_bytes());
    r.extend_from_slice(&(port << 8).to_ne_bytes());
    r.extend_from_slice(&(libc::AF_UNIX as libc::sa_family_t).to_ne_bytes());
    r.extend_from_slice(path);
    r.resize(12 + REPLY_LEN, 0);
    let d = description.as_bytes();
    r.extend_from_slice(&d[..d.len().min(MAX_DESCR)]);
    Ok(r)
}

/// The switch's answer: the `sockaddr_un` of its datagram socket for our port, exactly
/// [`REPLY_LEN`] bytes.
pub fn parse_reply(b: &[u8]) -> Result<PathBuf, ReplyError> {
    use std::os::unix::ffi::OsStrExt;
    if b.len() != REPLY_LEN {
        return Err(ReplyError::Length(b.len()));
    }
    let fam = u16::from_ne_bytes([b[0], b[1]]);
    if fam != libc::AF_UNIX as u16 {
        return Err(ReplyError::Family(fam));
    }
    let path = &b[2..];
    let path = &path[..path.iter().position(|c| *c == 0).unwrap_or(path.len())];
    if path.is_empty() {
        return Err(ReplyError::EmptyPath);
    }
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(path)))
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

/// One handshake with the switch: a new control connection with our request on it, then
/// the switch's answer, read as it comes.
struct Handshake {
    ctl: Socket,
    /// Each step waits (up to [`HANDSHAKE_TIMEOUT`]) rather than returning WouldBlock.
    blocking: bool,
    reply: [u8; REPLY_LEN],
    got: usize,
    started: Instant,
}

impl Handshake {
    fn start(
        ctl_path: &Path,
        data: &Socket,
        data_path: &Path,
        o: &VdeOptions,
        blocking: bool,
    ) -> Result<Handshake, VdeError> {
        let io = io_at(ctl_path);
        // A datagram socket still associated with a dead switch socket would make the new
        // switch's connect() to us fail with EPERM.
        let _ = sys::disconnect(data);
        let addr = sys::unix_addr(ctl_path).map_err(&io)?;
        let ty = if blocking {
            Type::STREAM
        } else {
            Type::STREAM.nonblocking()
        };
        let ctl = Socket::new(Domain::UNIX, ty, None).map_err(&io)?;
        if blocking {
            ctl.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(&io)?;
            ctl.set_write_timeout(Some(HANDSHAKE_TIMEOUT))
                .map_err(&io)?;
        }
        // Unix sockets connect at once, or fail (EAGAIN: the switch's backlog is full).
        ctl.connect(&addr).map_err(&io)?;
        let req = request(o.port, data_path, &o.description)?;
        // A fresh socket's buffer takes the whole request in one write.
        match (&ctl).write(&req) {
            Ok(n) if n == req.len() => {}
            Ok(_) => return Err(io(io::ErrorKind::WriteZero.into())),
            Err(e) => return Err(io(e)),
        }
        Ok(Handshake {
            ctl,
            blocking,
            reply: [0; REPLY_LEN],
            got: 0,
            started: Instant::now(),
        })
    }

    /// Reads the switch's answer: the path of its socket for our port once all of it is
    /// there, `Ok(None)` while more is to come.
    fn read(&mut self, ctl_path: &Path, port: u32) -> Result<Option<PathBuf>, VdeError> {
        let hint = PortHint(port);
        while self.got < REPLY_LEN {
            match (&self.ctl).read(&mut self.reply[self.got..]) {
                Ok(0) => {
                    return Err(VdeError::Refused {
                        ctl: ctl_path.into(),
                        hint,
                    })
                }
                Ok(n) => self.got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if !self.blocking {
                        return Ok(None);
                    }
                    return Err(VdeError::NoAnswer {
                        ctl: ctl_path.into(),
                        hint,
                    });
                }
                Err(e) => return Err(io_at(ctl_path)(e)),
            }
        }
        parse_reply(&self.reply)
            .map(Some)
            .map_err(|source| VdeError::Reply {
                ctl: ctl_path.into(),
                source,
            })
    }
}

/// Our datagram socket, bound at `path`, with room for 64 KiB frames both ways.
fn data_socket(path: &Path) -> Result<Socket, VdeError> {
    let addr = sys::unix_addr(path).map_err(VdeError::DataPath)?;
    let s = Socket::new(Domain::UNIX, Type::DGRAM.nonblocking(), None).map_err(VdeError::Socket)?;
    s.bind(&addr).map_err(io_at(path))?;
    let _ = s.set_send_buffer_size(1 << 20);
    let _ = s.set_recv_buffer_size(1 << 20);
    Ok(s)
}

/// Our socket connected to the switch's (`theirs`, from its answer); returns the port.
fn attach(data: &Socket, theirs: &Path) -> Result<u32, VdeError> {
    let a = sys::unix_addr(theirs).map_err(io_at(theirs))?;
    data.connect(&a).map_err(io_at(theirs))?;
    Ok(port_of(theirs))
}

/// Where the backend is with its switch.
enum State {
    /// Plugged in: the control connection.
    Up(Socket),
    /// The switch went away: the timer runs, and a handshake may be under way.
    Down(Option<Handshake>),
}

pub struct Vde {
    /// Our datagram socket, connected to the switch's port socket while the link is up.
    data: Socket,
    data_path: PathBuf,
    ctl_path: PathBuf,
    options: VdeOptions,
    state: State,
    /// Runs (once a second) while the link is down.
    timer: Timer,
    link: Link,
    retired: Retired,
    port: u32,
    // Dropped last: the directory holding `data_path`.
    _dir: PrivateDir,
}

impl Vde {
    /// Connects to the switch (failing when none answers; this handshake may block for a few
    /// seconds, before the guest runs).
    pub fn open(o: &VdeOptions) -> Result<Vde, VdeError> {
        let dir = PrivateDir::new().map_err(|source| VdeError::PrivateDir {
            dir: std::env::temp_dir(),
            source,
        })?;
        let data_path = dir.0.join("data");
        let data = data_socket(&data_path)?;
        let timer = Timer::new().map_err(VdeError::Timer)?;

        let candidates = ctl_candidates(o.sock.as_deref());
        let mut errors = vec![];
        for ctl_path in &candidates {
            if !ctl_path.exists() && o.sock.is_none() {
                continue;
            }
            set_permissions(&dir.0, &data_path, o, ctl_path)?;
            let r = Handshake::start(ctl_path, &data, &data_path, o, true).and_then(|mut h| {
                let theirs = h
                    .read(ctl_path, o.port)?
                    .expect("a blocking read completes");
                let port = attach(&data, &theirs)?;
                h.ctl.set_nonblocking(true).map_err(io_at(ctl_path))?;
                Ok((h.ctl, port))
            });
            match r {
                Ok((ctl, port)) => {
                    let link = Link::new(
                        format!("vde {}", ctl_path.display()),
                        true,
                        format!("it is back (retrying every {}s)", RETRY_INTERVAL.as_secs()),
                    );
                    log::debug!("{}: connected on port {port}", link.name);
                    return Ok(Vde {
                        data,
                        data_path,
                        ctl_path: ctl_path.clone(),
                        options: o.clone(),
                        state: State::Up(ctl),
                        timer,
                        link,
                        retired: Retired::default(),
                        port,
                        _dir: dir,
                    });
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            errors.push(VdeError::NoSwitch(
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        Err(VdeError::Connect(Attempts(errors)))
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

    /// The switch is gone: the control connection goes (freeing our port if the switch is
    /// still there), our socket lets go of the switch's, and the retry timer starts.
    fn go_down(&mut self, why: &str) {
        if let State::Up(ctl) = std::mem::replace(&mut self.state, State::Down(None)) {
            self.retired.retire(ctl);
            let _ = sys::disconnect(&self.data);
            self.timer.start(RETRY_INTERVAL);
        }
        self.link.set_down(why);
    }

    /// The control connection reported `ev` while up: only EOF or an error is expected.
    fn control_event(&mut self, ev: EventSet) {
        let State::Up(ctl) = &self.state else { return };
        let mut buf = [0u8; 512];
        let mut why = None;
        for _ in 0..16 {
            match (&*ctl).read(&mut buf) {
                Ok(0) => why = Some("the switch closed the control connection".to_string()),
                // The switch says nothing more after its answer.
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => why = Some(format!("control connection: {e}")),
            }
            break;
        }
        if why.is_none() && ev.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            why = Some("the control connection hung up".into());
        }
        if let Some(why) = why {
            self.go_down(&why);
        }
    }

    /// The retry timer fired: a new handshake, unless one is under way and not overdue.
    fn tick(&mut self) {
        if !self.timer.expired() {
            return;
        }
        let State::Down(attempt) = &mut self.state else {
            return;
        };
        if let Some(h) = attempt.take() {
            if h.started.elapsed() < HANDSHAKE_TIMEOUT {
                *attempt = Some(h);
                return;
            }
            log::debug!("{}: reconnect: the switch did not answer", self.link.name);
            self.retired.retire(h.ctl);
        }
        match Handshake::start(
            &self.ctl_path,
            &self.data,
            &self.data_path,
            &self.options,
            false,
        ) {
            Ok(h) => *attempt = Some(h),
            Err(e) => log::debug!("{}: reconnect: {e}", self.link.name),
        }
    }

    /// The control socket of a handshake under way reported `ev`: the switch answered.
    fn handshake_event(&mut self, ev: EventSet) {
        let State::Down(Some(h)) = &mut self.state else {
            return;
        };
        let r = match h.read(&self.ctl_path, self.options.port) {
            Ok(None) if !ev.intersects(EventSet::ERROR | EventSet::HANG_UP) => return,
            Ok(None) => Err(io_at(&self.ctl_path)(io::Error::other("hung up"))),
            Ok(Some(theirs)) => attach(&self.data, &theirs),
            Err(e) => Err(e),
        };
        let State::Down(Some(h)) = std::mem::replace(&mut self.state, State::Down(None)) else {
            unreachable!()
        };
        match r {
            Ok(port) => {
                self.state = State::Up(h.ctl);
                self.timer.stop();
                self.link
                    .set_up(&format!("the switch is back (port {port})"));
            }
            Err(e) => {
                log::debug!("{}: reconnect: {e}", self.link.name);
                self.retired.retire(h.ctl);
            }
        }
    }

    /// Our datagram socket failed (never seen; it would be reported on every wait): a new
    /// one takes its place at the same path, and the switch is asked again.
    fn data_failed(&mut self) {
        let err = self.data.take_error().ok().flatten();
        log::warn!(
            "{}: our socket failed ({}); making a new one",
            self.link.name,
            err.map_or_else(|| "hung up".into(), |e| e.to_string())
        );
        let _ = std::fs::remove_file(&self.data_path);
        let new = data_socket(&self.data_path).and_then(|s| {
            let dir = self._dir.0.clone();
            set_permissions(&dir, &self.data_path, &self.options, &self.ctl_path)?;
            Ok(s)
        });
        match new {
            Ok(s) => {
                let old = std::mem::replace(&mut self.data, s);
                self.retired.retire(old);
            }
            Err(e) => {
                log::error!("{}: {e}", self.link.name);
                return;
            }
        }
        self.go_down("our socket failed");
        if let State::Down(attempt) = &mut self.state {
            if let Some(h) = attempt.take() {
                self.retired.retire(h.ctl);
            }
        }
    }
}

/// `mode=`/`group=` on our socket, and the directory's search bits to match.
fn set_permissions(
    dir: &Path,
    sock: &Path,
    o: &VdeOptions,
    ctl_path: &Path,
) -> Result<(), VdeError> {
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
    if let Some(g) = gid {
        std::os::unix::fs::chown(sock, None, Some(g)).map_err(io_at(sock))?;
        std::os::unix::fs::chown(dir, None, Some(g)).map_err(io_at(dir))?;
    }
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(mode)).map_err(io_at(sock))?;
    // Search permission on the directory for whoever may use the socket.
    let mut dmode = 0o700;
    if mode & 0o070 != 0 {
        dmode |= 0o010;
    }
    if mode & 0o007 != 0 {
        dmode |= 0o001;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dmode)).map_err(io_at(dir))
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
        match sys::send(&self.data, frame, None) {
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
                    self.go_down(&format!("the switch's socket is gone ({e})"));
                    self.link.count_dropped();
                    Ok(())
                }
                _ => {
                    // Too large, or refused for another reason: the frame's problem.
                    log::debug!("{}: dropped a frame: {e}", self.link.name);
                    self.link.count_dropped();
                    Ok(())
                }
            },
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        sys::recv_frame(&self.data, buf)
    }

    fn fd(&self) -> RawFd {
        self.data.as_raw_fd()
    }

    fn watch(&self, rx: bool, tx: bool, out: &mut Vec<(RawFd, EventSet)>) {
        self.retired.watched();
        let mut e = EventSet::empty();
        if rx {
            e |= EventSet::IN;
        }
        if tx {
            e |= EventSet::OUT;
        }
        out.push((self.data.as_raw_fd(), e));
        match &self.state {
            State::Up(ctl) => out.push((ctl.as_raw_fd(), EventSet::IN)),
            State::Down(attempt) => {
                out.push((self.timer.fd(), EventSet::IN));
                if let Some(h) = attempt {
                    out.push((h.ctl.as_raw_fd(), EventSet::IN));
                }
            }
        }
    }

    fn ready(&mut self, fd: RawFd, events: EventSet) {
        self.retired.collect();
        let gone = EventSet::ERROR | EventSet::HANG_UP;
        if fd == self.data.as_raw_fd() {
            if events.intersects(gone) {
                self.data_failed();
            }
            return;
        }
        if fd == self.timer.fd() {
            return self.tick();
        }
        match &self.state {
            State::Up(ctl) if ctl.as_raw_fd() == fd => self.control_event(events),
            State::Down(Some(h)) if h.ctl.as_raw_fd() == fd => self.handshake_event(events),
            _ => {}
        }
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

    /// A private directory whose nicvm was killed (SIGKILL: its Drop never ran) is removed
    /// when the next one starts; a live process's directory is left alone.
    #[test]
    fn stale_private_directories_are_removed() {
        let base = std::env::temp_dir().join(format!("nicvm-vde-stale.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        // Above any pid_max: no such process.
        let stale = base.join("nicvm-vde.4194305.0.1f");
        let live = base.join("nicvm-vde.1.0.2f");
        let other = base.join("not-ours.4194305");
        for d in [&stale, &live, &other] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(stale.join("data"), b"").unwrap();
        remove_stale_private_dirs(&base);
        assert!(!stale.exists(), "the dead process's directory is gone");
        assert!(live.exists(), "pid 1 is alive: its directory stays");
        assert!(other.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

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
        assert!(request(0, Path::new(&"/p".repeat(60)), "").is_err());
    }

    fn reply(path: &[u8]) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        b[2..2 + path.len()].copy_from_slice(path);
        b
    }

    #[test]
    fn reply_and_port() {
        let mut b = reply(b"/sw/ctl/005.12");
        let p = parse_reply(&b).unwrap();
        assert_eq!(p, Path::new("/sw/ctl/005.12"));
        assert_eq!(port_of(&p), 5);
        assert_eq!(port_of(Path::new("/sw/odd")), 0);
        b[0] = 99;
        assert!(matches!(parse_reply(&b), Err(ReplyError::Family(_))));
    }

    #[test]
    fn reply_edge_cases() {
        assert_eq!(parse_reply(&reply(b"")), Err(ReplyError::EmptyPath));
        assert_eq!(parse_reply(&[]), Err(ReplyError::Length(0)));
        assert_eq!(parse_reply(&[1]), Err(ReplyError::Length(1)));
        assert_eq!(
            parse_reply(&reply(b"/x")[..REPLY_LEN - 1]),
            Err(ReplyError::Length(REPLY_LEN - 1))
        );
        assert_eq!(
            parse_reply(&[0u8; REPLY_LEN + 1]),
            Err(ReplyError::Length(REPLY_LEN + 1))
        );
        // A path filling sun_path with no NUL: all 108 bytes.
        let full = [b'a'; REPLY_LEN - 2];
        assert_eq!(parse_reply(&reply(&full)).unwrap().as_os_str().len(), 108);
        // Bytes after the NUL are not the path's.
        let mut b = reply(b"/s/001.3");
        b[20] = b'x';
        assert_eq!(parse_reply(&b).unwrap(), Path::new("/s/001.3"));
        let e = VdeError::Reply {
            ctl: "/s/ctl".into(),
            source: ReplyError::Length(3),
        };
        assert_eq!(
            e.to_string(),
            "/s/ctl: the switch answered with 3 bytes, not a 110-byte socket address"
        );
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
        .unwrap()
        .to_string();
        assert!(
            e.starts_with("cannot connect to a VDE switch: /nonexistent/nicvm-vde/ctl: "),
            "{e}"
        );
        assert!(!e.contains('\n'));
        assert_eq!(leftovers(), before);
    }

    #[test]
    fn hints_name_the_port() {
        let e = VdeError::NoAnswer {
            ctl: "/s/ctl".into(),
            hint: PortHint(7),
        };
        assert_eq!(
            e.to_string(),
            "/s/ctl: the switch did not answer within 2s (does it have port 7?)"
        );
        let e = VdeError::Refused {
            ctl: "/s/ctl".into(),
            hint: PortHint(0),
        };
        assert!(e
            .to_string()
            .ends_with("(no free port, or it cannot reach our socket?)"));
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
