//! The backends behind nicvm's NICs, and the frame-level helpers they share.
//!
//! One trait, [`NetBackend`], sits between the three NIC models and the backends. A frame
//! crosses it whole: scatter-gather on the way out, one buffer on the way in. Readiness is
//! the fds a backend lists for the I/O thread's event loop ([`NetBackend::watch`]), and the
//! backend's own work (accepting, reconnecting, noticing a peer leave) happens when the loop
//! reports them ([`NetBackend::ready`]): no backend but slirp has a thread. Flow control is
//! the frontend's job (it stops reading when the guest has no buffer, and the loop stops
//! watching for frames until the guest refills).

pub mod coalesce;
pub mod csum;
pub mod dgram;
mod link;
pub mod mac;
#[cfg(any(test, feature = "test-backends"))]
pub mod mem;
pub mod nopeer;
pub mod pcap;
pub mod slirp;
pub mod stream;
mod sys;
pub mod tap;
mod uring;
pub mod vde;
pub mod vnet;

pub use mac::MacAddr;

use std::io::{self, IoSlice};
use std::os::fd::RawFd;
pub use vmm_sys_util::epoll::EventSet;

/// Largest frame a backend hands over: a 64 KiB GSO frame plus Ethernet and VLAN headers and
/// a virtio-net header.
pub const MAX_FRAME: usize = 65_536 + 14 + 4 + vnet::VNET_HDR_LEN;

/// Offloads a peer can take in frames carrying a virtio-net header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub tso_ecn: bool,
    pub ufo: bool,
}

impl Offloads {
    pub const ALL: Offloads = Offloads {
        csum: true,
        tso4: true,
        tso6: true,
        tso_ecn: true,
        ufo: true,
    };
}

/// What a monitor asks of a user network: HMP's `info usernet`, `hostfwd_add` and
/// `hostfwd_remove`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsernetAsk {
    /// Its table of connections and forwards, as QEMU's `info usernet` prints it.
    Info,
    /// A host forward added while the guest runs.
    AddHostFwd(slirp::HostFwd),
    /// The host forward on this protocol, host address and port taken away.
    RemoveHostFwd {
        udp: bool,
        addr: std::net::Ipv4Addr,
        port: u16,
    },
}

/// A user network's answer: the table for [`UsernetAsk::Info`], nothing for a forward added
/// or removed; or why it could not.
pub type UsernetAnswer = Result<String, String>;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Every frame in both directions starts with a [`vnet::VNET_HDR_LEN`]-byte virtio-net
    /// header (tap with IFF_VNET_HDR).
    pub vnet_hdr: bool,
    /// What the peer accepts in that header; empty without `vnet_hdr`.
    pub offloads: Offloads,
}

/// Readable for `rx`, writable for `tx`: what a backend's data fd is watched for.
pub fn interest(rx: bool, tx: bool) -> EventSet {
    let mut e = EventSet::empty();
    if rx {
        e |= EventSet::IN;
    }
    if tx {
        e |= EventSet::OUT;
    }
    e
}

pub trait NetBackend: Send {
    fn capabilities(&self) -> Capabilities;

    /// The offloads the guest enabled for frames coming *from* the peer (tap: TUNSETOFFLOAD).
    fn set_rx_offloads(&mut self, _o: Offloads) -> io::Result<()> {
        Ok(())
    }

    /// Sends one frame. `ErrorKind::WouldBlock` means "full, try again when the fd is
    /// writable"; nothing was sent.
    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<()>;

