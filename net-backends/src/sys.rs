//! Socket plumbing shared by the socket-based backends (vde, stream, dgram): raw socket
//! addresses (Unix paths and IPv4/IPv6), non-blocking scatter-gather sends, and socket files
//! that are removed again when their owner goes away.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A socket address in the form the kernel takes it.
#[derive(Clone, Copy)]
pub(crate) enum RawAddr {
    Unix(libc::sockaddr_un),
    V4(libc::sockaddr_in),
    V6(libc::sockaddr_in6),
}

/// Bytes of `sun_path` (the kernel's limit for a path, including its NUL).
pub(crate) const SUN_PATH_LEN: usize = 108;

impl RawAddr {
    pub fn unix(path: &Path) -> io::Result<RawAddr> {
        let bytes = path.as_os_str().as_bytes();
        if bytes.is_empty() || bytes.len() >= SUN_PATH_LEN || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: not usable as a Unix socket path (1 to {} bytes)",
                    path.display(),
                    SUN_PATH_LEN - 1
                ),
            ));
        }
        // SAFETY: sockaddr_un is plain old data; all zeroes is a valid (empty) value.
        let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in sun.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        Ok(RawAddr::Unix(sun))
    }

    pub fn inet(a: SocketAddr) -> RawAddr {
        match a {
            SocketAddr::V4(a) => {
                // SAFETY: sockaddr_in is plain old data; all zeroes is valid.
                let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                s.sin_family = libc::AF_INET as libc::sa_family_t;
                s.sin_port = a.port().to_be();
                s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
                RawAddr::V4(s)
            }
            SocketAddr::V6(a) => {
                // SAFETY: sockaddr_in6 is plain old data; all zeroes is valid.
                let mut s: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                s.sin6_port = a.port().to_be();
                s.sin6_addr.s6_addr = a.ip().octets();
                s.sin6_flowinfo = a.flowinfo();
                s.sin6_scope_id = a.scope_id();
                RawAddr::V6(s)
            }
        }
    }

    pub fn ptr(&self) -> *const libc::sockaddr {
        match self {
            RawAddr::Unix(s) => (s as *const libc::sockaddr_un).cast(),
            RawAddr::V4(s) => (s as *const libc::sockaddr_in).cast(),
            RawAddr::V6(s) => (s as *const libc::sockaddr_in6).cast(),
        }
    }

    pub fn len(&self) -> libc::socklen_t {
        (match self {
            RawAddr::Unix(_) => std::mem::size_of::<libc::sockaddr_un>(),
            RawAddr::V4(_) => std::mem::size_of::<libc::sockaddr_in>(),
            RawAddr::V6(_) => std::mem::size_of::<libc::sockaddr_in6>(),
        }) as libc::socklen_t
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A new non-blocking, close-on-exec socket.
pub(crate) fn socket(domain: libc::c_int, ty: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked before use.
    let fd =
        cvt(unsafe { libc::socket(domain, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn bind(fd: &OwnedFd, a: &RawAddr) -> io::Result<()> {
    // SAFETY: the address pointer and length describe `a`, which outlives the call.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), a.ptr(), a.len()) }).map(drop)
}

pub(crate) fn connect(fd: &OwnedFd, a: &RawAddr) -> io::Result<()> {
    loop {
        // SAFETY: the address pointer and length describe `a`, which outlives the call.
        match cvt(unsafe { libc::connect(fd.as_raw_fd(), a.ptr(), a.len()) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map(drop),
        }
    }
}

/// Dissolves a datagram socket's association (connect to AF_UNSPEC).
pub(crate) fn disconnect(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: sockaddr is plain old data; all zeroes is valid.
    let mut a: libc::sockaddr = unsafe { std::mem::zeroed() };
    a.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    let len = std::mem::size_of::<libc::sockaddr>() as libc::socklen_t;
    // SAFETY: `a` lives across the call and `len` is its size.
    cvt(unsafe { libc::connect(fd.as_raw_fd(), &a, len) }).map(drop)
}

pub(crate) fn setsockopt<T: Copy>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    val: T,
) -> io::Result<()> {
    // SAFETY: the option value is `val`, of the size given, alive across the call.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Sends one frame (one datagram, or as much of it as a stream socket takes) without
/// blocking, to `to` or to the connected peer. EINTR is retried.
pub(crate) fn send_iov(fd: RawFd, iov: &[IoSlice<'_>], to: Option<&RawAddr>) -> io::Result<usize> {
    // SAFETY: msghdr is plain old data; all zeroes is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec; sendmsg only reads through the pointer.
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    if let Some(a) = to {
        msg.msg_name = a.ptr() as *mut libc::c_void;
        msg.msg_namelen = a.len();
    }
    loop {
        // SAFETY: `msg` points at `iov` and `to`, both alive across the call.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives without blocking; `Ok(None)` when nothing is waiting. A datagram longer than
/// `buf` is cut to it.
pub(crate) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: the kernel writes at most buf.len() bytes into `buf`.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// Receives the next frame without blocking, as the backends whose fd is a socket do: empty
/// messages (link-state nudges) are skipped, and a pending error from a peer that went away
/// (ECONNREFUSED, ECONNRESET) is consumed, not returned: it is not a frame.
///
/// A stream pair whose other end closed also reads as empty, forever: after a few empty reads
/// in a row this gives up with `Ok(None)` (the I/O thread then sees the fd hung up).
pub(crate) fn recv_frame(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    const MAX_EMPTY: usize = 16;
    let mut empty = 0;
    loop {
        match recv(fd, buf) {
            Ok(Some(0)) if empty < MAX_EMPTY => empty += 1,
            Ok(Some(0)) => return Ok(None),
            Ok(r) => return Ok(r),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNREFUSED | libc::ECONNRESET)
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        }
    }
}

/// poll(2) on a few fds; returns each one's revents. EINTR counts as a timeout.
pub(crate) fn poll(fds: &[(RawFd, i16)], timeout_ms: i32) -> io::Result<Vec<i16>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a valid array of p.len() pollfds for the duration of the call.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
        return Ok(vec![0; p.len()]);
    }
    Ok(p.iter().map(|x| x.revents).collect())
}

/// A socket file this process bound, removed when dropped unless something else has
/// replaced it meanwhile (same path, another inode).
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub fn record(path: &Path) -> io::Result<SocketFile> {
        let m = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Removes a stale socket file at `path` before binding there (as QEMU does for Unix
/// listeners): only a socket, never a regular file or directory.
pub(crate) fn unlink_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_frame_gives_up_on_a_closed_pair() {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into `fds`.
        let r =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
        assert_eq!(r, 0);
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        send_iov(b.as_raw_fd(), &[], None).unwrap();
        send_iov(b.as_raw_fd(), &[IoSlice::new(b"frame")], None).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            recv_frame(a.as_raw_fd(), &mut buf).unwrap(),
            Some(5),
            "nudge skipped"
        );
        drop(b);
        // End of file reads as empty forever; this must return, not spin.
        assert_eq!(recv_frame(a.as_raw_fd(), &mut buf).unwrap(), None);
    }
}
