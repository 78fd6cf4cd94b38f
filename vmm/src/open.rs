//! Opening the files a command line names without hanging on a FIFO.
//!
//! A plain `open` of a FIFO waits for the other end: for ever, if nobody comes, and with the
//! exit signals blocked during set-up (see [`crate::signals`]) not even SIGTERM would end
//! that wait. Files nicvm reads whole (kernel, initramfs, snapshot) must be regular files
//! and a FIFO there is refused without being opened; files it writes to (serial log,
//! capture, pid file) may be FIFOs whose reader comes later, as under QEMU: nicvm waits for
//! the reader, but an exit signal ends the wait. Anything else is opened as it always was.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Clears O_NONBLOCK: the file is used as a plain open would have left it.
fn blocking(f: File) -> io::Result<File> {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

fn not_regular() -> io::Error {
    io::Error::other("not a regular file")
}

/// Opens `path` for reading if it is a regular file; anything else (a FIFO, a device, a
/// directory) is refused, and without being opened.
pub fn regular_file(path: &Path) -> io::Result<File> {
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    let f = File::open(path)?;
    // Replaced between the two looks: refused all the same.
    if !f.metadata()?.is_file() {
        return Err(not_regular());
    }
    Ok(f)
}

/// How often a writer waiting for a FIFO's reader looks again.
const READER_POLL: Duration = Duration::from_millis(20);

/// Opens `path` with `opts` (for writing). A FIFO without a reader is waited for, as a plain
/// open would, until `interrupted` says to stop (then `ErrorKind::Interrupted`); anything
/// else is opened plainly.
pub fn for_writing(
    opts: &OpenOptions,
    path: &Path,
    interrupted: impl Fn() -> bool,
) -> io::Result<File> {
    let is_fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    if !is_fifo {
        return opts.open(path);
    }
    let mut opts = opts.clone();
    // (The callers set no custom flags of their own.)
    opts.custom_flags(libc::O_NONBLOCK);
    loop {
        match opts.open(path) {
            Ok(f) => return blocking(f),
            // The FIFO has no reader yet.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if interrupted() {
                    return Err(io::Error::new(
                        io::ErrorKind::Interrupted,
                        "a signal came while waiting for the FIFO's reader",
                    ));
                }
                std::thread::sleep(READER_POLL);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Set when set-up gave up waiting for a FIFO's reader because of an exit signal.
static SETUP_INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether set-up stopped for an exit signal (see [`for_writing_in_setup`]).
pub fn setup_interrupted() -> bool {
    SETUP_INTERRUPTED.load(Ordering::Relaxed)
}

/// [`for_writing`] as set-up uses it: an exit signal (pending, as set-up blocks them) stops
/// the wait, and [`setup_interrupted`] says so from then on.
pub fn for_writing_in_setup(opts: &OpenOptions, path: &Path) -> io::Result<File> {
    for_writing(opts, path, exit_signal_in_setup)
}

/// Whether an exit signal waits to be taken (set-up blocks them): a set-up wait that may not
/// end on its own asks this now and then and gives up when it is true; [`setup_interrupted`]
/// says so from then on.
pub fn exit_signal_in_setup() -> bool {
    let stop = crate::signals::pending().is_some();
    if stop {
        SETUP_INTERRUPTED.store(true, Ordering::Relaxed);
    }
    stop
}

/// `File::create` for set-up (see [`for_writing_in_setup`]).
pub fn create_in_setup(path: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).create(true).truncate(true);
    for_writing_in_setup(&o, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn fifo(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("nicvm-open-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        p
    }

    #[test]
    fn a_fifo_to_read_whole_is_refused_at_once() {
        let p = fifo("read");
        let e = regular_file(&p).unwrap_err();
        assert_eq!(e.to_string(), "not a regular file");
        assert!(regular_file(Path::new("/dev/null")).is_err());
        regular_file(Path::new("/proc/self/exe")).unwrap();
        std::fs::remove_file(p).unwrap();
    }

    /// A FIFO to write: waited for until its reader comes, the file then blocking as a plain
    /// open leaves it; or until told to stop. Anything else is opened plainly: a socket
    /// (ENXIO too) fails at once.
    #[test]
    fn a_fifo_to_write_waits_for_its_reader_or_a_signal() {
        let p = fifo("write");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            s.store(true, Ordering::Relaxed);
        });
        let mut o = OpenOptions::new();
        o.write(true);
        let e = for_writing(&o, &p, || stop.load(Ordering::Relaxed)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        t.join().unwrap();

        let p2 = p.clone();
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut s = String::new();
            File::open(p2).unwrap().read_to_string(&mut s).unwrap();
            s
        });
        let mut f = for_writing(&o, &p, || false).unwrap();
        // SAFETY: fcntl F_GETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0, "left blocking");
        f.write_all(b"hello").unwrap();
        drop(f);
        assert_eq!(reader.join().unwrap(), "hello");
        std::fs::remove_file(&p).unwrap();

        let _ = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let e = for_writing(&o, &p, || panic!("waited")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENXIO));
        std::fs::remove_file(p).unwrap();
    }
}
