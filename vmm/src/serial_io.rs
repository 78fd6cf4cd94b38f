//! The serial port on a socket (`-serial unix:PATH,server=on,wait=off`, `tcp:...`,
//! `telnet:...`) or a pseudo-terminal (`-serial pty`): guest output goes to the connected
//! client (dropped while none is, as with QEMU's socket chardev), client input to the guest.
//! One thread polls the listener, the client and a stop eventfd; input is read only while the
//! guest keeps up. On a telnet socket nicvm speaks telnet (see `Telnet` below).

use crate::config::Endpoint;
use devices::legacy::Serial;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// Input the guest has not taken yet beyond which the client (or stdin) is not read: the
/// writer waits, as on a real serial line, instead of nicvm buffering without bound.
pub const MAX_PENDING: usize = 64 * 1024;

/// A listener whose `accept` failed for want of descriptors or memory (a guest on a user
/// network can hold thousands of sockets open through libslirp): the client stays in the
/// listen queue and `poll` reports it again at once, so the listener rests instead of being
/// polled in a busy loop, and is tried again after [`AcceptRest::PAUSE`].
#[derive(Default)]
pub struct AcceptRest {
    until: Option<std::time::Instant>,
    warned: bool,
}

impl AcceptRest {
    pub const PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

    /// Whether the listener is resting; if so, the poll timeout (ms) until it is not.
    pub fn resting(&mut self) -> Option<i32> {
        let left = self
            .until?
            .checked_duration_since(std::time::Instant::now());
        match left {
            Some(d) if !d.is_zero() => Some(d.as_millis().clamp(1, i32::MAX as u128) as i32),
            _ => {
                self.until = None;
                None
            }
        }
    }

    /// After a failed `accept`: a client that went away, or a signal, needs no rest.
    pub fn failed(&mut self, what: &str, e: &io::Error) {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock
                | io::ErrorKind::Interrupted
                | io::ErrorKind::ConnectionAborted
        ) {
            return;
        }
        if !self.warned {
            self.warned = true;
            log::warn!(
                "{what}: cannot accept a client ({e}); trying again every {} ms",
                Self::PAUSE.as_millis()
            );
        }
        self.until = Some(std::time::Instant::now() + Self::PAUSE);
    }
}

/// Where guest output goes: the current client, if any.
type Peer = Arc<Mutex<Option<Client>>>;

/// A connected client (or the pty's master side).
struct Client {
    file: std::fs::File,
    /// Telnet: a write stopped between the two bytes of a doubled 0xff; the second goes
    /// first next time (else the client would read the next byte as a command).
    owed_iac: bool,
}

impl Client {
    fn new(file: std::fs::File) -> Client {
        Client {
            file,
            owed_iac: false,
        }
    }
}

/// Telnet (RFC 854) as a QEMU `telnet` chardev speaks it, enough for a telnet client to be a
/// serial console: at each connection nicvm says it will echo and suppress go-ahead and asks
/// for binary both ways ([`TELNET_HELLO`]), so the client sends each key as it is typed and
/// leaves echo to the guest; the commands a client sends are taken out of its input (and the
/// NUL a client that does not send binary puts after CR, RFC 854's CR NUL); a 0xff byte in
/// the guest's output goes doubled. Nothing a client asks for is answered.
const IAC: u8 = 0xff;
const SB: u8 = 250;
const SE: u8 = 240;
/// IAC WILL ECHO, IAC WILL SUPPRESS-GO-AHEAD, IAC WILL BINARY, IAC DO BINARY.
const TELNET_HELLO: [u8; 12] = [IAC, 251, 1, IAC, 251, 3, IAC, 251, 0, IAC, 253, 0];

const WILL: u8 = 251;
const WONT: u8 = 252;
const BINARY: u8 = 0;

/// Where in the telnet byte stream a client's input is.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum In {
    #[default]
    Data,
    /// After a CR: a NUL after it is the client's, not typed (unless it sends binary).
    Cr,
    /// After IAC.
    Iac,
    /// After IAC and this WILL/WONT/DO/DONT: the option byte.
    Opt(u8),
    /// Inside IAC SB ... IAC SE.
    Sub,
    SubIac,
}

