//! Frames over a stream socket, as QEMU's `-netdev socket,listen=|connect=` and
//! `-netdev stream` carry them: each frame is a 4-byte big-endian length, then the frame.
//! TCP (IPv4/IPv6) and Unix stream sockets, as server (one peer at a time) or client.
//!
//! **Design.** The I/O thread registers a backend's fd once, but a stream backend's socket
//! changes over its life (a server's listener, then each accepted peer; a client's
//! reconnections). So the backend's fd is one end of a `SOCK_SEQPACKET` socket pair, one
//! frame per message, and a relay thread owns the real sockets: it accepts, connects and
//! reconnects, frames and deframes, and handles partial reads and writes (a frame split
//! across reads is reassembled; a frame the socket took only part of is finished before the
//! next is read from the pair). Back-pressure passes through: while the peer is slow the
//! thread stops reading the pair, the pair fills, and `send` returns WouldBlock until the
//! pair's fd is writable again; while the guest is slow the thread stops reading the peer.
//! The price is one extra copy and thread hop per frame.
//!
//! **Link state.** Up while a peer is connected. A server starts down and comes up when a
//! peer connects; when the peer closes (or sends a length over [`crate::MAX_FRAME`]) the link
//! goes down with one warning, frames sent meanwhile are dropped and counted, and the server
//! accepts the next peer. A client connects in [`StreamBackend::new`] (an error unless
//! `reconnect` is set); after losing its peer it retries every `reconnect` or stays down.
//! Each change of link state makes the fd readable once (an empty message, skipped by
//! `recv`), so the NIC model gets a backend event and can look at `link_up()`.
//!
//! Not covered: QEMU's `fd=` sockets, abstract Unix addresses, vnet headers on the wire.

use crate::link::{Helper, Link};
use crate::sys::{self, SocketFile};
use crate::{Capabilities, NetBackend, MAX_FRAME};
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

pub struct StreamBackend {
    // Dropped first: the relay thread stops before the sockets it uses close.
    _relay: Helper,
    pair: OwnedFd,
    link: Arc<Link>,
    local: Option<SocketAddr>,
    _file: Option<SocketFile>,
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn fd(&self) -> RawFd {
        match self {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        }
    }
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(b),
            Conn::Unix(s) => s.read(b),
        }
    }
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(b),
            Conn::Unix(s) => s.write(b),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(s) => s.as_raw_fd(),
            Listener::Unix(s) => s.as_raw_fd(),
        }
    }
    fn accept(&self) -> io::Result<(Conn, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, a) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok((Conn::Tcp(s), a.to_string()))
            }
            Listener::Unix(l) => Ok((Conn::Unix(l.accept()?.0), "a Unix peer".into())),
        }
    }
}

