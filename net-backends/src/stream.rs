//! Frames over a stream socket, as QEMU's `-netdev socket,listen=|connect=` and
//! `-netdev stream` carry them: each frame is a 4-byte big-endian length, then the frame.
//! TCP (IPv4/IPv6) and Unix stream sockets, as server (one peer at a time) or client.
//!
//! **In the event loop.** The backend owns its sockets and lists them in
//! [`NetBackend::watch`]; the I/O thread calls [`NetBackend::ready`] for what they report:
//!
//! - A server without a peer watches its listening socket and accepts in `ready`; while a
//!   peer is connected the listener is not watched (the next peer waits in the backlog).
//! - A client connects (blocking, up to 5 s per address) in [`StreamBackend::new`]. After
//!   losing its peer, or when that first connection failed and `reconnect` is set, a timerfd
//!   fires every `reconnect`; each tick starts a non-blocking connect, whose socket is watched
//!   for writability until it is connected or failed (then the next address is tried, and
//!   after the last one the next tick starts over). Without `reconnect` it stays down.
//! - The connection is watched for reading while the frontend wants frames, for writing while
//!   a frame is half written or the frontend waits for room, and always for hang-ups.
//!
//! **Frames.** `recv` takes whole frames from a [`Deframer`] and reads the socket (64 KiB at
//! a time) only when no whole frame is buffered. A burst can end with frames still buffered
//! and the socket drained; then an always-ready eventfd is watched until they are taken, so
//! the loop comes back for them. (The same eventfd reports room to a frontend that waited for
//! it when the connection went away meanwhile: frames are dropped then, so there is room.) `send` writes length and frame in one `sendmsg`; what the
//! socket does not take is kept and finished (on writability, or by the next `send`) before
//! another frame is taken: while it is pending, `send` returns WouldBlock, so the NIC model
//! keeps its place in its ring.
//!
//! **Link state.** Up while a peer is connected. A hang-up, an error, end of file or a length
//! over [`crate::MAX_FRAME`] drops the connection: the link goes down with one warning,
//! frames sent meanwhile are dropped and counted, and the server accepts the next peer. On a
//! hang-up the peer's last bytes are read first (up to 8 MiB), so frames it sent before
//! leaving still reach the guest. Each change of link state happens in a backend call, which
//! the port follows by comparing `link_up()`: no extra wake-up is needed.
//!
//! Not covered: QEMU's `fd=` sockets, abstract Unix addresses, vnet headers on the wire.

use crate::link::{Link, Retired, Timer};
use crate::sys::{self, SocketFile};
use crate::{Capabilities, EventSet, NetBackend, MAX_FRAME};
use socket2::{SockAddr, Socket, Type};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// The length in front of every frame.
pub const HEADER_LEN: usize = 4;
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes asked of the socket by one read.
const READ_CHUNK: usize = 64 * 1024;
/// Most bytes read from a peer that hung up (the rest of what it sent is lost).
const DRAIN_MAX: usize = 8 << 20;
/// Socket reads one `recv` may make (each one brings at least one byte).
const READS_PER_RECV: usize = 8;

/// Where a stream backend listens or connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamAddr {
    /// Resolved addresses, tried in order (listening uses the first).
    Inet(Vec<SocketAddr>),
    Unix(PathBuf),
}

impl std::fmt::Display for StreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamAddr::Inet(a) => match a.first() {
                Some(a) => write!(f, "{a}"),
                None => write!(f, "(no address)"),
            },
            StreamAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOptions {
    pub addr: StreamAddr,
    pub server: bool,
    /// Client only: retry this often after the peer is lost (or was never reached).
    pub reconnect: Option<Duration>,
}

/// Why a stream backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("no address to listen on")]
    NoAddress,
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("cannot create the {what} a stream backend needs: {source}")]
    Resource {
        what: &'static str,
        source: io::Error,
    },
}

/// A length no frame can have: the peer does not speak QEMU's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the peer sent a {0}-byte frame length (not QEMU's framing?)")]
pub struct FrameTooLong(pub usize);

/// Whole frames out of a byte stream in QEMU's framing (a 4-byte big-endian length, then the
/// frame). Bytes go in with [`Deframer::push`] (or read straight into [`Deframer::space`] and
/// [`Deframer::filled`]); frames come out of [`Deframer::next_frame`]. Pure: no I/O.
pub struct Deframer {
    buf: Vec<u8>,
    /// `buf[start..end]` is not taken yet.
    start: usize,
    end: usize,
}

