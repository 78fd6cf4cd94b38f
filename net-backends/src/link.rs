//! What a backend shares with the helper thread that keeps its peer (the VDE monitor, the
//! stream relay): the link state NIC models read, the count of frames dropped while the link
//! is down, and the way to stop the thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub(crate) struct Link {
    up: AtomicBool,
    stop: AtomicBool,
    dropped: AtomicU64,
    /// Wakes the helper thread: to stop, or to act on a link that went down.
    pub wake: EventFd,
    /// Names the backend in log lines (`vde /run/sw/ctl`, `stream 127.0.0.1:5555`).
    pub name: String,
    /// Until when frames are dropped, for the link-down warning.
    until: String,
}

impl Link {
    pub fn new(name: String, up: bool, until: String) -> Result<Arc<Link>, String> {
        Ok(Arc::new(Link {
            up: AtomicBool::new(up),
            stop: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            wake: EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?,
            name,
            until,
        }))
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The peer is back: `how` is logged (info) when the link was down.
    pub fn set_up(&self, how: &str) {
        if !self.up.swap(true, Ordering::SeqCst) {
            log::info!("{}: {how}; link up", self.name);
        }
    }

    /// The peer is gone: one warning per outage, and the helper thread is woken to act on it.
    pub fn set_down(&self, why: &str) {
        if self.up.swap(false, Ordering::SeqCst) {
            log::warn!(
                "{}: {why}; link down, frames are dropped until {}",
                self.name,
                self.until
            );
            let _ = self.wake.write(1);
        }
    }

    /// A frame the guest sent went nowhere.
    pub fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The helper thread should return.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// The helper thread of a backend; asked to stop and joined when dropped.
pub(crate) struct Helper {
    link: Arc<Link>,
    thread: Option<JoinHandle<()>>,
}

impl Helper {
    pub fn spawn(
        link: &Arc<Link>,
        thread_name: &str,
        run: impl FnOnce() + Send + 'static,
    ) -> Result<Helper, String> {
        let thread = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(run)
            .map_err(|e| format!("cannot start the {thread_name} thread: {e}"))?;
        Ok(Helper {
            link: link.clone(),
            thread: Some(thread),
        })
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.link.stop.store(true, Ordering::SeqCst);
        let _ = self.link.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
