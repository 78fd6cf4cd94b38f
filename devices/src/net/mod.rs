//! The network side of the NIC models: the port they share ([`port`]), their counters, the
//! one-shot timer they use for interrupt mitigation and delayed work, the offloads done in
//! "hardware" ([`offload`]), the buffer a model copies a frame into ([`tx_stage`]) and the
//! sums over a received frame ([`fcs`]).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

pub mod fcs;
pub mod guest_iov;
pub mod port;
pub mod tx_stage;
pub use port::{
    BackendInterest, NetEvent, NetPort, Nic, NicControl, NicModel, Rx, RxFilter, RxState, Sent,
};

/// What every NIC model counts, for benchmarks and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct NicStats {
    pub tx_frames: u64,
    pub rx_frames: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Interrupts raised (MSI-X messages, or INTx assertions).
    pub interrupts: u64,
    /// Frames the receive filter or the guest's lack of buffers dropped.
    pub rx_dropped: u64,
    /// Frames the backend dropped itself (peer gone, queue full, a tap's interface down) or
    /// failed to send with an error it passed up.
    pub backend_dropped: u64,
}

/// A one-shot monotonic timer a NIC model arms for interrupt mitigation or delayed work; the
/// I/O thread watches its fd ([`NicModel::timer_fd`]). Non-blocking, so a timer re-armed between
/// the wakeup and the read never stalls the loop.
pub struct Timer {
    fd: OwnedFd,
}

impl Timer {
    pub fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create takes no pointers; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Timer { fd })
    }

    /// Fires once after `after` (a zero duration fires at once); replaces any earlier arming.
    pub fn arm(&self, after: Duration) {
        let after = after.max(Duration::from_nanos(1));
        self.set(libc::timespec {
            tv_sec: after.as_secs() as libc::time_t,
            tv_nsec: after.subsec_nanos() as libc::c_long,
        });
    }

    pub fn disarm(&self) {
        self.set(libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        });
    }

    fn set(&self, value: libc::timespec) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: the fd is our timerfd and `spec` lives across the call; the old value is
        // not requested.
        let r =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        debug_assert_eq!(r, 0, "timerfd_settime");
    }

    /// Consumes the expiry; true when the timer had fired.
    pub fn take(&self) -> bool {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into `n`, which is 8 bytes long.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
        r == 8
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

pub mod offload;

#[cfg(test)]
mod tests {
    use super::Timer;
    use std::time::Duration;

    #[test]
    fn timer_fires_once_and_rearms() {
        let t = Timer::new().unwrap();
        assert!(!t.take(), "a new timer has not fired");
        t.arm(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(t.take());
        assert!(!t.take(), "one shot");
        t.arm(Duration::from_secs(60));
        t.disarm();
        assert!(!t.take());
    }
}