/// A telnet client's input as it is read: where in the stream, and whether the client said
/// it sends binary (IAC WILL BINARY).
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Telnet {
    at: In,
    binary: bool,
    /// nicvm asked for nothing (a monitor): a client's WILL BINARY is only an offer, which
    /// leaves it out of binary mode (RFC 856), so its CR NUL is taken out whatever it says.
    unasked: bool,
}

impl Telnet {
    /// The filter for a client nicvm sends no negotiation to.
    pub(crate) fn unasked() -> Telnet {
        Telnet {
            unasked: true,
            ..Telnet::default()
        }
    }

    /// Takes the telnet commands out of `buf` (a client's input, in order of arrival, maybe
    /// cut anywhere); returns how many bytes of data are left at its start.
    pub(crate) fn filter(&mut self, buf: &mut [u8]) -> usize {
        let mut out = 0;
        for i in 0..buf.len() {
            let b = buf[i];
            let (next, keep) = match (self.at, b) {
                (In::Data | In::Cr, IAC) => (In::Iac, false),
                (In::Cr, 0) if !self.binary => (In::Data, false),
                (In::Data | In::Cr, b'\r') => (In::Cr, true),
                (In::Data | In::Cr, _) => (In::Data, true),
                (In::Iac, IAC) => (In::Data, true),
                (In::Iac, 251..=254) => (In::Opt(b), false),
                (In::Iac, SB) => (In::Sub, false),
                (In::Iac, _) => (In::Data, false),
                (In::Opt(verb), opt) => {
                    if opt == BINARY && (verb == WILL || verb == WONT) && !self.unasked {
                        self.binary = verb == WILL;
                    }
                    (In::Data, false)
                }
                (In::Sub, IAC) => (In::SubIac, false),
                (In::Sub, _) => (In::Sub, false),
                (In::SubIac, SE) => (In::Data, false),
                (In::SubIac, _) => (In::Sub, false),
            };
            self.at = next;
            if keep {
                buf[out] = b;
                out += 1;
            }
        }
        out
    }
}

