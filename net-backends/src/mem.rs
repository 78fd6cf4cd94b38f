//! An in-memory backend pair for device tests: the NIC model gets [`MemBackend`], the test
//! holds [`MemPeer`] and plays the network. No fds but an eventfd, no root, no guest.

use crate::{Capabilities, NetBackend};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

#[derive(Default)]
struct Shared {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
    /// When set, send() fails with WouldBlock (a full peer).
    blocked: bool,
    /// When set, send() fails with EIO, an error the backend passes up.
    failing: bool,
    rx_offloads: Option<crate::Offloads>,
    /// When set, the peer is gone: link_up() is false.
    link_down: bool,
    /// Where each piece of every sent frame was (host address, length): a test tells from
    /// them whether a model sent from guest memory or from a copy of its own.
    pieces: Vec<(usize, usize)>,
    /// Runs of memory the last frame sent lay in (pieces back to back count as one).
    last_runs: usize,
    /// The frontend turned this queue off (a multiqueue tap's detached queue): frames wait.
    queue_off: bool,
    /// Times the frontend turned the queue on or off (calls that changed nothing aside).
    queue_changes: u64,
}

pub struct MemBackend {
    shared: Arc<Mutex<Shared>>,
    ready: EventFd,
    caps: Capabilities,
}

#[derive(Clone)]
pub struct MemPeer {
    shared: Arc<Mutex<Shared>>,
    ready: Arc<EventFd>,
}

pub fn pair(caps: Capabilities) -> (MemBackend, MemPeer) {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let ready = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).expect("eventfd");
    let peer_ready = Arc::new(ready.try_clone().expect("eventfd clone"));
    (
        MemBackend {
            shared: shared.clone(),
            ready,
            caps,
        },
        MemPeer {
            shared,
            ready: peer_ready,
        },
    )
}

impl MemPeer {
    /// Queues a frame for the guest and makes the backend readable.
    pub fn inject(&self, frame: &[u8]) {
        self.shared
            .lock()
            .unwrap()
            .to_guest
            .push_back(frame.to_vec());
        let _ = self.ready.write(1);
    }

    /// Frames the guest sent so far (taken).
    pub fn take_sent(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.shared.lock().unwrap().from_guest)
    }

    /// Frames still waiting for the guest.
    pub fn pending(&self) -> usize {
        self.shared.lock().unwrap().to_guest.len()
    }

    pub fn set_blocked(&self, blocked: bool) {
        self.shared.lock().unwrap().blocked = blocked;
    }

    /// Makes send() fail with EIO (an error a backend passes up) or work again.
    pub fn set_failing(&self, failing: bool) {
        self.shared.lock().unwrap().failing = failing;
    }

    /// Takes the link down or up; the backend's fd fires so the model notices.
    pub fn set_link_up(&self, up: bool) {
        self.shared.lock().unwrap().link_down = !up;
        let _ = self.ready.write(1);
    }

    /// Bytes of the frames sent since the last call that were sent from pieces starting in
    /// the host address range `within`.
    pub fn take_sent_from(&self, within: std::ops::Range<usize>) -> usize {
        let pieces = std::mem::take(&mut self.shared.lock().unwrap().pieces);
        pieces
            .iter()
            .filter(|(at, _)| within.contains(at))
            .map(|(_, len)| len)
            .sum()
    }

    /// Runs of memory the last frame sent lay in, pieces back to back counted as one (a tap
    /// takes such pieces as one).
    pub fn last_frame_runs(&self) -> usize {
        self.shared.lock().unwrap().last_runs
    }

    pub fn rx_offloads(&self) -> Option<crate::Offloads> {
        self.shared.lock().unwrap().rx_offloads
    }

    /// Whether the frontend has this queue on (see [`NetBackend::set_queue_enabled`]).
    pub fn queue_enabled(&self) -> bool {
        !self.shared.lock().unwrap().queue_off
    }

    /// Times the frontend turned this queue on or off (what a tap pays a TUNSETQUEUE for).
    pub fn queue_changes(&self) -> u64 {
        self.shared.lock().unwrap().queue_changes
    }
}

impl NetBackend for MemBackend {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn set_rx_offloads(&mut self, o: crate::Offloads) -> io::Result<()> {
        self.shared.lock().unwrap().rx_offloads = Some(o);
        Ok(())
    }

    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<()> {
        let mut s = self.shared.lock().unwrap();
        if s.blocked {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if s.failing {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        s.from_guest
            .push(frame.iter().flat_map(|p| p.iter().copied()).collect());
        s.pieces
            .extend(frame.iter().map(|p| (p.as_ptr() as usize, p.len())));
        let pieces: Vec<&IoSlice> = frame.iter().filter(|p| !p.is_empty()).collect();
        let joined = pieces
            .windows(2)
            .filter(|w| w[0].as_ptr_range().end == w[1].as_ptr())
            .count();
        s.last_runs = pieces.len() - joined;
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut s = self.shared.lock().unwrap();
        if s.queue_off {
            return Ok(None);
        }
        let Some(f) = s.to_guest.pop_front() else {
            let _ = self.ready.read();
            return Ok(None);
        };
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(Some(n))
    }

    fn fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    fn set_queue_enabled(&mut self, on: bool) -> io::Result<()> {
        let mut s = self.shared.lock().unwrap();
        if s.queue_off == on {
            s.queue_changes += 1;
        }
        s.queue_off = !on;
        Ok(())
    }

    fn link_up(&self) -> bool {
        !self.shared.lock().unwrap().link_down
    }
}
