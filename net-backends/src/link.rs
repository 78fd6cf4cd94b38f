//! What the backends that keep a peer (VDE, stream) share, now that they run in the I/O
//! thread's event loop: the link state with its log lines and the dropped-while-down count,
//! the timer that paces reconnection, and the fds they stopped watching, kept open until the
//! loop has let them go.

use socket2::Socket;
use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;
use vmm_sys_util::timerfd::TimerFd;

/// The link as NIC models see it, and what was dropped while it was down.
pub(crate) struct Link {
    up: bool,
    dropped: u64,
    /// Names the backend in log lines (`vde /run/sw/ctl`, `stream 127.0.0.1:5555`).
    pub name: String,
    /// Until when frames are dropped, for the link-down warning.
    until: String,
}

impl Link {
    pub fn new(name: String, up: bool, until: String) -> Link {
        Link {
            up,
            dropped: 0,
            name,
            until,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The peer is back: `how` is logged (info) when the link was down.
    pub fn set_up(&mut self, how: &str) {
        if !self.up {
            self.up = true;
            log::info!("{}: {how}; link up", self.name);
        }
    }

    /// The peer is gone: one warning per outage.
    pub fn set_down(&mut self, why: &str) {
        if self.up {
            self.up = false;
            log::warn!(
                "{}: {why}; link down, frames are dropped until {}",
                self.name,
                self.until
            );
        }
    }

    /// A frame the guest sent went nowhere.
    pub fn count_dropped(&mut self) {
        self.dropped += 1;
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// A periodic, non-blocking timer: readable once per period while started.
pub(crate) struct Timer(TimerFd);

impl Timer {
    pub fn new() -> io::Result<Timer> {
        let t = TimerFd::new().map_err(io::Error::from)?;
        set_nonblocking(t.as_raw_fd())?;
        Ok(Timer(t))
    }

    /// Fires every `period` from now on (the first time one period from now).
    pub fn start(&mut self, period: Duration) {
        // A zero period would disarm the timer.
        let p = period.max(Duration::from_millis(1));
        if let Err(e) = self.0.reset(p, Some(p)) {
            log::error!("timerfd: {e}");
        }
    }

    pub fn stop(&mut self) {
        let _ = self.0.clear();
    }

    /// Takes the expirations so far (false: none; the timer was not due).
    pub fn expired(&mut self) -> bool {
        matches!(self.0.wait(), Ok(n) if n > 0)
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fds a backend no longer lists in `watch`, kept open until the event loop has unregistered
/// them.
///
/// The loop (devices' port over event-manager) unregisters an fd right after a `watch` that
/// leaves it out. Closed before that, the fd could not be unregistered (epoll_ctl fails on a
/// closed fd, and event-manager then keeps it in its table for ever), and its number, reused
/// by the backend's next socket, would be taken for the old registration. So a backend
/// retires an fd here, calls [`Retired::watched`] in every `watch`, and [`Retired::collect`]
/// at the start of every `ready`, which comes after the loop has acted on a `watch`.
///
/// A retired socket is shut down at once. If it was retired outside an event (a send from
/// a vCPU), the loop may report its hang-up once before it is unregistered: `ready` ignores
/// fds it does not list, and the port, seeing it unlisted, just lets it go.
#[derive(Default)]
pub(crate) struct Retired {
    fds: Vec<OwnedFd>,
    /// A `watch` has left out every fd in `fds`.
    unlisted: Cell<bool>,
}

impl Retired {
    /// Takes a socket out of use: shut down at once (the peer sees the connection end now),
    /// closed once the loop has let go of it.
    pub fn retire(&mut self, s: Socket) {
        let _ = s.shutdown(std::net::Shutdown::Both);
        self.fds.push(s.into());
        self.unlisted.set(false);
    }

    /// From `watch`, which does not list the retired fds.
    pub fn watched(&self) {
        if !self.fds.is_empty() {
            self.unlisted.set(true);
        }
    }

    /// From `ready`: closes what the loop has let go of.
    pub fn collect(&mut self) {
        if self.unlisted.get() {
            self.fds.clear();
            self.unlisted.set(false);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.fds.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_fds_close_only_after_a_watch() {
        use socket2::{Domain, Type};
        let mut r = Retired::default();
        let fd = |r: &Retired| r.fds.first().map(|f| f.as_raw_fd());
        let (a, mut peer) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        r.retire(a);
        let n = fd(&r).unwrap();
        r.collect();
        assert_eq!(r.len(), 1, "not unregistered yet: still open");
        let mut b = [0u8; 1];
        assert_eq!(
            std::io::Read::read(&mut peer, &mut b).unwrap(),
            0,
            "but shut down: the peer sees the end at once"
        );
        r.watched();
        r.retire(Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap().0);
        assert_ne!(r.fds[1].as_raw_fd(), n, "no number reused while retired");
        r.collect();
        assert_eq!(r.len(), 2, "the second one was not left out of a watch yet");
        r.watched();
        r.collect();
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn link_counts_and_flips() {
        let mut l = Link::new("t".into(), false, "never".into());
        l.set_up("hello");
        assert!(l.is_up());
        l.set_down("bye");
        l.set_down("bye again");
        l.count_dropped();
        assert!(!l.is_up());
        assert_eq!(l.dropped(), 1);
    }

    #[test]
    fn timer_is_readable_once_per_period_and_never_blocks() {
        let mut t = Timer::new().unwrap();
        assert!(!t.expired(), "not started: not due, and no blocking");
        t.start(Duration::from_millis(10));
        std::thread::sleep(Duration::from_millis(30));
        assert!(t.expired());
        t.stop();
        assert!(!t.expired());
    }
}
