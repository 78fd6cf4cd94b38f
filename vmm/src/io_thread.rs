//! The I/O threads: event-manager loops over the NICs' kicks, timers and backend fds, one
//! thread per port queue index: the first drives queue 0 of every NIC (and their timers), the
//! next queue 1 of those that have one (a multiqueue tap's), and so on. Each queue of a NIC
//! (its `QueueWorker`) is a subscriber that is told which fd is ready for what and keeps its
//! backend's interest as the model asks (readable while the guest has buffers, writable while
//! a send waits), so a guest without RX buffers leaves frames queued in the backend instead of
//! spinning or dropping. Dropping the handle stops and joins the thread.

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// Ends the loop when its eventfd is written.
struct Stop {
    fd: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stop {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("I/O thread: cannot watch its stop eventfd: {e}");
        }
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.fd.read();
        self.stopped.store(true, Ordering::Relaxed);
    }
}

pub struct IoThread {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts I/O thread `index`'s loop over `subscribers`.
    pub fn spawn(index: usize, subscribers: Vec<Subscriber>) -> std::io::Result<IoThread> {
        let mut em: EventManager<Subscriber> = EventManager::new()
            .map_err(|e| std::io::Error::other(format!("event manager: {e:?}")))?;
        let stop = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        let stopped = Arc::new(AtomicBool::new(false));
        em.add_subscriber(Box::new(Stop {
            fd: stop.try_clone()?,
            stopped: stopped.clone(),
        }));
        for s in subscribers {
            em.add_subscriber(s);
        }
        let thread = std::thread::Builder::new()
            .name(if index == 0 {
                "io".into()
            } else {
                format!("io{index}")
            })
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    if let Err(e) = em.run() {
                        log::error!("I/O thread: {e:?}");
                        return;
                    }
                }
            })?;
        Ok(IoThread {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