impl Default for Deframer {
    fn default() -> Self {
        Deframer::new()
    }
}

impl Deframer {
    /// Room for the largest frame with its length and one read after it.
    const INITIAL: usize = HEADER_LEN + MAX_FRAME + READ_CHUNK;

    pub fn new() -> Deframer {
        Deframer {
            buf: vec![0; Self::INITIAL],
            start: 0,
            end: 0,
        }
    }

    /// Bytes held: whole frames not taken yet and the start of the next.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Appends bytes from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len();
        self.space(n)[..n].copy_from_slice(bytes);
        self.filled(n);
    }

    /// Free space for the next `min` bytes or more of the stream (read into it, then call
    /// [`Deframer::filled`]).
    pub fn space(&mut self, min: usize) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > Self::INITIAL {
                self.buf.truncate(Self::INITIAL);
                self.buf.shrink_to_fit();
            }
        }
        if self.buf.len() - self.end < min {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < min {
                self.buf.resize(self.end + min, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were written at the start of [`Deframer::space`].
    pub fn filled(&mut self, n: usize) {
        assert!(n <= self.buf.len() - self.end, "filled past the space");
        self.end += n;
    }

    /// The length in the header at `at`, if all four bytes are there.
    fn length_at(&self, at: usize) -> Option<usize> {
        let h = self
            .buf
            .get(at..at + HEADER_LEN)
            .filter(|_| at + HEADER_LEN <= self.end)?;
        Some(u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize)
    }

    /// Whether [`Deframer::next_frame`] has something to say: a whole frame, or a length no
    /// frame can have.
    pub fn frame_waiting(&self) -> bool {
        match self.length_at(self.start) {
            Some(len) => len > MAX_FRAME || self.len() >= HEADER_LEN + len,
            None => false,
        }
    }

    /// The next whole frame (possibly empty), `Ok(None)` until one is complete, or the error
    /// a length over [`MAX_FRAME`] is (it stays: every later call returns it again).
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameTooLong> {
        let Some(len) = self.length_at(self.start) else {
            return Ok(None);
        };
        if len > MAX_FRAME {
            return Err(FrameTooLong(len));
        }
        if self.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let f = self.start + HEADER_LEN;
        self.start = f + len;
        Ok(Some(&self.buf[f..f + len]))
    }

    /// The stream ended: drops what follows the last whole frame (an incomplete frame, or a
    /// bad length and everything after it). Returns how many bytes went.
    pub fn drop_partial(&mut self) -> usize {
        let mut at = self.start;
        while let Some(len) = self.length_at(at) {
            if len > MAX_FRAME || self.end - at < HEADER_LEN + len {
                break;
            }
            at += HEADER_LEN + len;
        }
        let dropped = self.end - at;
        self.end = at;
        dropped
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
}

/// A client's connection, or the lack of one.
enum Peer {
    /// A server waiting for a peer, or a client without one (waiting for its timer when it
    /// reconnects).
    None,
    /// A client's non-blocking connect to `targets[idx]` under way.
    Connecting {
        sock: Socket,
        idx: usize,
        since: Instant,
    },
    Up(Socket),
}

pub struct StreamBackend {
    link: Link,
    peer: Peer,
    /// Server: the listening socket.
    listener: Option<Socket>,
    /// Client: where to connect, in order.
    targets: Vec<SockAddr>,
    /// Client with `reconnect`: the period, and the timer that paces it.
    reconnect: Option<(Duration, Timer)>,
    /// Server: the rest after an `accept` that failed for want of descriptors or memory (the
    /// client waits in the listen queue, and a listener watched meanwhile would wake the
    /// event loop at once, for ever); while it runs its timer is watched instead.
    accept_rest: Option<AcceptRest>,
    rx: Deframer,
    /// The rest of a frame the socket took only part of: `tx[tx_off..]`.
    tx: Vec<u8>,
    tx_off: usize,
    /// Always readable and writable; watched while whole frames wait in `rx`, or while the
    /// frontend waits for room and there is no connection.
    backlog: EventFd,
    retired: Retired,
    local: Option<SocketAddr>,
    _file: Option<SocketFile>,
}

struct AcceptRest {
    timer: Timer,
    resting: bool,
    warned: bool,
}

/// How long a server's listener rests after an `accept` that failed for want of resources.
const ACCEPT_REST: Duration = Duration::from_millis(200);

fn is_inet(a: &SockAddr) -> bool {
    a.is_ipv4() || a.is_ipv6()
}

/// A new non-blocking stream socket for `a`, with its connect started: `true` when it is
/// connected already (Unix sockets always are, or fail at once).
fn start_connect(a: &SockAddr) -> io::Result<(Socket, bool)> {
    let s = Socket::new(a.domain(), Type::STREAM.nonblocking(), None)?;
    match s.connect(a) {
        Ok(()) => Ok((s, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok((s, false)),
        Err(e) => Err(e),
    }
}

/// Connects to the first of `targets` that answers, waiting up to [`CONNECT_TIMEOUT`] for
/// each; the socket is non-blocking afterwards.
fn connect_blocking(targets: &[SockAddr]) -> io::Result<Socket> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address");
    for a in targets {
        let r = Socket::new(a.domain(), Type::STREAM, None).and_then(|s| {
            if is_inet(a) {
                s.connect_timeout(a, CONNECT_TIMEOUT)?;
            } else {
                s.connect(a)?;
            }
            s.set_nonblocking(true)?;
            Ok(s)
        });
        match r {
            Ok(s) => {
                if is_inet(a) {
                    let _ = s.set_tcp_nodelay(true);
                }
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn listen(addr: &StreamAddr) -> io::Result<(Socket, Option<SocketAddr>, Option<SocketFile>)> {
    let (sa, path) = match addr {
        StreamAddr::Inet(list) => {
            let a = list.first().ok_or(io::ErrorKind::InvalidInput)?;
            (SockAddr::from(*a), None)
        }
        StreamAddr::Unix(p) => {
            let sa = sys::unix_addr(p)?;
            sys::unlink_stale_socket(p)?;
            (sa, Some(p.as_path()))
        }
    };
    let s = Socket::new(sa.domain(), Type::STREAM.nonblocking(), None)?;
    if path.is_none() {
        s.set_reuse_address(true)?;
    }
    s.bind(&sa)?;
    let file = path.map(SocketFile::record).transpose()?;
    s.listen(128)?;
    let local = s.local_addr()?.as_socket();
    Ok((s, local, file))
}

impl StreamBackend {
    pub fn new(o: &StreamOptions) -> Result<StreamBackend, StreamError> {
        let label = o.addr.to_string();
        let resource = |what| move |source| StreamError::Resource { what, source };
        // A client without `reconnect` never connects again.
        let until = if o.server || o.reconnect.is_some() {
            "a peer is back"
        } else {
            "nicvm ends (a client without reconnect= does not connect again)"
        };
        let link = |up| Link::new(format!("stream {label}"), up, until.into());
        let mut b = StreamBackend {
            link: link(false),
            peer: Peer::None,
            listener: None,
            targets: vec![],
            reconnect: None,
            accept_rest: None,
            rx: Deframer::new(),
            tx: Vec::new(),
            tx_off: 0,
            backlog: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(resource("eventfd"))?,
            retired: Retired::default(),
            local: None,
            _file: None,
        };
        b.backlog.write(1).map_err(resource("eventfd"))?;
        if o.server {
            if matches!(&o.addr, StreamAddr::Inet(l) if l.is_empty()) {
                return Err(StreamError::NoAddress);
            }
            let (l, local, file) = listen(&o.addr).map_err(|source| StreamError::Listen {
                addr: match &o.addr {
                    StreamAddr::Unix(p) => p.display().to_string(),
                    a => a.to_string(),
                },
                source,
            })?;
            b.listener = Some(l);
            b.accept_rest = Some(AcceptRest {
                timer: Timer::new().map_err(resource("timerfd"))?,
                resting: false,
                warned: false,
            });
            b.local = local;
            b._file = file;
            return Ok(b);
        }
        let connect_err = |source| StreamError::Connect {
            addr: label.clone(),
            source,
        };
        b.targets = match &o.addr {
            StreamAddr::Inet(list) => list.iter().map(|a| SockAddr::from(*a)).collect(),
            StreamAddr::Unix(p) => vec![sys::unix_addr(p).map_err(connect_err)?],
        };
        match connect_blocking(&b.targets) {
            Ok(s) => {
                b.peer = Peer::Up(s);
                b.link = link(true);
            }
            Err(e) if o.reconnect.is_some() => {
                log::warn!(
                    "stream {label}: cannot connect ({e}); link down, retrying every {:?}",
                    o.reconnect.unwrap()
                );
            }
            Err(e) => return Err(connect_err(e)),
        }
        if let Some(every) = o.reconnect {
            let mut t = Timer::new().map_err(resource("timerfd"))?;
            if matches!(b.peer, Peer::None) {
                t.start(every);
            }
            b.reconnect = Some((every, t));
        }
        Ok(b)
    }

    /// The Unix socket file this backend bound (removed when it is dropped, if still ours).
    pub fn socket_path(&self) -> Option<&Path> {
        self._file.as_ref().map(|f| f.path())
    }

    /// The address a TCP server listens on (its port when port 0 was asked for).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    fn tx_pending(&self) -> bool {
        self.tx_off < self.tx.len()
    }

    /// The peer is gone (or never answered): its socket leaves the watch list, a half-written
    /// frame is dropped, and a client starts its reconnect timer.
    fn lose_peer(&mut self, why: &str) {
        match std::mem::replace(&mut self.peer, Peer::None) {
            Peer::None => return,
            Peer::Up(s) | Peer::Connecting { sock: s, .. } => self.retired.retire(s),
        }
        if self.tx_pending() {
            self.link.count_dropped();
        }
        self.tx.clear();
        self.tx_off = 0;
        let lost = self.rx.drop_partial();
        if lost > 0 {
            log::debug!(
                "{}: {lost} bytes of an incomplete frame lost",
                self.link.name
            );
        }
        self.link.set_down(why);
        if let Some((every, t)) = &mut self.reconnect {
            t.start(*every);
        }
    }

    fn connected(&mut self, s: Socket, how: &str) {
        if s.local_addr().is_ok_and(|a| is_inet(&a)) {
            let _ = s.set_tcp_nodelay(true);
        }
        self.peer = Peer::Up(s);
        if let Some((_, t)) = &mut self.reconnect {
            t.stop();
        }
        self.link.set_up(how);
    }

    /// Starts connecting to `targets[from..]`, in order, until one connects or is under way.
    fn try_connect(&mut self, from: usize) {
        for idx in from..self.targets.len() {
            match start_connect(&self.targets[idx]) {
                Ok((s, true)) => return self.connected(s, "connected"),
                Ok((sock, false)) => {
                    self.peer = Peer::Connecting {
                        sock,
                        idx,
                        since: Instant::now(),
                    };
                    return;
                }
                Err(e) => log::debug!("{}: reconnect: {e}", self.link.name),
            }
        }
    }

    /// The reconnect timer fired.
    fn tick(&mut self) {
        match &self.peer {
            Peer::Up(_) => {}
            Peer::None => self.try_connect(0),
            Peer::Connecting { idx, since, .. } => {
                if since.elapsed() >= CONNECT_TIMEOUT {
                    let next = idx + 1;
                    if let Peer::Connecting { sock, .. } =
                        std::mem::replace(&mut self.peer, Peer::None)
                    {
                        self.retired.retire(sock);
                    }
                    log::debug!("{}: reconnect: timed out", self.link.name);
                    self.try_connect(next);
                }
            }
        }
    }

    /// The socket of a connect under way reported `ev`.
    fn connect_done(&mut self, ev: EventSet) {
        let Peer::Connecting { sock, idx, .. } = std::mem::replace(&mut self.peer, Peer::None)
        else {
            return;
        };
        let failed = match sock.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) if ev.intersects(EventSet::ERROR | EventSet::HANG_UP) => {
                Some(io::Error::other("connection failed"))
            }
            Ok(None) => None,
        };
        match failed {
            None => self.connected(sock, "connected"),
            Some(e) => {
                log::debug!("{}: reconnect: {e}", self.link.name);
                self.retired.retire(sock);
                self.try_connect(idx + 1);
            }
        }
    }

    fn accept(&mut self) {
        let Some(l) = &self.listener else { return };
        if !matches!(self.peer, Peer::None) {
            return;
        }
        match l.accept() {
            Ok((s, from)) => {
                if let Err(e) = s.set_nonblocking(true) {
                    log::warn!("{}: {e}", self.link.name);
                    return;
                }
                let from = from
                    .as_socket()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "a Unix peer".into());
                self.connected(s, &format!("connection from {from}"));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                log::debug!("{}: accept: {e}", self.link.name);
                if let Some(r) = &mut self.accept_rest {
                    if !r.warned {
                        r.warned = true;
                        log::warn!(
                            "{}: cannot accept a peer ({e}); trying again every {} ms",
                            self.link.name,
                            ACCEPT_REST.as_millis()
                        );
                    }
                    r.resting = true;
                    r.timer.start(ACCEPT_REST);
                }
            }
        }
    }

    /// The peer hung up or failed: what it sent before is read (bounded), then the
    /// connection goes.
    fn hang_up(&mut self) {
        let Peer::Up(s) = &self.peer else { return };
        let mut why = "the peer closed the connection".to_string();
        while self.rx.len() < DRAIN_MAX {
            match sys::read(s, self.rx.space(READ_CHUNK)) {
                Ok(Some(0)) | Ok(None) => break,
                Ok(Some(n)) => self.rx.filled(n),
                Err(e) => {
                    why = format!("the connection failed ({e})");
                    break;
                }
            }
        }
        self.lose_peer(&why);
    }

    /// Writes what is left of a half-written frame, as far as the socket takes it.
    fn flush(&mut self) {
        let Peer::Up(s) = &self.peer else { return };
        while self.tx_pending() {
            match sys::send(s, &[IoSlice::new(&self.tx[self.tx_off..])], None) {
                Ok(0) => return,
                Ok(n) => self.tx_off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => return self.lose_peer(&format!("send to the peer failed ({e})")),
            }
        }
        self.tx.clear();
        self.tx_off = 0;
    }
}

impl NetBackend for StreamBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<()> {
        if self.tx_pending() {
            self.flush();
            if self.tx_pending() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        let Peer::Up(s) = &self.peer else {
            self.link.count_dropped();
            return Ok(());
        };
        let len: usize = frame.iter().map(|p| p.len()).sum();
        if len > MAX_FRAME {
            log::debug!("{}: dropped a {len}-byte frame", self.link.name);
            self.link.count_dropped();
            return Ok(());
        }
        let hdr = (len as u32).to_be_bytes();
        let mut small = [IoSlice::new(&[]); 9];
        let mut big = vec![];
        let iov: &[IoSlice] = if frame.len() < small.len() {
            small[0] = IoSlice::new(&hdr);
            small[1..=frame.len()].copy_from_slice(frame);
            &small[..=frame.len()]
        } else {
            big.push(IoSlice::new(&hdr));
            big.extend_from_slice(frame);
            &big
        };
        match sys::send(s, iov, None) {
            Ok(n) if n == HEADER_LEN + len => Ok(()),
            Ok(n) => {
                // Keep the rest; the frame counts as sent.
                let mut skip = n;
                for p in iov {
                    let from = skip.min(p.len());
                    skip -= from;
                    self.tx.extend_from_slice(&p[from..]);
                }
                self.tx_off = 0;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            Err(e) => {
                self.lose_peer(&format!("send to the peer failed ({e})"));
                self.link.count_dropped();
                Ok(())
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut reads = 0;
        loop {
            match self.rx.next_frame() {
                Ok(Some([])) => continue,
                Ok(Some(f)) => {
                    let n = f.len().min(buf.len());
                    buf[..n].copy_from_slice(&f[..n]);
                    return Ok(Some(n));
                }
                Ok(None) => {}
                Err(e) => {
                    self.lose_peer(&e.to_string());
                    return Ok(None);
                }
            }
            let Peer::Up(s) = &self.peer else {
                return Ok(None);
            };
            if reads == READS_PER_RECV {
                return Ok(None);
            }
            reads += 1;
            match sys::read(s, self.rx.space(READ_CHUNK)) {
                Ok(Some(0)) => self.lose_peer("the peer closed the connection"),
                Ok(Some(n)) => self.rx.filled(n),
                Ok(None) => return Ok(None),
                Err(e) => self.lose_peer(&format!("receive from the peer failed ({e})")),
            }
        }
    }

    /// The connection, or -1 while there is none (the event loop uses `watch`).
    fn fd(&self) -> RawFd {
        match &self.peer {
            Peer::Up(s) => s.as_raw_fd(),
            _ => -1,
        }
    }

    fn watch(&self, rx: bool, tx: bool, out: &mut Vec<(RawFd, EventSet)>) {
        self.retired.watched();
        match &self.peer {
            Peer::Up(s) => {
                let mut e = EventSet::READ_HANG_UP;
                if rx {
                    e |= EventSet::IN;
                }
                if tx || self.tx_pending() {
                    e |= EventSet::OUT;
                }
                out.push((s.as_raw_fd(), e));
            }
            Peer::Connecting { sock, .. } => out.push((sock.as_raw_fd(), EventSet::OUT)),
            Peer::None => match (&self.listener, &self.accept_rest) {
                (Some(_), Some(r)) if r.resting => out.push((r.timer.fd(), EventSet::IN)),
                (Some(l), _) => out.push((l.as_raw_fd(), EventSet::IN)),
                _ => {}
            },
        }
        if let Some((_, t)) = &self.reconnect {
            if !matches!(self.peer, Peer::Up(_)) {
                out.push((t.fd(), EventSet::IN));
            }
        }
        // The always-ready eventfd: readable while whole frames wait after a burst, and
        // writable for a frontend waiting for room when there is no connection any more
        // (sends are dropped then, so they "succeed"; nothing else would ever say so).
        let mut e = EventSet::empty();
        if rx && self.rx.frame_waiting() {
            e |= EventSet::IN;
        }
        if tx && !matches!(self.peer, Peer::Up(_)) {
            e |= EventSet::OUT;
        }
        if !e.is_empty() {
            out.push((self.backlog.as_raw_fd(), e));
        }
    }

    fn ready(&mut self, fd: RawFd, events: EventSet) {
        self.retired.collect();
        if let Some((_, t)) = &mut self.reconnect {
            if fd == t.fd() {
                if t.expired() {
                    self.tick();
                }
                return;
            }
        }
        if let Some(r) = &mut self.accept_rest {
            if r.timer.fd() == fd {
                if r.timer.expired() {
                    r.timer.stop();
                    r.resting = false;
                }
                return;
            }
        }
        if self.listener.as_ref().is_some_and(|l| l.as_raw_fd() == fd) {
            return self.accept();
        }
        match &self.peer {
            Peer::Connecting { sock, .. } if sock.as_raw_fd() == fd => self.connect_done(events),
            Peer::Up(s) if s.as_raw_fd() == fd => {
                let gone = EventSet::ERROR | EventSet::HANG_UP | EventSet::READ_HANG_UP;
                if events.intersects(gone) {
                    self.hang_up();
                } else if events.contains(EventSet::OUT) {
                    self.flush();
                }
            }
            // The backlog eventfd: `recv` comes next. Anything else: a stale event.
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

    fn framed(frames: &[&[u8]]) -> Vec<u8> {
        let mut w = vec![];
        for f in frames {
            w.extend_from_slice(&(f.len() as u32).to_be_bytes());
            w.extend_from_slice(f);
        }
        w
    }

    fn take_all(d: &mut Deframer) -> Vec<Vec<u8>> {
        let mut v = vec![];
        while let Some(f) = d.next_frame().unwrap() {
            v.push(f.to_vec());
        }
        v
    }

    #[test]
    fn length_split_across_reads() {
        let w = framed(&[b"hello"]);
        let mut d = Deframer::new();
        for (i, b) in w.iter().enumerate() {
            assert!(!d.frame_waiting(), "byte {i}");
            assert_eq!(d.next_frame().unwrap(), None, "byte {i}");
            d.push(&[*b]);
        }
        assert!(d.frame_waiting());
        assert_eq!(d.next_frame().unwrap(), Some(&b"hello"[..]));
        assert!(d.is_empty() && !d.frame_waiting());
    }

    #[test]
    fn many_frames_in_one_read_and_zero_length_ones() {
        let big = vec![7u8; 1514];
        let w = framed(&[b"a", b"", &big, b"", b"xyz"]);
        let mut d = Deframer::new();
        d.push(&w);
        let got = take_all(&mut d);
        assert_eq!(
            got,
            vec![b"a".to_vec(), vec![], big, vec![], b"xyz".to_vec()]
        );
        assert!(d.is_empty());
    }

    #[test]
    fn exactly_max_frame_and_one_over() {
        let max = vec![0xa5u8; MAX_FRAME];
        let mut d = Deframer::new();
        let w = framed(&[&max]);
        d.push(&w[..w.len() - 1]);
        assert_eq!(d.next_frame().unwrap(), None);
        d.push(&w[w.len() - 1..]);
        assert_eq!(d.next_frame().unwrap().map(<[u8]>::len), Some(MAX_FRAME));

        let mut d = Deframer::new();
        d.push(&framed(&[b"ok"]));
        d.push(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert_eq!(
            d.next_frame().unwrap(),
            Some(&b"ok"[..]),
            "frames before it"
        );
        assert!(d.frame_waiting(), "the bad length is news too");
        assert_eq!(d.next_frame(), Err(FrameTooLong(MAX_FRAME + 1)));
        assert_eq!(d.next_frame(), Err(FrameTooLong(MAX_FRAME + 1)), "it stays");
        let mut d = Deframer::new();
        d.push(&u32::MAX.to_be_bytes());
        assert_eq!(d.next_frame(), Err(FrameTooLong(u32::MAX as usize)));
    }

    #[test]
    fn drop_partial_keeps_whole_frames_only() {
        let mut d = Deframer::new();
        let mut w = framed(&[b"one", b"two"]);
        w.extend_from_slice(&framed(&[b"three"])[..6]);
        d.push(&w);
        assert_eq!(d.drop_partial(), 6);
        assert_eq!(take_all(&mut d), vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(d.drop_partial(), 0);
        // A bad length goes with everything after it.
        d.push(&framed(&[b"four"]));
        d.push(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        assert_eq!(d.drop_partial(), 7);
        assert_eq!(take_all(&mut d), vec![b"four".to_vec()]);
        // Two bytes of a header.
        d.push(&[0, 0]);
        assert_eq!(d.drop_partial(), 2);
        assert!(d.is_empty());
    }

    #[test]
    fn any_split_of_any_frames_comes_out_the_same() {
        // Frames of random sizes (zero and MAX_FRAME among them), the stream cut at random
        // places, frames taken whenever there are some.
        let mut rnd = crate::test_rng();
        for round in 0..50 {
            let frames: Vec<Vec<u8>> = (0..rnd(20) + 1)
                .map(|i| {
                    let len = match rnd(10) {
                        0 => 0,
                        1 => MAX_FRAME,
                        2 => rnd(70_000).min(MAX_FRAME),
                        _ => rnd(1600),
                    };
                    vec![(round + i) as u8; len]
                })
                .collect();
            let refs: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
            let w = framed(&refs);
            let mut d = Deframer::new();
            let mut got = vec![];
            let mut at = 0;
            while at < w.len() {
                let n = (rnd(3 * READ_CHUNK) + 1).min(w.len() - at);
                d.push(&w[at..at + n]);
                at += n;
                if rnd(2) == 0 {
                    got.extend(take_all(&mut d));
                }
            }
            got.extend(take_all(&mut d));
            assert!(got == frames, "round {round}");
            assert!(d.is_empty(), "round {round}");
        }
    }

    #[test]
    fn space_grows_for_a_backlog_and_shrinks_back() {
        let mut d = Deframer::new();
        let f = vec![1u8; 60_000];
        for _ in 0..40 {
            d.push(&framed(&[&f]));
        }
        assert_eq!(d.len(), 40 * 60_004);
        assert_eq!(take_all(&mut d).len(), 40);
        let s = d.space(10).len();
        assert!(s <= Deframer::INITIAL, "{s}");
        // Reading in place, a frame at a time, with a partial one kept across compaction.
        let w = framed(&[&f, b"tail"]);
        let mut fed = 0;
        let mut got = vec![];
        while fed < w.len() {
            let space = d.space(1000);
            let n = space.len().min(w.len() - fed).min(7000);
            space[..n].copy_from_slice(&w[fed..fed + n]);
            d.filled(n);
            fed += n;
            got.extend(take_all(&mut d));
        }
        assert_eq!(got, vec![f, b"tail".to_vec()]);
    }
}
