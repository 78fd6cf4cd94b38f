//! Opening netdevs: a checked [`NetdevConfig`](crate::config::NetdevConfig) in, the backend
//! and a [`NetdevGuard`] out. The guard undoes what opening did (downscript, socket files,
//! directories) when it is dropped, which the caller does once the VM has ended.
//!
//! `open` builds the backends, `script` runs the tap's scripts, `bridge` makes a bridge's tap,
//! `guard` holds what is undone.

pub mod bridge;
mod guard;
pub mod open;
pub mod script;

pub use guard::NetdevGuard;
pub use open::{open, OpenError, Opened};

/// Makes `cmd` start as a program nicvm runs for a netdev (a tap's script, a bridge helper)
/// should: with no signal blocked (nicvm blocks its exit signals in every thread, and a mask
/// is inherited: such a child could not be stopped with SIGTERM) and with none of nicvm's
/// descriptors but stdin, stdout, stderr and `keep`.
pub(crate) fn clean_child(cmd: &mut std::process::Command, keep: Option<std::os::fd::RawFd>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls (sigprocmask, the
    // close_range system call, fcntl) on the child's own state.
    unsafe {
        cmd.pre_exec(move || {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            // Close-on-exec for all from 3 up (Linux 5.11); where the kernel cannot, those
            // below 1024 one by one.
            if libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                for fd in 3..1024 {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            if let Some(fd) = keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}