    /// Sends frames given back to back: `iov` holds the pieces of all of them, frame `i`'s
    /// ending where `ends[i]` says (each end at or after the one before, none past `iov`).
    /// One result per frame goes to `out`, in order, up to and including the first
    /// `WouldBlock`: that frame and the ones after it were not sent. The default sends them
    /// one by one; a backend that can hand the kernel many frames in one call does so.
    fn send_batch(&mut self, iov: &[IoSlice<'_>], ends: &[usize], out: &mut Vec<io::Result<()>>) {
        send_each(self, iov, ends, out)
    }

    /// Receives one frame into `buf` without blocking; `Ok(None)` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;

    /// Receives up to `n` frames without blocking, each into a slot of `slab` (slot `i`:
    /// `slot` bytes from `i * slot`; `n` slots at most, and no more than `slab` holds). Each
    /// frame's slot and length go to `frames` (a length may exceed `slot`, as `recv`'s may
    /// exceed its buffer). Stops once none is waiting. An error is returned only when it
    /// came before any frame. The default reads them one by one; a backend that can ask the
    /// kernel for many frames in one call does so.
    fn recv_batch(
        &mut self,
        slab: &mut [u8],
        slot: usize,
        n: usize,
        frames: &mut Vec<(usize, usize)>,
    ) -> io::Result<()> {
        recv_each(self, slab, slot, n, frames)
    }

    /// Readable when `recv` may have a frame; writable when `send` may succeed again.
    fn fd(&self) -> RawFd;

    /// The fds the I/O thread watches for this backend, with the events wanted on each, given
    /// whether the frontend wants frames (`rx`) and waits for room to send (`tx`). Backends
    /// with fds of their own (a control connection, a listening socket, a reconnect timer) add
    /// them here; the default is [`NetBackend::fd`] alone.
    ///
    /// The loop unregisters an fd right after a `watch` that leaves it out, so an fd must stay
    /// open until then: epoll cannot unregister a closed fd (event-manager then keeps it in
    /// its table), and a new fd with its number would be taken for the old registration.
    /// VDE and stream keep such fds in `link::Retired` until their next `ready`.
    fn watch(&self, rx: bool, tx: bool, out: &mut Vec<(RawFd, EventSet)>) {
        out.push((self.fd(), interest(rx, tx)));
    }

    /// A watched fd reported `events`. The backend does its own work here (accepting a peer,
    /// reading a control message, reconnecting); frames then move through `recv` and `send`.
    /// An fd that hung up or failed must leave the watch list (or be replaced) here.
    fn ready(&mut self, _fd: RawFd, _events: EventSet) {}

    /// Whether the other side is there (a VDE switch that went away is down).
    fn link_up(&self) -> bool {
        true
    }

    /// Frames dropped by the backend itself (peer gone, frame too large), for statistics.
    fn dropped(&self) -> u64 {
        0
    }

    /// Asks a user network for its table of connections or to add or remove a host forward:
    /// the answer comes on the receiver (at once from a running user network; wait a bounded
    /// time, and not under a lock a vCPU needs). None for every other backend.
    fn usernet(&self, _ask: UsernetAsk) -> Option<std::sync::mpsc::Receiver<UsernetAnswer>> {
        None
    }

    /// One queue of a multiqueue backend turned on or off by the frontend (the guest chose
    /// fewer queue pairs): the peer sends it nothing while off, and it is neither read nor
    /// written. Backends with one queue ignore it.
    fn set_queue_enabled(&mut self, _on: bool) -> io::Result<()> {
        Ok(())
    }
}

/// [`NetBackend::send_batch`] one frame at a time, through [`NetBackend::send`].
pub fn send_each<B: NetBackend + ?Sized>(
    backend: &mut B,
    iov: &[IoSlice<'_>],
    ends: &[usize],
    out: &mut Vec<io::Result<()>>,
) {
    let mut start = 0;
    for &end in ends {
        let r = match iov.get(start..end) {
            Some(frame) => backend.send(frame),
            None => Err(io::Error::from(io::ErrorKind::InvalidInput)),
        };
        start = end.max(start);
        let blocked = matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        out.push(r);
        if blocked {
            return;
        }
    }
}

/// Slot `i` of a [`NetBackend::recv_batch`] slab (`slot` bytes from `i * slot`), if the slab
/// holds it whole.
pub fn slot_of(slab: &mut [u8], slot: usize, i: usize) -> Option<&mut [u8]> {
    let start = i.checked_mul(slot)?;
    slab.get_mut(start..start.checked_add(slot)?)
}

/// [`NetBackend::recv_batch`] one frame at a time, through [`NetBackend::recv`].
pub fn recv_each<B: NetBackend + ?Sized>(
    backend: &mut B,
    slab: &mut [u8],
    slot: usize,
    n: usize,
    frames: &mut Vec<(usize, usize)>,
) -> io::Result<()> {
    let first = frames.len();
    for i in 0..n {
        let Some(buf) = slot_of(slab, slot, i) else {
            break;
        };
        match backend.recv(buf) {
            Ok(Some(len)) => frames.push((i, len)),
            Ok(None) => break,
            Err(e) if frames.len() == first => return Err(e),
            Err(_) => break,
        }
    }
    Ok(())
}

/// A small deterministic xorshift for tests: each call a number below its argument.
#[cfg(test)]
pub(crate) fn test_rng() -> impl FnMut(usize) -> usize {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    move |n| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    }
}