/// Whether writing the first `n` bytes of `v` (telnet output: an IAC still owed first if
/// `owed`, then data with every 0xff doubled) stopped between the two bytes of a pair.
fn cut_in_pair(v: &[u8], n: usize, owed: bool) -> bool {
    if owed && n == 0 {
        return true;
    }
    let mut i = usize::from(owed);
    while i < n {
        if v[i] == IAC {
            if i + 1 == n {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

enum Source {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
    /// A listening socket nicvm inherited (`fd=N,server=on`).
    Inherited(OwnedFd),
    /// A socket connected at set-up (`server=off`, or an inherited connected one): its one
    /// client; once it hangs up, the guest's output goes nowhere.
    Connected,
    /// The pty's master side: always "connected".
    Pty,
}

/// A socket nicvm inherited (`-chardev socket,fd=N`), as set-up checked it.
pub enum InheritedSocket {
    Listener(OwnedFd),
    Stream(OwnedFd),
}

/// Takes the inherited descriptor `fd` as a stream socket, listening or connected as
/// `listening` says; it becomes close-on-exec (no script inherits it) and non-blocking.
pub fn inherited_socket(fd: RawFd, listening: bool) -> io::Result<InheritedSocket> {
    let opt = |name| socket_option(fd, name);
    let not = |what: &str| io::Error::other(format!("descriptor {fd} is not {what}"));
    if opt(libc::SO_TYPE).map_err(|_| not("a socket"))? != libc::SOCK_STREAM {
        return Err(not("a stream socket"));
    }
    let accepting = opt(libc::SO_ACCEPTCONN)? != 0;
    if accepting != listening {
        return Err(not(if listening {
            "a listening socket (server=on)"
        } else {
            "a connected socket (server=off; give server=on for a listening one)"
        }));
    }
    if !listening {
        // SAFETY: sockaddr_storage is plain data; getpeername writes at most `len` bytes.
        let connected = unsafe {
            let mut a: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            libc::getpeername(fd, (&mut a as *mut libc::sockaddr_storage).cast(), &mut len) == 0
        };
        if !connected {
            return Err(not("a connected socket (it has no peer)"));
        }
    }
    // SAFETY: an inherited descriptor named once on the command line (set-up checked):
    // nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on the descriptor we now own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    nonblocking(fd);
    Ok(if listening {
        InheritedSocket::Listener(owned)
    } else {
        InheritedSocket::Stream(owned)
    })
}

/// The integer socket option `name` (SOL_SOCKET level) of `fd`.
pub fn socket_option(fd: RawFd, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into an int we own, its length given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// How long a TCP connection to a harness may take to be made.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A stream connected to `endpoint` (a Unix path or a TCP address nicvm is a client of),
/// non-blocking.
pub fn connect(endpoint: &Endpoint) -> io::Result<OwnedFd> {
    let fd: OwnedFd = match endpoint {
        Endpoint::UnixClient(p) => std::os::unix::net::UnixStream::connect(p)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot connect to {}: {e}", p.display()))
            })?
            .into(),
        Endpoint::TcpClient(a) => {
            // Bounded: exit signals wait while set-up does (an address that drops the
            // connection request would hold them for minutes).
            let s = std::net::TcpStream::connect_timeout(a, CONNECT_TIMEOUT)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot connect to {a}: {e}")))?;
            let _ = s.set_nodelay(true);
            s.into()
        }
        _ => return Err(io::Error::other("not a socket to connect to")),
    };
    nonblocking(fd.as_raw_fd());
    Ok(fd)
}

/// The set-up part: the listener (or pty) and the writer the serial port gets.
pub struct SerialIo {
    source: Source,
    peer: Peer,
    telnet: bool,
    thread: Option<(EventFd, std::thread::JoinHandle<()>)>,
}

/// The guest's output, to the client (a telnet one with 0xff doubled).
struct PeerWriter(Peer, bool);

impl Write for PeerWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(c) = self.0.lock().unwrap().as_mut() {
            // Non-blocking: what the client does not take now is lost, never waited for.
            if self.1 && (c.owed_iac || buf.contains(&IAC)) {
                let mut v = Vec::with_capacity(buf.len() * 2 + 1);
                if c.owed_iac {
                    v.push(IAC);
                }
                for &b in buf {
                    v.push(b);
                    if b == IAC {
                        v.push(IAC);
                    }
                }
                let n = c.file.write(&v).unwrap_or(0);
                c.owed_iac = cut_in_pair(&v, n, c.owed_iac);
            } else {
                let _ = c.file.write(buf);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// A listening Unix socket at `path` that appears there only once it listens: bound under a
/// temporary name beside it, then renamed into place, so a client that sees the path can
/// connect at once (between `bind` and `listen` it would be refused). A socket left by an
/// earlier run is replaced, as QEMU does; anything else at `path` is an error, as from `bind`.
pub fn listen_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".nicvm-{}-{n}", std::process::id()));
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "something that is not a socket is there",
            ));
        }
        return UnixListener::bind(path);
    }
    match UnixListener::bind(&tmp) {
        Ok(l) => match std::fs::rename(&tmp, path) {
            Ok(()) => Ok(l),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        },
        // A temporary name too long for a socket address, say: bind where asked.
        Err(_) => UnixListener::bind(path),
    }
}

/// A bind that failed, naming where (as the monitors' errors do).
fn listen_error(at: &dyn std::fmt::Display, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot listen on {at}: {e}"))
}

