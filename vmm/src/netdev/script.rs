//! The tap's scripts, run with the interface name as `$1`: `script=` once the tap is open,
//! `downscript=` when the VM has ended (dropping a [`DownScript`]).

use crate::config::Script;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// The default scripts, nicvm's own first, then QEMU's (so a line written for QEMU behaves
/// as it does there).
pub const DEFAULT_IFUP: &[&str] = &["/etc/nicvm-ifup", "/etc/qemu-ifup"];
pub const DEFAULT_IFDOWN: &[&str] = &["/etc/nicvm-ifdown", "/etc/qemu-ifdown"];

#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("cannot run {}: {source}", script.display())]
    Spawn {
        script: PathBuf,
        source: std::io::Error,
    },
    #[error("{} {ifname} failed ({status})", script.display())]
    Failed {
        script: PathBuf,
        ifname: String,
        status: ExitStatus,
    },
    #[error("{} {ifname} stopped (killed): an exit signal came", script.display())]
    Interrupted { script: PathBuf, ifname: String },
}

/// Runs `script IFNAME` and waits for it.
pub fn run(script: &Path, ifname: &str) -> Result<(), ScriptError> {
    let mut cmd = Command::new(script);
    cmd.arg(ifname);
    super::clean_child(&mut cmd, None);
    let status = cmd.status().map_err(|source| ScriptError::Spawn {
        script: script.into(),
        source,
    })?;
    checked(script, ifname, status)
}

/// Runs the up-script `script IFNAME` during set-up and waits for it, as QEMU does, for as
/// long as it takes; but an exit signal (which set-up holds back) ends the wait: the script
/// is killed and set-up fails, so that a SIGTERM ends nicvm at once, as it ends QEMU, and
/// not when the script is done. Away from a terminal the script gets a process group of its
/// own, and what it started is killed with it; on one it stays in nicvm's, the terminal's
/// foreground group, where it may prompt (sudo) and Ctrl-C reaches it too.
pub fn run_in_setup(script: &Path, ifname: &str) -> Result<(), ScriptError> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(script);
    cmd.arg(ifname);
    let own_group = !crate::console::stdin_is_tty();
    if own_group {
        cmd.process_group(0);
    }
    super::clean_child(&mut cmd, None);
    let mut child = cmd.spawn().map_err(|source| ScriptError::Spawn {
        script: script.into(),
        source,
    })?;
    // Woken when the script ends (a pidfd, Linux 5.3), else every tenth of a second.
    // SAFETY: pidfd_open of our own child, not yet reaped; no flags.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    let pidfd = (pidfd >= 0).then(|| {
        // SAFETY: pidfd_open returned a new descriptor that we now own.
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd as i32) }
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            // ECHILD: reaped by no one nicvm knows (SIGCHLD ignored by whoever started it).
            Err(source) => {
                return Err(ScriptError::Spawn {
                    script: script.into(),
                    source,
                })
            }
        }
        if crate::open::exit_signal_in_setup() {
            let pid = child.id() as libc::pid_t;
            // SAFETY: kill(2) of our child, not yet reaped, and of the process group it was
            // made the leader of (whatever is still in it; the script may have left it).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                if own_group {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
            let _ = child.wait();
            return Err(ScriptError::Interrupted {
                script: script.into(),
                ifname: ifname.into(),
            });
        }
        match &pidfd {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(fd),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd we own.
                unsafe { libc::poll(&mut pfd, 1, 100) };
            }
            None => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    };
    checked(script, ifname, status)
}

fn checked(script: &Path, ifname: &str, status: ExitStatus) -> Result<(), ScriptError> {
    if !status.success() {
        return Err(ScriptError::Failed {
            script: script.into(),
            ifname: ifname.into(),
            status,
        });
    }
    Ok(())
}

/// The script to run: the one given, none, or the first of `defaults` that exists.
pub fn resolve(s: &Script, defaults: &[&str]) -> Option<PathBuf> {
    match s {
        Script::No => None,
        Script::Path(p) => Some(p.clone()),
        Script::Default => defaults
            .iter()
            .find(|d| Path::new(d).exists())
            .map(PathBuf::from),
    }
}

