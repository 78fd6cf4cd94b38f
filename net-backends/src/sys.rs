//! What the socket backends (vde, stream, dgram) need beyond socket2 and std: Unix socket
//! addresses checked with a message that names the path, dissolving a datagram socket's
//! association, sends that never raise SIGPIPE, receives that skip what is not a frame, and
//! socket files removed again when their owner goes away.

use socket2::{SockAddr, SockAddrStorage, Socket};
use std::io::{self, IoSlice, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bytes of `sun_path` (the kernel's limit for a path, including its NUL).
pub(crate) const SUN_PATH_LEN: usize = 108;

/// The address of a Unix socket file (not abstract, not unnamed).
pub(crate) fn unix_addr(path: &Path) -> io::Result<SockAddr> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= SUN_PATH_LEN || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "not usable as a Unix socket path (1 to {} bytes)",
                SUN_PATH_LEN - 1
            ),
        ));
    }
    SockAddr::unix(path)
}

/// Dissolves a datagram socket's association (connect to AF_UNSPEC).
pub(crate) fn disconnect(s: &Socket) -> io::Result<()> {
    let len = std::mem::size_of::<libc::sockaddr>() as libc::socklen_t;
    // SAFETY: the storage is all zeroes, which is family AF_UNSPEC, initialised well past
    // `len` bytes.
    let unspec = unsafe { SockAddr::new(SockAddrStorage::zeroed(), len) };
    s.connect(&unspec)
}

/// Sends one frame (one datagram, or as much of it as a stream socket takes) without blocking
/// and without SIGPIPE, to `to` or to the connected peer. EINTR is retried.
pub(crate) fn send(s: &Socket, iov: &[IoSlice<'_>], to: Option<&SockAddr>) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    loop {
        let r = match to {
            Some(a) => s.send_to_vectored_with_flags(iov, a, flags),
            None => s.send_vectored_with_flags(iov, flags),
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Reads without blocking (the socket is non-blocking); `Ok(None)` when nothing is waiting.
/// A datagram longer than `buf` is cut to it.
pub(crate) fn read(mut s: &Socket, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match s.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Receives the next frame from a datagram socket without blocking: empty datagrams are not
/// frames and are skipped (a bounded number per call), and a pending error from a peer that
/// went away (ECONNREFUSED, ECONNRESET) is consumed, not returned.
pub(crate) fn recv_frame(s: &Socket, buf: &mut [u8]) -> io::Result<Option<usize>> {
    const MAX_SKIPPED: usize = 16;
    for _ in 0..MAX_SKIPPED {
        match read(s, buf) {
            Ok(Some(0)) => continue,
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
    Ok(None)
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
    use socket2::{Domain, Type};

    #[test]
    fn recv_frame_skips_empty_datagrams_and_gives_up_on_a_flood_of_them() {
        let (a, b) = Socket::pair(Domain::UNIX, Type::DGRAM.nonblocking(), None).unwrap();
        send(&b, &[], None).unwrap();
        send(&b, &[IoSlice::new(b"fra"), IoSlice::new(b"me")], None).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            recv_frame(&a, &mut buf).unwrap(),
            Some(5),
            "empty one skipped"
        );
        assert_eq!(&buf[..5], b"frame");
        for _ in 0..40 {
            send(&b, &[], None).unwrap();
        }
        assert_eq!(
            recv_frame(&a, &mut buf).unwrap(),
            None,
            "bounded, not a frame"
        );
        assert_eq!(recv_frame(&a, &mut buf).unwrap(), None);
        assert_eq!(recv_frame(&a, &mut buf).unwrap(), None);
        assert_eq!(recv_frame(&a, &mut buf).unwrap(), None, "all read by now");
    }

    #[test]
    fn unix_paths_are_checked_and_disconnect_dissolves_a_pair() {
        assert!(unix_addr(Path::new("")).is_err());
        let long = "x".repeat(SUN_PATH_LEN);
        let e = unix_addr(Path::new(&long)).unwrap_err().to_string();
        assert!(e.contains("1 to 107 bytes"), "{e}");
        assert_eq!(
            unix_addr(Path::new("/tmp/s")).unwrap().as_pathname(),
            Some(Path::new("/tmp/s"))
        );
        let dir = std::env::temp_dir().join(format!("nicvm-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (pa, pb) = (dir.join("a"), dir.join("b"));
        let a = Socket::new(Domain::UNIX, Type::DGRAM.nonblocking(), None).unwrap();
        let b = Socket::new(Domain::UNIX, Type::DGRAM.nonblocking(), None).unwrap();
        a.bind(&unix_addr(&pa).unwrap()).unwrap();
        b.bind(&unix_addr(&pb).unwrap()).unwrap();
        a.connect(&unix_addr(&pb).unwrap()).unwrap();
        send(&a, &[IoSlice::new(b"x")], None).unwrap();
        disconnect(&a).unwrap();
        let e = send(&a, &[IoSlice::new(b"x")], None).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
