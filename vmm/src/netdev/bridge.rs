//! `-netdev bridge`: a tap of the VM's own on a host bridge. QEMU runs its setuid bridge
//! helper for it, which checks its ACL (/etc/qemu/bridge.conf), makes a tap, gives it the
//! bridge's MTU, puts it on the bridge, brings it up and hands its descriptor back over a Unix
//! socket. nicvm does those steps itself when it has the privilege (CAP_NET_ADMIN: root,
//! usually; the helper's ACL is there for users without it: `Tap::on_bridge`), and otherwise
//! runs the helper as QEMU does; `helper=` names another one, which always runs.
//!
//! The tap is not persistent: it goes, and leaves the bridge, when nicvm closes it.

use crate::config::BridgeOptions;
use net_backends::tap::{Tap, TapError};
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// QEMU's helper where distributions install it (QEMU's libexecdir): Debian and Ubuntu, then
/// Fedora, RHEL and Arch.
pub const DEFAULT_HELPERS: [&str; 2] = [
    "/usr/lib/qemu/qemu-bridge-helper",
    "/usr/libexec/qemu-bridge-helper",
];

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("helper={helper}: {what}: {source}")]
    Helper {
        helper: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("helper={helper} ended ({status}) without handing a tap over")]
    HelperFailed { helper: String, status: String },
    #[error(
        "nicvm cannot make a tap itself (no CAP_NET_ADMIN) and there is no bridge helper at \
         {} (give helper=)",
        DEFAULT_HELPERS.join(" or ")
    )]
    NoHelper,
}

/// The bridged tap `o` asks for, and what made it (for the log).
pub fn open(o: &BridgeOptions) -> Result<(Tap, String), BridgeError> {
    match &o.helper {
        Some(h) => Ok((from_helper(h, &o.br)?, h.clone())),
        None if has_net_admin() => Ok((Tap::on_bridge(&o.br)?, "nicvm".into())),
        None => match DEFAULT_HELPERS
            .into_iter()
            .find(|h| std::path::Path::new(h).exists())
        {
            Some(h) => Ok((from_helper(h, &o.br)?, h.into())),
            None => Err(BridgeError::NoHelper),
        },
    }
}

/// Whether this process may make and configure interfaces (CAP_NET_ADMIN, bit 12 of the
/// effective set).
fn has_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// Runs a bridge helper as QEMU does and adopts the tap it hands over: a program gets
/// `--use-vnet --fd=N --br=BR`; a command line (with blanks) runs through `sh -c` with
/// `--use-vnet --fd=N` and, unless it says `--br=` itself, `--br=BR`. Its stderr is nicvm's.
fn from_helper(helper: &str, br: &str) -> Result<Tap, BridgeError> {
    let fail = |what, source| BridgeError::Helper {
        helper: helper.into(),
        what,
        source,
    };
    let (ours, theirs) = UnixStream::pair().map_err(|e| fail("no socket pair", e))?;
    let their_fd = theirs.as_raw_fd();
    let mut cmd = if helper.contains(char::is_whitespace) {
        let mut line = format!("{helper} --use-vnet --fd={their_fd}");
        if !helper.contains("--br=") {
            line += &format!(" --br={br}");
        }
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(line);
        c
    } else {
        let mut c = Command::new(helper);
        c.args([
            "--use-vnet".to_string(),
            format!("--fd={their_fd}"),
            format!("--br={br}"),
        ]);
        c
    };
    // A group of its own, so that giving up on it takes what it started too (a shell's
    // children); nicvm hears the terminal's Ctrl-C and stops it.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0);
    // Its end of the pair is the one descriptor of nicvm's it gets.
    super::clean_child(&mut cmd, Some(their_fd));
    let mut child = cmd.spawn().map_err(|e| fail("cannot start it", e))?;
    drop(theirs);
    // The answer comes when the helper hands the tap over, or its end closes as it exits; one
    // that does neither is given up on (QEMU would wait for ever).
    let mut pfd = libc::pollfd {
        fd: ours.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let start = std::time::Instant::now();
    let give_up = |child: &mut std::process::Child, why: io::Error| {
        // SAFETY: kill(2) of the helper's process group (its pid), which it has not left.
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = child.wait();
        fail("gave up waiting for it (killed)", why)
    };
    // Why to stop waiting for the helper (an exit signal, or the time is up), checked a tenth
    // of a second at a time.
    let stop = || {
        if crate::open::exit_signal_in_setup() {
            return Some(io::Error::new(
                io::ErrorKind::Interrupted,
                "an exit signal came",
            ));
        }
        (start.elapsed() > HELPER_TIMEOUT).then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer in {} s", HELPER_TIMEOUT.as_secs()),
            )
        })
    };
    loop {
        // SAFETY: one pollfd we own, for a tenth of a second.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        if n > 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if n < 0 && e.kind() != io::ErrorKind::Interrupted {
            return Err(give_up(&mut child, e));
        }
        if let Some(why) = stop() {
            return Err(give_up(&mut child, why));
        }
    }
    let mut byte = [0u8; 1];
    let got = ours.recv_with_fd(&mut byte);
    // Then its exit, under the same rules (one that hands the tap over and stays is not
    // waited for without end either).
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(give_up(&mut child, e)),
        }
        if let Some(why) = stop() {
            return Err(give_up(&mut child, why));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    match got {
        Ok((_, Some(file))) if status.success() => {
            let fd = file.into_raw_fd();
            // SAFETY: a descriptor we were just handed and own alone; from_fd takes it over
            // once it has checked that it is a tap.
            match unsafe { Tap::from_fd(fd, None) } {
                Ok(tap) => Ok(tap),
                Err(TapError::BadFd(_, _, e)) => {
                    // Not taken over: ours to close.
                    // SAFETY: the descriptor is ours and used nowhere else.
                    unsafe { libc::close(fd) };
                    Err(fail("handed over something that is not a tap", e))
                }
                Err(e) => Err(e.into()),
            }
        }
        Ok(_) => Err(BridgeError::HelperFailed {
            helper: helper.into(),
            status: status.to_string(),
        }),
        Err(e) => Err(fail("reading its answer", io::Error::from(e))),
    }
}

/// How long a bridge helper may take to hand its tap over.
const HELPER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