fn connect(addr: &StreamAddr) -> io::Result<Conn> {
    match addr {
        StreamAddr::Unix(p) => Ok(Conn::Unix(UnixStream::connect(p)?)),
        StreamAddr::Inet(list) => {
            let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address");
            for a in list {
                match TcpStream::connect_timeout(a, Duration::from_secs(5)) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(Conn::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
    }
}

fn set_nonblocking(c: &Conn) -> io::Result<()> {
    match c {
        Conn::Tcp(s) => s.set_nonblocking(true),
        Conn::Unix(s) => s.set_nonblocking(true),
    }
}

impl StreamBackend {
    pub fn new(o: &StreamOptions) -> Result<StreamBackend, String> {
        let label = o.addr.to_string();
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: socketpair writes two descriptors into `fds`, which has room for them.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(format!("socketpair: {}", io::Error::last_os_error()));
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut local = None;
        let mut file = None;
        let mut conn = None;
        let mut listener = None;
        if o.server {
            match &o.addr {
                StreamAddr::Inet(list) => {
                    let a = list.first().ok_or("no address to listen on")?;
                    let l =
                        TcpListener::bind(a).map_err(|e| format!("cannot listen on {a}: {e}"))?;
                    local = l.local_addr().ok();
                    l.set_nonblocking(true).map_err(|e| e.to_string())?;
                    listener = Some(Listener::Tcp(l));
                }
                StreamAddr::Unix(p) => {
                    sys::unlink_stale_socket(p)
                        .map_err(|e| format!("cannot listen on {}: {e}", p.display()))?;
                    let l = UnixListener::bind(p)
                        .map_err(|e| format!("cannot listen on {}: {e}", p.display()))?;
                    file = Some(SocketFile::record(p).map_err(|e| e.to_string())?);
                    l.set_nonblocking(true).map_err(|e| e.to_string())?;
                    listener = Some(Listener::Unix(l));
                }
            }
        } else {
            match connect(&o.addr) {
                Ok(c) => {
                    set_nonblocking(&c).map_err(|e| e.to_string())?;
                    conn = Some(c);
                }
                Err(e) if o.reconnect.is_some() => {
                    log::warn!(
                        "stream {label}: cannot connect ({e}); link down, retrying every {:?}",
                        o.reconnect.unwrap()
                    );
                }
                Err(e) => return Err(format!("cannot connect to {label}: {e}")),
            }
        }
        let link = Link::new(
            format!("stream {label}"),
            conn.is_some(),
            "a peer is back".into(),
        )?;
        let relay = Relay {
            link: link.clone(),
            pair: theirs,
            addr: o.addr.clone(),
            listener,
            conn,
            reconnect: if o.server { None } else { o.reconnect },
            next_connect: o.reconnect.map(|r| Instant::now() + r),
            rbuf: vec![0; 4 + MAX_FRAME + 64 * 1024].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            rx_blocked: false,
            tbuf: vec![0; 4 + MAX_FRAME].into_boxed_slice(),
            toff: 0,
            tlen: 0,
        };
        let relay = Helper::spawn(&link, "stream-relay", move || relay.run())?;
        Ok(StreamBackend {
            _relay: relay,
            pair: ours,
            link,
            local,
            _file: file,
        })
    }

    /// The Unix socket file this backend bound (removed when it is dropped, if still ours).
    pub fn socket_path(&self) -> Option<&std::path::Path> {
        self._file.as_ref().map(|f| f.path())
    }

    /// The address a TCP server listens on (its port when port 0 was asked for).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }
}

impl NetBackend for StreamBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<()> {
        if !self.link.is_up() {
            self.link.count_dropped();
            return Ok(());
        }
        match sys::send_iov(self.pair.as_raw_fd(), frame, None) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            Err(e) => {
                log::debug!("{}: dropped a frame: {e}", self.link.name);
                self.link.count_dropped();
                Ok(())
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        sys::recv_frame(self.pair.as_raw_fd(), buf)
    }

    fn fd(&self) -> RawFd {
        self.pair.as_raw_fd()
    }

    fn link_up(&self) -> bool {
        self.link.is_up()
    }

    fn dropped(&self) -> u64 {
        self.link.dropped()
    }
}

/// The relay thread's state.
struct Relay {
    link: Arc<Link>,
    pair: OwnedFd,
    addr: StreamAddr,
    listener: Option<Listener>,
    conn: Option<Conn>,
    reconnect: Option<Duration>,
    next_connect: Option<Instant>,
    /// Bytes from the peer, `rstart..rend` not yet handed over.
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    /// A whole frame waits in `rbuf` for room in the pair.
    rx_blocked: bool,
    /// The frame (with its length) being written to the peer: `toff..tlen` is left.
    tbuf: Box<[u8]>,
    toff: usize,
    tlen: usize,
}

const PUMP_ROUNDS: usize = 64;

impl Relay {
    fn run(mut self) {
        loop {
            if self.link.stopping() {
                return;
            }
            self.pump();
            let mut fds = vec![(self.link.wake.as_raw_fd(), libc::POLLIN)];
            let mut pair_ev = 0;
            if self.tlen == 0 {
                pair_ev |= libc::POLLIN;
            }
            if self.rx_blocked {
                pair_ev |= libc::POLLOUT;
            }
            fds.push((
                if pair_ev != 0 {
                    self.pair.as_raw_fd()
                } else {
                    -1
                },
                pair_ev,
            ));
            let mut timeout = -1;
            match &self.conn {
                Some(c) => {
                    let mut ev = 0;
                    if !self.rx_blocked {
                        ev |= libc::POLLIN;
                    }
                    if self.tlen > 0 {
                        ev |= libc::POLLOUT;
                    }
                    // fd -1: not watched at all (a hung-up peer would otherwise wake us
                    // while we wait for the guest).
                    fds.push((if ev != 0 { c.fd() } else { -1 }, ev));
                }
                None => {
                    if let Some(l) = &self.listener {
                        fds.push((l.fd(), libc::POLLIN));
                    } else if let (Some(_), Some(at)) = (self.reconnect, self.next_connect) {
                        timeout =
                            at.saturating_duration_since(Instant::now()).as_millis() as i32 + 1;
                    }
                }
            }
            match sys::poll(&fds, timeout) {
                Ok(r) => {
                    if r[0] != 0 {
                        let _ = self.link.wake.read();
                    }
                }
                Err(e) => {
                    log::error!("{}: poll: {e}", self.link.name);
                    return;
                }
            }
            if self.conn.is_none() {
                self.try_peer();
            }
        }
    }

    /// Accepts a waiting peer (server) or connects when it is time (client).
    fn try_peer(&mut self) {
        if let Some(l) = &self.listener {
            match l.accept() {
                Ok((c, from)) => {
                    if let Err(e) = set_nonblocking(&c) {
                        log::warn!("{}: {e}", self.link.name);
                        return;
                    }
                    self.conn = Some(c);
                    self.link.set_up(&format!("connection from {from}"));
                    self.nudge();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => log::debug!("{}: accept: {e}", self.link.name),
            }
            return;
        }
        let (Some(every), Some(at)) = (self.reconnect, self.next_connect) else {
            return;
        };
        if Instant::now() < at {
            return;
        }
        self.next_connect = Some(Instant::now() + every);
        match connect(&self.addr).and_then(|c| set_nonblocking(&c).map(|_| c)) {
            Ok(c) => {
                self.conn = Some(c);
                self.link.set_up("connected");
                self.nudge();
            }
            Err(e) => log::debug!("{}: reconnect: {e}", self.link.name),
        }
    }

    fn lose_peer(&mut self, why: &str) {
        self.conn = None;
        self.rstart = 0;
        self.rend = 0;
        self.rx_blocked = false;
        if self.tlen > 0 {
            self.link.count_dropped();
            self.tlen = 0;
            self.toff = 0;
        }
        self.link.set_down(why);
        self.nudge();
        if let Some(r) = self.reconnect {
            self.next_connect = Some(Instant::now() + r);
        }
    }

    /// An empty message to the guest side (skipped by `recv`): the fd turns readable once,
    /// so the NIC model gets an event on a change of link state.
    fn nudge(&self) {
        let _ = sys::send_iov(self.pair.as_raw_fd(), &[], None);
    }

    /// Moves what can move without blocking, a bounded number of rounds.
    fn pump(&mut self) {
        for _ in 0..PUMP_ROUNDS {
            let mut progress = false;
            if self.conn.is_none() {
                // Frames the guest sent just before the link went down.
                while let Ok(Some(_)) = sys::recv(self.pair.as_raw_fd(), &mut self.tbuf[4..]) {
                    self.link.count_dropped();
                }
                return;
            }
            // Guest to peer.
            if self.tlen == 0 {
                match sys::recv(self.pair.as_raw_fd(), &mut self.tbuf[4..]) {
                    Ok(Some(n)) if n > 0 => {
                        self.tbuf[..4].copy_from_slice(&(n as u32).to_be_bytes());
                        self.tlen = 4 + n;
                        self.toff = 0;
                        progress = true;
                    }
                    _ => {}
                }
            }
            if self.tlen > 0 {
                let c = self.conn.as_mut().unwrap();
                match c.write(&self.tbuf[self.toff..self.tlen]) {
                    Ok(n) => {
                        self.toff += n;
                        if self.toff == self.tlen {
                            self.tlen = 0;
                            self.toff = 0;
                        }
                        progress |= n > 0;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(e) => {
                        self.lose_peer(&format!("send to the peer failed ({e})"));
                        return;
                    }
                }
            }
            // Peer to guest.
            match self.deliver() {
                Ok(p) => progress |= p,
                Err(why) => {
                    self.lose_peer(&why);
                    return;
                }
            }
            if !self.rx_blocked {
                if self.rend == self.rbuf.len() {
                    self.rbuf.copy_within(self.rstart..self.rend, 0);
                    self.rend -= self.rstart;
                    self.rstart = 0;
                }
                let c = self.conn.as_mut().unwrap();
                match c.read(&mut self.rbuf[self.rend..]) {
                    Ok(0) => {
                        self.lose_peer("the peer closed the connection");
                        return;
                    }
                    Ok(n) => {
                        self.rend += n;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(e) => {
                        self.lose_peer(&format!("receive from the peer failed ({e})"));
                        return;
                    }
                }
            }
            if !progress {
                return;
            }
        }
        // Still busy: come back right after a look at the wake-up fd.
        let _ = self.link.wake.write(1);
    }

    /// Hands whole frames in `rbuf` to the pair. Ok(true) when one moved; Err on a length
    /// no frame can have.
    fn deliver(&mut self) -> Result<bool, String> {
        let mut moved = false;
        self.rx_blocked = false;
        while self.rend - self.rstart >= 4 {
            let h = &self.rbuf[self.rstart..self.rstart + 4];
            let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            if len > MAX_FRAME {
                return Err(format!(
                    "the peer sent a {len}-byte frame length (not QEMU's framing?)"
                ));
            }
            if self.rend - self.rstart < 4 + len {
                // Make sure the rest of the frame fits behind it.
                if self.rstart + 4 + len > self.rbuf.len() {
                    self.rbuf.copy_within(self.rstart..self.rend, 0);
                    self.rend -= self.rstart;
                    self.rstart = 0;
                }
                break;
            }
            if len > 0 {
                let f = &self.rbuf[self.rstart + 4..self.rstart + 4 + len];
                match sys::send_iov(self.pair.as_raw_fd(), &[IoSlice::new(f)], None) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.rx_blocked = true;
                        break;
                    }
                    Err(e) => {
                        log::debug!("{}: frame for the guest lost: {e}", self.link.name);
                    }
                }
            }
            self.rstart += 4 + len;
            moved = true;
        }
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
        Ok(moved)
    }
}
