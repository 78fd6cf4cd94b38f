//! How the guest (or the user) ends a VM: every path records one reason and wakes the main
//! thread, which cleans up and exits with that reason's code.

use std::sync::{Condvar, Mutex};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest rebooted (nicvm behaves as with QEMU's `-no-reboot`).
    Reboot,
    /// The guest powered off.
    PowerOff,
    /// The user quit (Ctrl-a x, a signal).
    User(String),
    /// The guest kernel said it panicked (pvpanic).
    GuestPanic,
    /// The guest did something that cannot continue (triple fault, emulation failure).
    GuestCrash(String),
    /// nicvm itself failed while running.
    Error(String),
}

impl ExitReason {
    /// Process exit code: 0 for an orderly end, 2 for a guest panic, 3 for a crash or VMM error.
    pub fn code(&self) -> i32 {
        match self {
            ExitReason::Reboot | ExitReason::PowerOff | ExitReason::User(_) => 0,
            ExitReason::GuestPanic => 2,
            ExitReason::GuestCrash(_) | ExitReason::Error(_) => 3,
        }
    }
}

pub struct Lifecycle {
    reason: Mutex<Option<ExitReason>>,
    event: EventFd,
    /// The monitor stopped the guest (QMP stop, -S): vCPUs wait until it is cleared.
    paused: Mutex<bool>,
    resumed: Condvar,
    /// vCPUs waiting in [`Lifecycle::wait_while_paused`].
    parked: std::sync::atomic::AtomicUsize,
}

impl Lifecycle {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
            paused: Mutex::new(false),
            resumed: Condvar::new(),
            parked: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Stops (true) or resumes the vCPUs. A vCPU in the guest only sees it once kicked out.
    pub fn set_paused(&self, paused: bool) {
        *self.paused.lock().unwrap() = paused;
        self.resumed.notify_all();
    }

    pub fn paused(&self) -> bool {
        *self.paused.lock().unwrap()
    }

    /// For vCPU threads: returns when the VM is not paused, or is ending.
    pub fn wait_while_paused(&self) {
        use std::sync::atomic::Ordering;
        let mut p = self.paused.lock().unwrap();
        if !*p {
            return;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        while *p && !self.exit_requested() {
            p = self.resumed.wait(p).unwrap();
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }

    /// How many vCPUs are stopped by a pause now.
    pub fn parked(&self) -> usize {
        self.parked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records the first reason given; later ones are ignored.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap();
        if r.is_none() {
            *r = Some(reason);
            let _ = self.event.write(1);
            drop(r);
            // Paused vCPUs wake up to end.
            let _p = self.paused.lock().unwrap();
            self.resumed.notify_all();
        }
    }

    pub fn exit_requested(&self) -> bool {
        self.reason.lock().unwrap().is_some()
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason.lock().unwrap().clone()
    }

    /// Readable once an exit was requested.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let l = Lifecycle::new().unwrap();
        assert!(!l.exit_requested());
        l.request_exit(ExitReason::GuestPanic);
        l.request_exit(ExitReason::Reboot);
        assert_eq!(l.reason(), Some(ExitReason::GuestPanic));
        assert_eq!(l.reason().unwrap().code(), 2);
        assert_eq!(l.event().read().unwrap(), 1);
    }
}