/// A downscript owed: it runs, with the interface name, when this is dropped.
#[derive(Debug)]
pub struct DownScript {
    script: PathBuf,
    ifname: String,
}

impl DownScript {
    pub fn new(script: PathBuf, ifname: String) -> DownScript {
        DownScript { script, ifname }
    }
}

impl Drop for DownScript {
    fn drop(&mut self) {
        if let Err(e) = run(&self.script, &self.ifname) {
            crate::say!("nicvm: downscript: {e}");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    pub(crate) fn temp_dir(what: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nicvm-{what}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        d
    }

    /// Writes an executable script through a child process. Written here, it could not be
    /// run at once: another test's thread forking meanwhile would hold the file open for
    /// writing until its child's exec, and running it would fail with "Text file busy".
    pub(crate) fn write_script(path: &Path, text: &str) {
        use std::io::Write;
        let mut sh = Command::new("sh")
            .arg("-c")
            .arg("cat > \"$0\" && chmod 755 \"$0\"")
            .arg(path)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        sh.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        assert!(sh.wait().unwrap().success(), "{}", path.display());
    }

    /// A script that appends "$1" to `log`, then exits with `code`.
    pub(crate) fn logging_script(dir: &Path, name: &str, log: &Path, code: i32) -> PathBuf {
        let p = dir.join(name);
        write_script(
            &p,
            &format!("#!/bin/sh\necho \"$1\" >> {}\nexit {code}\n", log.display()),
        );
        p
    }

    /// A script starts with no signal blocked (nicvm blocks its exit signals in every thread)
    /// and without nicvm's descriptors (an eventfd made without close-on-exec, as
    /// vmm-sys-util makes them): run on a thread that blocks SIGTERM and holds such an fd.
    /// The shell reads its mask with builtins before it forks anything: dash empties the mask
    /// of the children it forks and blocks everything around a fork, so a `grep` of the
    /// shell's status neither sees an inherited mask nor reliably sees none.
    #[test]
    fn scripts_start_with_no_signal_blocked_and_none_of_nicvms_descriptors() {
        let dir = temp_dir("script-clean");
        let p = dir.join("check");
        write_script(
            &p,
            "#!/bin/sh\nwhile read -r k v; do [ \"$k\" = SigBlk: ] && blk=$v; done < /proc/$$/status\n\
             [ \"$blk\" = 0000000000000000 ] || exit 4\n\
             [ \"$(readlink /proc/$$/fd/$1)\" = 'anon_inode:[eventfd]' ] && exit 3\nexit 0\n",
        );
        let r = std::thread::spawn(move || {
            // SAFETY: sigset_t is plain data set up by sigemptyset/sigaddset; the mask is
            // this thread's own.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGTERM);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
            run(&p, &fd.as_raw_fd().to_string()).map_err(|e| e.to_string())
        })
        .join()
        .unwrap();
        assert_eq!(
            r,
            Ok(()),
            "3: the fd was inherited, 4: a signal was blocked"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn scripts_run_with_the_name_and_say_why_they_failed() {
        let dir = temp_dir("script-test");
        let log = dir.join("log");
        let ok = logging_script(&dir, "ok", &log, 0);
        let bad = logging_script(&dir, "bad", &log, 3);
        run(&ok, "tap7").unwrap();
        let e = run(&bad, "tap8").unwrap_err().to_string();
        assert!(e.contains("bad tap8 failed") && e.contains('3'), "{e}");
        let e = run(&dir.join("missing"), "tap9").unwrap_err().to_string();
        assert!(e.starts_with("cannot run ") && e.contains("missing"), "{e}");
        drop(DownScript::new(ok.clone(), "tap10".into()));
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "tap7\ntap8\ntap10\n"
        );

        assert_eq!(resolve(&Script::No, &["/bin/sh"]), None);
        assert_eq!(
            resolve(&Script::Default, &["/nonexistent/nicvm-ifup", "/bin/sh"]),
            Some("/bin/sh".into()),
            "QEMU's default when nicvm's is missing"
        );
        assert_eq!(resolve(&Script::Default, &["/nonexistent/ifup"]), None);
        assert_eq!(
            resolve(&Script::Path("/x".into()), &["/bin/sh"]),
            Some("/x".into())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
