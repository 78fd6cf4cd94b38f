//! How the guest (or the user) ends a VM: every path records one reason and wakes the main
//! thread, which cleans up and exits with that reason's code.

use std::sync::{Condvar, Mutex};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

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
    /// Bumped by [`Lifecycle::wake_parked`]: parked vCPUs run their work and park again.
    work: std::sync::atomic::AtomicU64,
    /// A power-off or reboot by the guest stops it instead of ending the VM (QEMU's
    /// `-no-shutdown`; nicvm never reboots, as with `-no-reboot`).
    hold_shutdown: std::sync::atomic::AtomicBool,
    /// The guest shut down and is held, stopped (QEMU's run state `shutdown`): why.
    held: Mutex<Option<ExitReason>>,
}

impl Lifecycle {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            paused: Mutex::new(false),
            resumed: Condvar::new(),
            parked: std::sync::atomic::AtomicUsize::new(0),
            work: std::sync::atomic::AtomicU64::new(0),
            hold_shutdown: std::sync::atomic::AtomicBool::new(false),
            held: Mutex::new(None),
        })
    }

    /// From now on a power-off or reboot by the guest stops it, held, instead of ending the
    /// VM ([`Lifecycle::held`] says why); only another reason ends it.
    pub fn hold_guest_shutdown(&self) {
        self.hold_shutdown
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Why the guest is held after shutting down, if it is.
    pub fn held(&self) -> Option<ExitReason> {
        self.held.lock().unwrap().clone()
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
        self.wait_while_paused_doing(|_| {});
    }

    /// As [`Lifecycle::wait_while_paused`], running `work` (outside the lock) once on
    /// parking and again each time [`Lifecycle::wake_parked`] is called meanwhile: a wake
    /// that came before this thread parked (a snapshot asked for right after `-S` or `stop`,
    /// before every vCPU got there) is not missed. `work` is told the wake generation it
    /// runs for: every wake up to that one came before it started.
    pub fn wait_while_paused_doing(&self, mut work: impl FnMut(u64)) {
        use std::sync::atomic::Ordering;
        let mut p = self.paused.lock().unwrap();
        if !*p {
            return;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        // Read before the first work: a wake from here on runs it again.
        let mut seen = self.work.load(Ordering::SeqCst);
        drop(p);
        work(seen);
        p = self.paused.lock().unwrap();
        while *p && !self.exit_requested() {
            // Checked under the lock that wake_parked notifies under: no request is missed.
            let now = self.work.load(Ordering::SeqCst);
            if now != seen {
                seen = now;
                drop(p);
                work(seen);
                p = self.paused.lock().unwrap();
                continue;
            }
            p = self.resumed.wait(p).unwrap();
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }

    /// Has every parked vCPU run its work once more (they stay parked); returns the wake's
    /// generation: work told this one or a later one started after this call.
    pub fn wake_parked(&self) -> u64 {
        let generation = self.work.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let _p = self.paused.lock().unwrap();
        self.resumed.notify_all();
        generation
    }

    /// How many vCPUs are stopped by a pause now.
    pub fn parked(&self) -> usize {
        self.parked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The guest powers off or reboots (`reason`): as [`Lifecycle::request_exit`], unless
    /// shutdowns are held; then the guest is paused instead, once, and the waiter on
    /// [`Lifecycle::event`] woken to see it held. (A monitor's `system_reset` is not the
    /// guest's: it asks [`Lifecycle::request_exit`] and ends the VM.)
    pub fn guest_shutdown(&self, reason: ExitReason) {
        let holds = self.hold_shutdown.load(std::sync::atomic::Ordering::SeqCst);
        if !holds || self.exit_requested() {
            return self.request_exit(reason);
        }
        // Under the pause's lock, which `resume` checks the hold under: a `cont` racing the
        // shutdown cannot resume a guest that is held.
        let mut paused = self.paused.lock().unwrap();
        let mut held = self.held.lock().unwrap();
        if held.is_none() {
            *held = Some(reason);
            *paused = true;
            drop((held, paused));
            let _ = self.event.write(1);
        }
    }

    /// Resumes the vCPUs, unless the guest shut down and is held: false then.
    pub fn resume(&self) -> bool {
        let mut paused = self.paused.lock().unwrap();
        if self.held.lock().unwrap().is_some() {
            return false;
        }
        *paused = false;
        self.resumed.notify_all();
        true
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
    fn parked_threads_do_their_work_when_woken_and_stay_parked() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let l = Arc::new(Lifecycle::new().unwrap());
        l.set_paused(true);
        let done = Arc::new(AtomicUsize::new(0));
        let t = {
            let (l, done) = (l.clone(), done.clone());
            std::thread::spawn(move || {
                l.wait_while_paused_doing(|_| {
                    done.fetch_add(1, Ordering::SeqCst);
                })
            })
        };
        while l.parked() == 0 {
            std::thread::yield_now();
        }
        // Once on parking, then once per wake.
        while done.load(Ordering::SeqCst) < 1 {
            std::thread::yield_now();
        }
        for want in 2..=4 {
            l.wake_parked();
            while done.load(Ordering::SeqCst) < want {
                std::thread::yield_now();
            }
        }
        assert_eq!(l.parked(), 1, "still parked after its work");
        l.set_paused(false);
        t.join().unwrap();
        assert_eq!(done.load(Ordering::SeqCst), 4);
    }

    /// With shutdowns held, the guest's power-off pauses it and ends nothing; a second
    /// power-off changes nothing; any other reason still ends the VM.
    #[test]
    fn a_held_shutdown_pauses_and_only_another_reason_ends() {
        let l = Lifecycle::new().unwrap();
        l.hold_guest_shutdown();
        l.guest_shutdown(ExitReason::PowerOff);
        assert_eq!(l.held(), Some(ExitReason::PowerOff));
        assert!(l.paused() && !l.exit_requested());
        assert_eq!(l.event().read().unwrap(), 1, "the waiter is woken");
        assert!(!l.resume(), "a held guest is not resumed");
        assert!(l.paused());
        l.guest_shutdown(ExitReason::Reboot);
        assert_eq!(l.held(), Some(ExitReason::PowerOff), "the first stays");
        assert!(l.event().read().is_err(), "and is told once");
        l.request_exit(ExitReason::User("quit".into()));
        assert_eq!(l.reason(), Some(ExitReason::User("quit".into())));
        // Without the hold a power-off ends the VM, as always.
        let l = Lifecycle::new().unwrap();
        l.guest_shutdown(ExitReason::PowerOff);
        assert_eq!((l.reason(), l.held()), (Some(ExitReason::PowerOff), None));
    }

    /// A snapshot asked for before a vCPU parked (right after `-S`): its wake came first, and
    /// the vCPU, parking later, must still do the work (it waited for ever, and the save
    /// gave up after 2 s).
    #[test]
    fn a_wake_before_parking_is_not_missed() {
        let l = std::sync::Arc::new(Lifecycle::new().unwrap());
        l.set_paused(true);
        let wake = l.wake_parked();
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = l.clone();
        let t = std::thread::spawn(move || l2.wait_while_paused_doing(|g| tx.send(g).unwrap()));
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the work done");
        assert!(got >= wake, "done for that wake or a later one");
        l.set_paused(false);
        t.join().unwrap();
    }

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