impl SerialIo {
    /// Binds the socket (a telnet server's if `telnet`), or opens the pty (its name printed
    /// on stderr, as QEMU does).
    pub fn socket(endpoint: &Endpoint, telnet: bool) -> io::Result<SerialIo> {
        let mut peer = None;
        let source = match endpoint {
            Endpoint::UnixClient(_) | Endpoint::TcpClient(_) => {
                peer = Some(Client::new(std::fs::File::from(connect(endpoint)?)));
                Source::Connected
            }
            Endpoint::Fd { fd, listening } => match inherited_socket(*fd, *listening)? {
                InheritedSocket::Listener(l) => Source::Inherited(l),
                InheritedSocket::Stream(c) => {
                    peer = Some(Client::new(std::fs::File::from(c)));
                    Source::Connected
                }
            },
            Endpoint::Unix(p) => {
                let l = listen_unix(p).map_err(|e| listen_error(&p.display(), e))?;
                l.set_nonblocking(true)?;
                Source::Unix(l, p.clone())
            }
            Endpoint::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(|e| listen_error(a, e))?;
                l.set_nonblocking(true)?;
                Source::Tcp(l)
            }
            Endpoint::Stdio => return Err(io::Error::other("stdio is not a socket")),
        };
        Ok(SerialIo {
            source,
            peer: Arc::new(Mutex::new(peer)),
            telnet,
            thread: None,
        })
    }

    pub fn pty() -> io::Result<SerialIo> {
        // SAFETY: posix_openpt returns a new descriptor or -1.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own from here on.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: grantpt/unlockpt on our master; ptsname_r writes at most `name.len()` bytes.
        let ok = unsafe {
            libc::grantpt(fd) == 0
                && libc::unlockpt(fd) == 0
                && libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) == 0
        };
        if !ok {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: ptsname_r wrote a NUL-terminated string.
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        // Raw, as QEMU leaves it: no echo, no line editing.
        // SAFETY: termios is plain data filled by tcgetattr; fd is our master.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut t) == 0 {
                libc::cfmakeraw(&mut t);
                libc::tcsetattr(fd, libc::TCSANOW, &t);
            }
        }
        nonblocking(fd);
        crate::stderr::note(format!(
            "nicvm: char device redirected to {} (label serial0)\n",
            name.to_string_lossy()
        ));
        Ok(SerialIo {
            source: Source::Pty,
            peer: Arc::new(Mutex::new(Some(Client::new(std::fs::File::from(master))))),
            telnet: false,
            thread: None,
        })
    }

    /// The serial port's output side.
    pub fn writer(&self) -> Box<dyn Write + Send> {
        Box::new(PeerWriter(self.peer.clone(), self.telnet))
    }

    /// Takes the client waiting on the listening socket (`wait=on`), before the guest runs:
    /// it has the console from the guest's first byte, not from when the serial thread got
    /// to it. Nothing waiting: nothing happens.
    pub fn accept_waiting(&self) {
        let Some(l) = self.listener_fd() else { return };
        // SAFETY: accept4 on our listening socket (non-blocking); no address wanted.
        let c = unsafe {
            libc::accept4(
                l,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            return;
        }
        // SAFETY: accept4 returned a new descriptor we now own.
        let mut client = unsafe { std::fs::File::from_raw_fd(c) };
        if self.telnet {
            // A fresh socket's buffer takes these dozen bytes.
            let _ = client.write(&TELNET_HELLO);
        }
        *self.peer.lock().unwrap() = Some(Client::new(client));
    }

    /// The listening socket, if the port is on one.
    pub fn listener_fd(&self) -> Option<RawFd> {
        match &self.source {
            Source::Unix(l, _) => Some(l.as_raw_fd()),
            Source::Tcp(l) => Some(l.as_raw_fd()),
            Source::Inherited(l) => Some(l.as_raw_fd()),
            Source::Connected | Source::Pty => None,
        }
    }

    /// Starts the thread that accepts clients and feeds their input to `serial`.
    pub fn start(&mut self, serial: Arc<Mutex<Serial>>) -> io::Result<()> {
        let stop = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        let thread_stop = stop.try_clone()?;
        let listener = self.listener_fd();
        // A pty's master stays when its slave side closes; a socket's client does not.
        let keep = matches!(self.source, Source::Pty);
        // The thread accepts through a duplicate of the listener (the original stays here,
        // to be closed and unlinked on drop).
        let listener: Option<OwnedFd> = match listener {
            Some(fd) => {
                // SAFETY: dup of a descriptor we own.
                let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
                if d < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: a new descriptor we own.
                Some(unsafe { OwnedFd::from_raw_fd(d) })
            }
            None => None,
        };
        let peer = self.peer.clone();
        let telnet = self.telnet;
        let t = std::thread::Builder::new()
            .name("serial".into())
            .spawn(move || serve(listener, peer, serial, thread_stop, telnet, keep))?;
        self.thread = Some((stop, t));
        Ok(())
    }
}

