//! `-daemonize` and `-pidfile`, as QEMU does them: the caller's process waits until the VM is
//! set up and exits with 0 then, or with the set-up's failure status (whose message the
//! child has already printed on the caller's stderr); a pid file holds a lock while nicvm
//! runs and is removed at exit.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The child's end of the status pipe.
pub struct Daemon {
    status: File,
}

/// Forks. The parent never returns from this: it exits with 0 once the child says it is
/// set up, or with the child's exit status (1 if that is 0) if the child ends first. The child, in a
/// session of its own, returns.
pub fn fork_into_background() -> io::Result<Daemon> {
    let mut fds = [0; 2];
    // SAFETY: a two-int array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new descriptors we now own.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let _ = io::stdout().flush();
    // SAFETY: nicvm has no other thread yet (forking is done before the VM is built), so the
    // child is a full copy; both sides only use their own descriptors afterwards.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid > 0 {
        drop(w);
        // The exit signals were blocked for the VM (before this fork): the caller, which
        // only waits, can be interrupted again (the child goes on; `wait=on` can wait long).
        // SAFETY: sigset_t is plain data initialised by sigemptyset; unblocking every signal
        // of this (single-threaded) process.
        unsafe {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        }
        let mut byte = [0u8; 1];
        let mut r = File::from(r);
        let got = loop {
            match r.read(&mut byte) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(n) => break n,
                Err(_) => break 0,
            }
        };
        if got == 1 {
            std::process::exit(byte[0] as i32);
        }
        // The child ended before it was set up: its status is ours, and a failure even
        // when the child's own is 0 (a signal ended its set-up): no VM runs.
        let mut status = 0;
        // SAFETY: waiting for our own child; `status` is a valid int.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        let code = if waited == pid && libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status).max(1)
        } else {
            1
        };
        std::process::exit(code);
    }
    drop(r);
    // SAFETY: setsid only changes the calling process's session.
    unsafe { libc::setsid() };
    Ok(Daemon {
        status: File::from(w),
    })
}

impl Daemon {
    /// The VM is set up: the caller's process exits 0, and the standard streams are
    /// pointed at /dev/null (the guest and nicvm no longer own a terminal).
    pub fn set_up_done(mut self) {
        let _ = self.status.write_all(&[0]);
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            for fd in 0..3 {
                // SAFETY: dup2 onto the standard descriptors, from one we own.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
        }
    }
}

/// A pid file: written and locked while nicvm runs, removed when dropped.
pub struct PidFile {
    path: PathBuf,
    _file: File,
}

impl PidFile {
    pub fn create(path: &Path) -> io::Result<PidFile> {
        let mut opts = std::fs::OpenOptions::new();
        // Readable by its owner alone, as QEMU makes it.
        opts.write(true).create(true).truncate(false).mode(0o600);
        let mut file = crate::open::for_writing_in_setup(&opts, path)?;
        // Two locks: flock, which another nicvm takes (in this process too), and the POSIX
        // record lock QEMU takes (`lockf`): neither sees the other kind.
        // SAFETY: flock and lockf on a descriptor we own.
        // A file system without POSIX locks (ENOLCK) has flock's alone.
        let locked = unsafe {
            libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0
                && (libc::lockf(file.as_raw_fd(), libc::F_TLOCK, 0) == 0
                    || io::Error::last_os_error().raw_os_error() == Some(libc::ENOLCK))
        };
        if !locked {
            let e = io::Error::last_os_error();
            let held = matches!(e.raw_os_error(), Some(libc::EWOULDBLOCK | libc::EACCES));
            return Err(if held {
                io::Error::other("locked by another running nicvm or QEMU")
            } else {
                e
            });
        }
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        Ok(PidFile {
            path: path.to_path_buf(),
            _file: file,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_is_written_locked_and_removed() {
        let p = std::env::temp_dir().join(format!("nicvm-pidfile-test.{}", std::process::id()));
        let f = PidFile::create(&p).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!("{}\n", std::process::id())
        );
        // Its owner's alone, as QEMU makes it.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert!(PidFile::create(&p).is_err(), "a second one is refused");
        // QEMU's lock (lockf, a POSIX record lock) as another process holds it: refused too.
        drop(f);
        assert!(!p.exists());
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import fcntl,sys;f=open(sys.argv[1],'w');fcntl.lockf(f,fcntl.LOCK_EX);\
                 print('locked',flush=True);sys.stdin.read()",
            ])
            .arg(&p)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "locked\n");
        let e = PidFile::create(&p).err().expect("QEMU's lock is seen");
        assert!(e.to_string().contains("locked by another"), "{e}");
        drop(child.stdin.take());
        child.wait().unwrap();
        let f = PidFile::create(&p).unwrap();
        drop(f);
        let _ = std::fs::remove_file(&p);
    }
}
