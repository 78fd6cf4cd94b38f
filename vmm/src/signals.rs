//! SIGINT, SIGTERM, SIGHUP and SIGUSR1 end nicvm cleanly: they are blocked in every thread and read
//! from a signalfd by the supervisor, which waits for them or the guest's own exit.

use devices::lifecycle::{ExitReason, Lifecycle};
use std::io;
use std::os::fd::AsRawFd;

const SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1];

pub struct SignalFd(std::os::fd::OwnedFd);

/// The signal the kernel sends when another process wants to write a snapshot file a
/// restored guest's RAM is mapped from (its lease breaks): blocked in every thread too, and
/// read from a signalfd of its own by the thread that holds the lease.
pub fn lease_signal() -> libc::c_int {
    // SIGRTMIN is the vCPU kick.
    libc::SIGRTMIN() + 1
}

/// Blocks the exit signals (and [`lease_signal`], and SIGIO) for this thread and the threads it spawns
/// later; the signalfd reads the exit signals.
pub fn block_and_open() -> io::Result<SignalFd> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset.
    let fd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, lease_signal());
        // A lease break falls back to SIGIO when the realtime signal cannot be queued.
        libc::sigaddset(&mut set, libc::SIGIO);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new descriptor we now own.
    Ok(SignalFd(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
}

/// The first exit signal waiting to be taken (they are blocked everywhere), if any: what
/// set-up checks while it waits for something that may never come.
pub fn pending() -> Option<&'static str> {
    // SAFETY: sigset_t is plain data, filled in by sigpending.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        if libc::sigpending(&mut set) != 0 {
            return None;
        }
        set
    };
    SIGNALS
        .into_iter()
        // SAFETY: testing a member of a set sigpending filled in.
        .find(|&s| unsafe { libc::sigismember(&set, s) } == 1)
        .map(|s| signal_name(s as u32))
}

fn signal_name(s: u32) -> &'static str {
    match s as libc::c_int {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        libc::SIGUSR1 => "SIGUSR1",
        _ => "signal",
    }
}

/// Waits until the guest ends or a signal arrives; returns the reason. A guest held after
/// shutting down (`-no-shutdown`) is not an end: `on_held` is called once, when it happens.
pub fn wait_for_exit(
    lifecycle: &Lifecycle,
    signals: &SignalFd,
    on_held: &mut dyn FnMut(),
) -> ExitReason {
    let mut told = false;
    let mut fds = [
        libc::pollfd {
            fd: lifecycle.event().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: signals.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        if let Some(r) = lifecycle.reason() {
            return r;
        }
        if !told && lifecycle.held().is_some() {
            told = true;
            // Its wake-up read, so that the next poll sleeps until the end. An exit asked
            // for meanwhile has its reason recorded before its wake-up: seen at the top.
            let _ = lifecycle.event().read();
            on_held();
            continue;
        }
        // SAFETY: polling two descriptors we own, array length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue;
        }
        if fds[1].revents & libc::POLLIN != 0 {
            // SAFETY: signalfd_siginfo is plain data; reading exactly its size.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let sz = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: the buffer is `sz` bytes long.
            let r = unsafe {
                libc::read(
                    fds[1].fd,
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    sz,
                )
            };
            if r == sz as isize {
                lifecycle.request_exit(ExitReason::User(signal_name(info.ssi_signo).into()));
            }
        }
    }
}