fn serve(
    listener: Option<OwnedFd>,
    peer: Peer,
    serial: Arc<Mutex<Serial>>,
    stop: EventFd,
    telnet: bool,
    keep: bool,
) {
    let mut buf = [0u8; 4096];
    let mut state = Telnet::default();
    let mut rest = AcceptRest::default();
    loop {
        let client_fd = peer.lock().unwrap().as_ref().map(|c| c.file.as_raw_fd());
        let busy = serial.lock().unwrap().input_pending() >= MAX_PENDING;
        let resting = rest.resting();
        let mut fds = vec![libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        match (client_fd, &listener) {
            // Busy: a negative fd is skipped (a hung-up client would wake poll at once).
            (Some(fd), _) => fds.push(libc::pollfd {
                fd: if busy { -1 } else { fd },
                events: libc::POLLIN,
                revents: 0,
            }),
            (None, Some(l)) => fds.push(libc::pollfd {
                fd: if resting.is_some() { -1 } else { l.as_raw_fd() },
                events: libc::POLLIN,
                revents: 0,
            }),
            (None, None) => {}
        }
        let timeout = match resting {
            Some(ms) => ms,
            None if busy => 10,
            None => -1,
        };
        // SAFETY: polling descriptors we own, array length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            return;
        }
        let Some(p) = fds.get(1) else { continue };
        if p.revents == 0 {
            continue;
        }
        match client_fd {
            None => {
                let l = listener.as_ref().expect("polled only with a listener");
                // SAFETY: accept4 on our listening socket; no address wanted.
                let c = unsafe {
                    libc::accept4(
                        l.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                };
                if c >= 0 {
                    // SAFETY: accept4 returned a new descriptor we now own.
                    let mut client = unsafe { std::fs::File::from_raw_fd(c) };
                    if telnet {
                        state = Telnet::default();
                        // A fresh socket's buffer takes these dozen bytes.
                        let _ = client.write(&TELNET_HELLO);
                    }
                    *peer.lock().unwrap() = Some(Client::new(client));
                } else {
                    rest.failed("serial", &io::Error::last_os_error());
                }
            }
            Some(_) => {
                let r = match peer.lock().unwrap().as_mut() {
                    Some(c) => c.file.read(&mut buf),
                    None => continue,
                };
                match r {
                    Ok(n) if n > 0 => {
                        let n = if telnet {
                            state.filter(&mut buf[..n])
                        } else {
                            n
                        };
                        serial.lock().unwrap().queue_input(&buf[..n]);
                    }
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted => {}
                    // EOF or an error: the client is gone (a pty keeps its master: no
                    // listener to wait on, so it is kept and polled less eagerly).
                    _ if !keep => *peer.lock().unwrap() = None,
                    _ => std::thread::sleep(std::time::Duration::from_millis(100)),
                }
            }
        }
    }
}

impl Drop for SerialIo {
    fn drop(&mut self) {
        if let Some((stop, t)) = self.thread.take() {
            let _ = stop.write(1);
            let _ = t.join();
        }
        if let Source::Unix(_, p) = &self.source {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod listen_tests {
    use super::*;

    /// The path appears only once the socket listens: a client connects the moment it sees
    /// it. A socket left behind is replaced; a file that is not a socket is not.
    #[test]
    fn a_unix_socket_path_appears_listening() {
        let dir = std::env::temp_dir().join(format!("nicvm-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let (p, seen) = (path.clone(), std::sync::mpsc::channel::<bool>());
        let watcher = std::thread::spawn(move || loop {
            if p.exists() {
                let _ = seen
                    .0
                    .send(std::os::unix::net::UnixStream::connect(&p).is_ok());
                return;
            }
        });
        let l = listen_unix(&path).unwrap();
        assert!(
            seen.1.recv().unwrap(),
            "connectable as soon as the path exists"
        );
        watcher.join().unwrap();
        drop(l);
        let again = listen_unix(&path).unwrap();
        drop(again);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["s.sock"], "no temporary name left");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(listen_unix(&path).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod telnet_tests {
    use super::*;
    use devices::bus::MutBusDevice;
    use std::io::Read;
    use std::time::{Duration, Instant};

    #[test]
    fn commands_are_taken_out_of_a_clients_input_wherever_it_is_cut() {
        // Data around: a negotiation, an escaped 0xff, CR NUL, a subnegotiation with an
        // escaped 0xff inside, a bare command (NOP), CR LF.
        let input: &[u8] =
            b"a\xff\xfb\x01b\r\0c\xff\xffd\xff\xfa\x18\x01\xff\xff\x02\xff\xf0e\xff\xf1f\r\ng";
        let want: &[u8] = b"ab\rc\xffdef\r\ng";
        for cut in 0..input.len() {
            let mut t = Telnet::default();
            let (mut a, mut b) = (input[..cut].to_vec(), input[cut..].to_vec());
            let n = t.filter(&mut a);
            let mut got = a[..n].to_vec();
            let n = t.filter(&mut b);
            got.extend_from_slice(&b[..n]);
            assert_eq!(got, want, "cut at {cut}");
            assert_eq!(t, Telnet::default());
        }
    }

    /// A client that said it sends binary (IAC WILL BINARY) means a NUL after CR; one that
    /// takes it back (IAC WONT BINARY) does not.
    #[test]
    fn cr_nul_is_data_from_a_binary_client() {
        let mut t = Telnet::default();
        let mut b = b"\xff\xfb\x00x\r\0y\xff\xfc\x00\r\0z".to_vec();
        let n = t.filter(&mut b);
        assert_eq!(&b[..n], b"x\r\0y\rz");
        assert!(!t.binary);
        // Where nicvm asked for nothing (a monitor), WILL BINARY is only an offer.
        let mut t = Telnet::unasked();
        let mut b = b"\xff\xfb\x00x\r\0y".to_vec();
        let n = t.filter(&mut b);
        assert_eq!(&b[..n], b"x\ry");
    }

    /// Output cut between the two bytes of a doubled 0xff owes the second; a cut anywhere
    /// else owes nothing.
    #[test]
    fn a_write_cut_inside_a_doubled_iac_owes_its_second_byte() {
        let v = [b'a', IAC, IAC, b'b'];
        let owed: Vec<bool> = (0..=4).map(|n| cut_in_pair(&v, n, false)).collect();
        assert_eq!(owed, [false, false, true, false, false]);
        // An IAC owed from before goes first: not written, still owed.
        let v = [IAC, IAC, IAC];
        let owed: Vec<bool> = (0..=3).map(|n| cut_in_pair(&v, n, true)).collect();
        assert_eq!(owed, [true, false, true, false]);
    }

    /// A telnet client on `-serial telnet:`: it hears the negotiation first, its keys reach
    /// the guest without the telnet commands, and the guest's 0xff reaches it doubled.
    #[test]
    fn a_telnet_console() {
        let mut io =
            SerialIo::socket(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap()), true).expect("listen");
        let Source::Tcp(l) = &io.source else {
            unreachable!()
        };
        let addr = l.local_addr().unwrap();
        let serial = Arc::new(Mutex::new(Serial::new(
            EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).unwrap(),
            io.writer(),
        )));
        io.start(serial.clone()).unwrap();
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hello = [0u8; 12];
        c.read_exact(&mut hello).unwrap();
        assert_eq!(hello, TELNET_HELLO);
        c.write_all(b"ls\xff\xfd\x03\r\0").unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        let mut got = vec![];
        while got.len() < 3 && Instant::now() < until {
            let mut s = serial.lock().unwrap();
            let mut lsr = [0u8];
            s.read(5, &mut lsr);
            if lsr[0] & 1 != 0 {
                let mut b = [0u8];
                s.read(0, &mut b);
                got.push(b[0]);
            } else {
                drop(s);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        assert_eq!(got, b"ls\r");
        serial.lock().unwrap().write(0, &[0xff]);
        serial.lock().unwrap().write(0, b"!");
        let mut out = [0u8; 3];
        c.read_exact(&mut out).unwrap();
        assert_eq!(&out, b"\xff\xff!");
    }
}
