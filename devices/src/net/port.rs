//! What every NIC model needs from the network side, written once.
//!
//! A model ([`NicModel`]) is its registers and its rings. Around it, [`Nic`] holds:
//!
//! * the [`NetPort`] the model uses: the backend (frames out, with a virtio-net header added or
//!   not as the backend needs), transmit and receive flow control, the kick eventfds, link
//!   tracking, counters, and the guest-error log (once, then rate-limited, across resets);
//! * the receive stage: frames read from the backend that the guest had no room for yet,
//!   and whether the receiver is stalled waiting for the guest to refill.
//!
//! The I/O threads drive a `Nic` through its [`QueueWorker`]s, one per port queue and each on
//! a thread of its own (an event-manager subscriber); vCPU threads reach the same `Nic` as a
//! PCI device. Both hold its mutex for the model's work. A worker lets it go for its queue's
//! system calls: it reads a readable backend's next batch before it takes the lock, and sends
//! the TX batch a model handed over for after its turn ([`NetPort::send_later`]) after it let
//! the lock go. Each queue's backend and stage have a lock of their own ([`QueueIo`], taken
//! under the NIC's or alone), so the queues of a multiqueue NIC make their system calls side
//! by side. These rules apply to all three models:
//!
//! * **Burst**: one event delivers at most [`RX_BURST`] frames, then returns; the backend's fd
//!   stays readable and the loop comes back after the other fds had their turn.
//! * **Batches**: frames cross to and from the backend several at a time (one system call for
//!   a batch on a tap: [`NetBackend::send_batch`], [`NetBackend::recv_batch`]). A receive
//!   batch asks for no more frames than the guest has room for ([`NicModel::rx_room`]).
//!   Frames that come alone are read one per turn, without a second read to find the
//!   backend empty (`LONE_TURNS`).
//!   virtio-net hands a batch of TX chains over at once, to go after its turn
//!   ([`NetPort::send_later`]), and returns the chains when the backend took them
//!   ([`NicModel::tx_flown`]); e1000 and rtl8139 copy their frames out, into the port's
//!   outbox ([`NetPort::queue_frame`]), which goes at the end of the model's turn on the I/O
//!   thread, one turn asked for by the first doorbell of a batch on a vCPU.
//! * **Interest**: the backend is watched for reading while the model's receiver is ready and
//!   nothing waits in the stage (no buffers: frames wait in the backend; in nicvm only those of
//!   a batch the guest turned out to have less room for than it seemed, or read ahead just
//!   before its receiver stopped, [`RX_BATCH`] at most), and for writing while a send was
//!   refused.

use super::{guest_iov, NicStats};
use crate::pci::{PciConfig, PciDevice};
use crate::snapshot::{RestoreError, State};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use net_backends::vnet::{VnetHdr, VNET_HDR_LEN};
use net_backends::{Capabilities, NetBackend, Offloads};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// Frames one event delivers at most.
pub const RX_BURST: usize = 64;
/// Frames one transmit walk hands to the backend, after which it stops at the end of a frame
/// and leaves the rest to the I/O thread's next turn: large sends a guest asks to have cut in
/// software with an MSS of a few bytes (tens of thousands of wire frames each) cannot hold a
/// vCPU, the NIC's lock and its monitor commands for seconds in one register write.
pub const TX_SENDS_PER_WALK: u64 = 1024;
/// Turns in a row whose read from the backend failed with an error, over at least
/// [`RX_FAILED_FOR`], after which the backend is no longer watched (as one whose fd hung up):
/// a readable fd that only gives errors would otherwise wake the I/O thread for ever. A read
/// that finds nothing is no error, and a burst of errors shorter than that passes.
pub const RX_FAILED_MAX: u32 = 64;
pub const RX_FAILED_FOR: Duration = Duration::from_secs(1);
/// A guest error is logged at warning level at most this often (the first one always).
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What became of a frame offered to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rx {
    /// In the guest's buffers.
    Delivered,
    /// Gone for good: filtered, too long, receiver off, or a device error.
    Dropped,
    /// No room yet: the frame waits and the receiver stalls until the guest refills.
    NoRoom,
}

/// What became of a frame handed to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Sent,
    /// The backend is full; nothing was taken. The port watches for it to drain and then
    /// calls the model's `transmit` again.
    Blocked,
    /// The backend failed (logged at debug level, counted as dropped by the backend): the
    /// frame is lost, as on a wire.
    Lost,
}

/// The register file and rings of one NIC, driven by its [`Nic`].
pub trait NicModel: Send + 'static {
    /// Frames cross the port with their virtio-net header (virtio-net) rather than without
    /// (the port then adds an empty one, or strips it, when the backend has headers).
    fn wants_vnet_hdr(&self) -> bool {
        false
    }
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;
    fn config_written(&mut self, _port: &mut NetPort, _offset: usize, _len: usize) {}
    fn bar_read(&mut self, port: &mut NetPort, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, port: &mut NetPort, bar: usize, offset: u64, data: &[u8]);
    /// Walks the transmit ring: after a guest doorbell that reached the I/O thread, or when
    /// the backend takes frames again after [`Sent::Blocked`].
    fn transmit(&mut self, port: &mut NetPort);
    /// Whether frames should be read from the backend at all now (false: they wait there).
    fn rx_ready(&self) -> bool;
    /// How many frames, up to `max`, the guest has room for now, as far as the model can
    /// tell cheaply (a frame may take more room than one): frames are read from the backend
    /// no more at a time. A receiver that drops what comes may say `max`. The default, 1,
    /// reads them one by one.
    fn rx_room(&self, _port: &NetPort, _max: usize) -> usize {
        1
    }
    /// The backend's answer to the batch the model handed over with [`NetPort::send_later`]:
    /// the first `taken` frames went (sent, or lost as on a wire), the rest were refused
    /// ([`NetPort::tx_blocked`] then says so). Called on the queue the batch went on.
    fn tx_flown(&mut self, _port: &mut NetPort, _taken: usize) {}
    /// One frame for the guest.
    fn receive(&mut self, port: &mut NetPort, frame: &[u8]) -> Rx;
    /// The end of a receive burst that delivered frames: one interrupt for all of them.
    fn rx_burst_done(&mut self, _port: &mut NetPort) {}
    /// The model's timer (interrupt mitigation, delayed work), if it has one: the I/O thread
    /// watches it and calls [`NicModel::timer`] when it fires.
    fn timer_fd(&self) -> Option<RawFd> {
        None
    }
    /// The model's timer fired (the model reads it).
    fn timer(&mut self, _port: &mut NetPort) {}
    /// Interrupts raised so far (MSI-X messages or INTx assertions), for the counters.
    fn interrupts(&self) -> u64;
    /// The backend's link went up or down.
    fn link_changed(&mut self, _port: &mut NetPort, _up: bool) {}
    /// What the receive filter lets through, from the registers (QMP's query-rx-filter).
    fn rx_filter(&self) -> RxFilter;
    /// Whether a guest write there may change the receive filter (only then is it looked
    /// at again for NIC_RX_FILTER_CHANGED).
    fn filter_register(&self, _bar: usize, _offset: u64) -> bool {
        true
    }
    /// The model's state beyond config space (saved by [`Nic`]): registers, ring positions,
    /// timers as time left, EEPROM/PHY. Called with the vCPUs stopped and the NIC's lock
    /// held; frames not yet handed to the backend may be left out, as a wire may lose them,
    /// but descriptors the guest was told are done stay done.
    fn save(&self) -> State;
    /// Puts [`NicModel::save`]'s state into this freshly built model (its config space is
    /// already restored), redoing what the guest's writes had caused: interrupt routes,
    /// doorbells, an asserted line, armed timers. Checks every value (the file comes from
    /// outside); on an error the VM is not started, so a half-restored model is dropped.
    fn restore(&mut self, port: &mut NetPort, state: &State) -> Result<(), RestoreError>;
}

/// How one class of frames is filtered (QEMU's RxState).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RxState {
    /// Only the addresses in the table (or the hash).
    Normal,
    /// None at all.
    None,
    /// All of them.
    All,
}

impl RxState {
    pub fn name(self) -> &'static str {
        match self {
            RxState::Normal => "normal",
            RxState::None => "none",
            RxState::All => "all",
        }
    }
}

/// A NIC's receive filter as its registers set it, in the shape of QEMU's RxFilterInfo.
/// Hash filters (rtl8139's MAR, e1000's MTA) cannot be listed as addresses: a non-empty hash
/// shows as `multicast: normal` with `multicast_overflow` set and an empty table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RxFilter {
    pub main_mac: [u8; 6],
    pub promiscuous: bool,
    pub broadcast_allowed: bool,
    pub unicast: RxState,
    pub multicast: RxState,
    pub vlan: RxState,
    pub unicast_overflow: bool,
    pub multicast_overflow: bool,
    pub unicast_table: Vec<[u8; 6]>,
    pub multicast_table: Vec<[u8; 6]>,
    pub vlan_table: Vec<u16>,
}

impl RxFilter {
    /// A device that filters nothing (every frame reaches the driver).
    pub fn open(mac: [u8; 6]) -> RxFilter {
        RxFilter {
            main_mac: mac,
            promiscuous: true,
            broadcast_allowed: true,
            unicast: RxState::All,
            multicast: RxState::All,
            vlan: RxState::All,
            unicast_overflow: false,
            multicast_overflow: false,
            unicast_table: vec![],
            multicast_table: vec![],
            vlan_table: vec![],
        }
    }

    fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

/// What the monitor does to a NIC, whatever its model.
pub trait NicControl: Send {
    /// QMP's set_link: the link as the guest sees it, whatever the backend's.
    fn set_link(&mut self, up: bool);
    /// The link as the guest sees it now.
    fn link_up(&self) -> bool;
    fn rx_filter(&self) -> RxFilter;
    /// Calls `notify` when the guest changes the receive filter: once, then again only after
    /// [`NicControl::rx_filter_queried`] (QEMU's NIC_RX_FILTER_CHANGED rule).
    fn watch_rx_filter(&mut self, notify: Box<dyn Fn() + Send>);
    fn rx_filter_queried(&mut self);
    /// (vendor, device, subsystem vendor, subsystem, class code) from config space.
    fn pci_ids(&self) -> (u16, u16, u16, u16, u32);
    /// The BARs: (index, kind, address as the guest last wrote it, size). The address may
    /// be anything a guest wrote, sizing's all-ones included.
    fn bars(&self) -> Vec<(usize, crate::pci::BarKind, u64, u64)>;
    fn irq(&self) -> u8;
    /// Asks the backend when it is a user network (HMP `info usernet`, `hostfwd_add`,
    /// `hostfwd_remove`); the answer is to be waited for once the NIC's lock is let go.
    fn usernet(
        &self,
        ask: net_backends::UsernetAsk,
    ) -> Option<std::sync::mpsc::Receiver<net_backends::UsernetAnswer>>;
}

/// Guest errors of one device: the first is logged as a warning, later ones at most every
/// [`ERROR_LOG_INTERVAL`] with how many were not shown; the count survives device resets, so
/// a guest cannot turn reset-and-fail into a stream of warnings.
#[derive(Debug, Default)]
struct GuestErrors {
    count: u64,
    unshown: u64,
    last_shown: Option<Instant>,
}

impl GuestErrors {
    fn report(&mut self, device: &str, what: std::fmt::Arguments) {
        self.count += 1;
        let due = self
            .last_shown
            .is_none_or(|t| t.elapsed() >= ERROR_LOG_INTERVAL);
        if !due {
            self.unshown += 1;
            log::debug!("{device}: {what}");
            return;
        }
        if self.unshown > 0 {
            log::warn!(
                "{device}: {what} (and {} more guest errors since the last report)",
                self.unshown
            );
        } else {
            log::warn!("{device}: {what}");
        }
        self.unshown = 0;
        self.last_shown = Some(Instant::now());
    }
}

/// How the virtio-net header between backend and model is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hdr {
    /// Neither has one, or both do: frames pass as they are.
    Pass,
    /// The backend has one, the model does not: stripped on receive, an empty one sent.
    Hide,
}

/// One queue of the backend (a multiqueue tap has several; every other backend one) with its
/// kicks and flow control.
struct PortQueue {
    io: Arc<Mutex<QueueIo>>,
    tx_kick: EventFd,
    rx_kick: EventFd,
    tx_blocked: bool,
    /// The guest had no room for a frame: the backend is not read until a kick.
    rx_stalled: bool,
    /// The backend's data fd hung up or failed; it is not watched any more.
    dead: bool,
    /// Frames the model copied out, waiting to go to the backend together.
    outbox: Outbox,
    /// A batch the model handed over to go after its turn.
    flight: Flight,
    /// The model asked for its transmit to run on the I/O thread ([`NetPort::kick_tx`]): a
    /// kick that only hands the outbox over does not walk the model's ring (a C+ rtl8139
    /// sends only when the driver polls).
    walk_asked: AtomicBool,
}

/// One queue's backend and receive stage, under a lock of their own: the queue's I/O worker
/// ([`QueueWorker`]) reads a batch into the stage before it takes the NIC's lock, so that the
/// workers of a multiqueue NIC wait in their system calls side by side and the guest's
/// register accesses do not wait behind them. Taken while the NIC's lock is held, or alone;
/// never the other way round.
pub struct QueueIo {
    backend: Box<dyn NetBackend>,
    rx: RxStage,
    /// Frames the next turn's first read would ask for (0: the receiver wants none): what a
    /// read ahead of the NIC's lock may take. Set under the NIC's lock after every event.
    ahead: usize,
    /// Counts the model's resets and errors ([`NetPort::forget_flights`]): a batch handed
    /// over before one is not sent after it.
    epoch: u64,
}

/// A lock held by a thread that panicked still guards whole data: every change under these
/// locks leaves it consistent between statements that can panic.
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Frames a model handed over as copies ([`NetPort::queue_frame`]): they go to the backend
/// together, in one system call on a tap, when the model's turn on the I/O thread ends (a
/// turn on a vCPU, a doorbell register write, asks the I/O thread for one: the guest's next
/// doorbells add to the same batch meanwhile), when the outbox is full, or before any frame
/// sent otherwise (so frames leave in the order they came).
#[derive(Default)]
struct Outbox {
    /// The frames back to back, each with the backend's header in front where it has one.
    bytes: Vec<u8>,
    /// Where each frame ends in `bytes`, and its length as the model gave it (counted when
    /// it goes).
    frames: Vec<(usize, usize)>,
    /// The I/O thread was asked to hand the frames over (a frame queued on a vCPU).
    kicked: bool,
    /// Scratch for the hand-over (kept for the allocations).
    iov: Vec<IoSlice<'static>>,
    ends: Vec<usize>,
    results: Vec<io::Result<()>>,
}

/// A batch of frames a model handed over to go after its turn, from where they lie (virtio-net's
/// TX chains in guest memory, [`NetPort::send_later`]): the queue's worker sends it without
/// the NIC's lock and then gives the model the backend's answer ([`NicModel::tx_flown`]); any
/// other caller of the NIC sends it before it lets the lock go. One at a time per queue.
#[derive(Default)]
pub(crate) struct Flight {
    /// The queue's [`QueueIo::epoch`] when the batch was handed over.
    epoch: u64,
    /// The frames' pieces back to back, and where each frame ends in them.
    iov: Vec<IoSlice<'static>>,
    ends: Vec<usize>,
    /// The backend's answers, once sent.
    results: Vec<io::Result<()>>,
    /// Handed over, not yet answered.
    pending: bool,
    /// Taken out by the queue's worker to be sent: no other batch may go on the queue (it
    /// would overtake this one) until the answer is in.
    away: bool,
}

impl Flight {
    /// Sends the batch on `io`'s backend (the NIC's lock held or not), unless the model
    /// forgot it meanwhile (a reset: the guest may have its buffers back), when every frame
    /// is answered as lost.
    ///
    /// # Safety
    ///
    /// The NIC the batch was handed to is alive (its model keeps the guest memory the
    /// pieces lie in mapped; see [`NetPort::send_later`]).
    pub(crate) unsafe fn send(&mut self, io: &Mutex<QueueIo>) {
        self.results.clear();
        let mut io = lock(io);
        if io.epoch != self.epoch {
            let gone = || Err(io::Error::other("the device was reset"));
            self.results.extend(self.ends.iter().map(|_| gone()));
            return;
        }
        io.backend
            .send_batch(&self.iov, &self.ends, &mut self.results);
    }
}

/// Frames the outbox holds at most; and bytes, past which it is sent before taking more.
const OUTBOX_FRAMES: usize = 64;
const OUTBOX_BYTES: usize = 256 * 1024;

/// The network side as a model sees it. With several queues (virtio-net with `mq=on` on a
/// multiqueue tap), the one a call is about is [`NetPort::queue`]: [`Nic`] sets it before it
/// asks the model to transmit or receive; the single-queue models never see another.
pub struct NetPort {
    name: String,
    queues: Vec<PortQueue>,
    cur: usize,
    caps: Capabilities,
    hdr: Hdr,
    /// The link as the model was last told.
    link_up: bool,
    /// The link was set down by the monitor (QMP set_link): the guest sees no carrier.
    admin_down: bool,
    pub stats: NicStats,
    errors: GuestErrors,
    /// Frames handed to the backend, whatever became of them (what a transmit walk bounds).
    sends: u64,
    /// Scratch for [`NetPort::send_batch`], kept for its allocations: the backend's answers,
    /// and the batch with headers added.
    batch_results: Vec<io::Result<()>>,
    batch_iov: Vec<IoSlice<'static>>,
    batch_ends: Vec<usize>,
    /// [`NetPort::forget_flights`] was asked for.
    forget: bool,
    /// The backend refused to turn a queue on or off once already (said once).
    queue_failed: bool,
}

/// An empty virtio-net header for backends that need one in front of every frame.
static NO_VNET_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

impl NetPort {
    /// `name` is how messages call the device ("e1000 52:54:00:12:34:56").
    pub fn new(name: String, backend: Box<dyn NetBackend>) -> io::Result<NetPort> {
        NetPort::with_queues(name, vec![backend])
    }

    /// A port over the queues of one multiqueue backend (at least one; the first one's
    /// capabilities and link are the port's).
    pub fn with_queues(name: String, backends: Vec<Box<dyn NetBackend>>) -> io::Result<NetPort> {
        let first = backends
            .first()
            .ok_or_else(|| io::Error::other("a port needs a backend"))?;
        let (caps, link_up) = (first.capabilities(), first.link_up());
        let queues = backends
            .into_iter()
            .map(|backend| {
                Ok(PortQueue {
                    io: Arc::new(Mutex::new(QueueIo {
                        backend,
                        rx: RxStage::new(),
                        ahead: 0,
                        epoch: 0,
                    })),
                    tx_kick: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
                    rx_kick: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
                    tx_blocked: false,
                    rx_stalled: false,
                    dead: false,
                    outbox: Outbox::default(),
                    flight: Flight::default(),
                    walk_asked: AtomicBool::new(false),
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(NetPort {
            name,
            queues,
            cur: 0,
            link_up,
            caps,
            hdr: Hdr::Pass,
            admin_down: false,
            stats: NicStats::default(),
            errors: GuestErrors::default(),
            sends: 0,
            batch_results: Vec::new(),
            batch_iov: Vec::new(),
            batch_ends: Vec::new(),
            forget: false,
            queue_failed: false,
        })
    }

    /// How many queues the backend has.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The queue the model is working on (0 for a single-queue backend).
    pub fn queue(&self) -> usize {
        self.cur
    }

    fn q(&self) -> &PortQueue {
        &self.queues[self.cur]
    }

    /// Turns queue `q` of the backend on or off (the guest's number of queue pairs): a queue
    /// that is off gets no frames from the peer and is not read. Out of range: nothing.
    pub fn set_queue_enabled(&mut self, q: usize, on: bool) {
        let Some(pq) = self.queues.get_mut(q) else {
            return;
        };
        if let Err(e) = lock(&pq.io).backend.set_queue_enabled(on) {
            // The guest sets the pace of these calls (virtio-net's VQ_PAIRS_SET): a host that
            // refuses them is said once, the rest at debug level.
            let first = !std::mem::replace(&mut self.queue_failed, true);
            let on = if on { "on" } else { "off" };
            if first {
                log::warn!("{}: cannot turn queue {q} {on}: {e}", self.name);
            } else {
                log::debug!("{}: cannot turn queue {q} {on}: {e}", self.name);
            }
        }
        // The I/O thread brings its watch in line (and reads what waits).
        let _ = pq.rx_kick.write(1);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the backend can carry, as the model sees it: no header (and so no offloads) when
    /// the model does not handle headers.
    pub fn capabilities(&self) -> Capabilities {
        match self.hdr {
            Hdr::Pass => self.caps,
            Hdr::Hide => Capabilities::default(),
        }
    }

    /// The offloads the guest accepts on frames it receives (virtio-net's GUEST_* features).
    pub fn set_rx_offloads(&mut self, o: Offloads) {
        for q in &mut self.queues {
            if let Err(e) = lock(&q.io).backend.set_rx_offloads(o) {
                log::warn!("{}: the backend refused offloads {o:?}: {e}", self.name);
                return;
            }
        }
    }

    /// Whether the other side is there.
    pub fn backend_link_up(&self) -> bool {
        let q = &self.queues[0];
        !q.dead && !self.admin_down && lock(&q.io).backend.link_up()
    }

    /// The offloads the backend's peer takes from a model without a virtio-net header of its
    /// own (e1000, rtl8139) through [`NetPort::send_frame`]: what a tap with a header
    /// accepts; none for backends without one.
    pub fn peer_offloads(&self) -> Offloads {
        match self.hdr {
            Hdr::Hide => self.caps.offloads,
            Hdr::Pass => Offloads::default(),
        }
    }

    /// Hands one frame (in pieces) to the backend.
    pub fn send(&mut self, frame: &[IoSlice<'_>]) -> Sent {
        self.send_with(&NO_VNET_HDR, None, frame)
    }

    /// [`NetPort::send`] for a model without a virtio-net header of its own (e1000, rtl8139):
    /// with `hdr`, the header the model filled in (checksum or segmentation left to the peer,
    /// which [`NetPort::peer_offloads`] said it takes); with `room`, the bytes right in front
    /// of the frame's first piece (a copy the model made), where a header the backend carries
    /// is written, so header and frame reach it as one piece (a tap takes one piece for less
    /// than two).
    pub fn send_frame(
        &mut self,
        hdr: Option<&VnetHdr>,
        room: Option<&mut [u8; VNET_HDR_LEN]>,
        frame: &[IoSlice<'_>],
    ) -> Sent {
        debug_assert!(
            hdr.is_none() || self.hdr == Hdr::Hide,
            "offloads without a header to carry them"
        );
        let bytes = hdr.map_or(NO_VNET_HDR, |h| h.to_bytes());
        self.send_with(&bytes, room, frame)
    }

    /// `hdr` goes in front of the frame when the backend carries a header the model has not
    /// (it is then the model's, or an empty one): into `room` when the model has some.
    fn send_with(
        &mut self,
        hdr: &[u8; VNET_HDR_LEN],
        room: Option<&mut [u8; VNET_HDR_LEN]>,
        frame: &[IoSlice<'_>],
    ) -> Sent {
        if !self.flush_tx() {
            return Sent::Blocked;
        }
        self.sends = self.sends.wrapping_add(1);
        let hide = self.hdr == Hdr::Hide;
        let q = &mut self.queues[self.cur];
        let r = if hide {
            let hdr: &[u8] = match room {
                Some(room) => {
                    *room = *hdr;
                    room
                }
                None => hdr,
            };
            let mut iov = [IoSlice::new(&[]); 24];
            if frame.len() < iov.len() {
                iov[0] = IoSlice::new(hdr);
                iov[1..=frame.len()].copy_from_slice(frame);
                lock(&q.io).backend.send(&iov[..=frame.len()])
            } else {
                let mut v = Vec::with_capacity(frame.len() + 1);
                v.push(IoSlice::new(hdr));
                v.extend_from_slice(frame);
                lock(&q.io).backend.send(&v)
            }
        } else {
            lock(&q.io).backend.send(frame)
        };
        self.sent(r, frame)
    }

    /// Hands a batch of frames to the backend at once (fewer system calls than frames where
    /// the backend can): `iov` holds their pieces back to back, frame `i` ending where
    /// `ends[i]` says, as [`NetBackend::send_batch`] takes them. Returns how many were taken
    /// (sent, or lost as on a wire); fewer than `ends.len()` when the backend filled up: the
    /// rest were not sent, [`NetPort::tx_blocked`] says so, and the model's `transmit` runs
    /// again when the backend drains.
    pub fn send_batch(&mut self, iov: &[IoSlice<'_>], ends: &[usize]) -> usize {
        if !self.flush_tx() {
            return 0;
        }
        self.sends = self.sends.wrapping_add(ends.len() as u64);
        let mut results = std::mem::take(&mut self.batch_results);
        results.clear();
        let q = &mut self.queues[self.cur];
        if self.hdr == Hdr::Hide {
            // An empty header in front of each frame, for the backend that carries one.
            let mut with = guest_iov::recycle(std::mem::take(&mut self.batch_iov));
            let mut with_ends = std::mem::take(&mut self.batch_ends);
            with_ends.clear();
            let mut start = 0;
            for &end in ends {
                with.push(IoSlice::new(&NO_VNET_HDR));
                with.extend_from_slice(iov.get(start..end).unwrap_or(&[]));
                with_ends.push(with.len());
                start = end.max(start);
            }
            lock(&q.io)
                .backend
                .send_batch(&with, &with_ends, &mut results);
            self.batch_iov = guest_iov::recycle(with);
            self.batch_ends = with_ends;
        } else {
            lock(&q.io).backend.send_batch(iov, ends, &mut results);
        }
        let mut taken = 0;
        let mut start = 0;
        for (r, &end) in results.drain(..).zip(ends) {
            let frame = iov.get(start..end).unwrap_or(&[]);
            start = end.max(start);
            if self.sent(r, frame) == Sent::Blocked {
                break;
            }
            taken += 1;
        }
        self.batch_results = results;
        let q = &mut self.queues[self.cur];
        if taken < ends.len() && !q.tx_blocked {
            // Frames left unanswered (a backend's mistake) wait as if it were full: never
            // without a wake-up.
            q.tx_blocked = true;
            let _ = q.tx_kick.write(1);
        }
        taken
    }

    /// Hands a batch to go after the model's turn, as [`NetPort::send_batch`] takes it,
    /// without waiting for the backend: the queue's worker sends it once the NIC's lock is
    /// let go, and the model hears how many frames went through [`NicModel::tx_flown`].
    /// False, with nothing taken, when that cannot be (a batch of the queue is still out, the
    /// outbox holds frames, the backend is full or needs headers added): the model then
    /// sends with [`NetPort::send_batch`].
    ///
    /// # Safety
    ///
    /// The pieces must stay valid until the batch is answered or the NIC dropped: guest
    /// memory, which the model's own handle keeps mapped as long as the NIC lives.
    pub unsafe fn send_later(&mut self, iov: &[IoSlice<'_>], ends: &[usize]) -> bool {
        let q = &mut self.queues[self.cur];
        let f = &mut q.flight;
        if f.pending || f.away || !q.outbox.frames.is_empty() || q.tx_blocked {
            return false;
        }
        if self.hdr == Hdr::Hide {
            return false;
        }
        f.iov.clear();
        // SAFETY: the caller keeps the pieces valid until the flight is answered; the flight
        // forgets them then (`Nic::flight_done` clears the list).
        f.iov.extend(
            iov.iter()
                .map(|p| unsafe { std::mem::transmute::<IoSlice<'_>, IoSlice<'static>>(*p) }),
        );
        f.ends.clear();
        f.ends.extend_from_slice(ends);
        f.pending = true;
        f.epoch = lock(&q.io).epoch;
        self.sends = self.sends.wrapping_add(ends.len() as u64);
        true
    }

    /// The model was reset (or stopped on an error): the batches it handed over and that are
    /// not sent yet never will be, and one being sent now has gone before the NIC's caller
    /// gets its answer (the register write that reset the device returns; the guest may then
    /// take its buffers back). Done at the end of the model's turn, when no queue's lock is
    /// held: the model may be in the middle of a receive here.
    pub fn forget_flights(&mut self) {
        self.forget = true;
    }

    /// Takes a frame the model made (a copy: its bytes are needed no longer than the call),
    /// with `hdr` as [`NetPort::send_frame`] takes it, to go to the backend with the frames
    /// around it ([`NetPort::flush_tx`]). The model may count it as sent once this returns
    /// [`Sent::Sent`]; [`Sent::Blocked`]: the backend is full (and so the outbox stays so),
    /// nothing was taken, and the model's `transmit` runs again when the backend drains.
    pub fn queue_frame(&mut self, hdr: Option<&VnetHdr>, frame: &[IoSlice<'_>]) -> Sent {
        debug_assert!(
            hdr.is_none() || self.hdr == Hdr::Hide,
            "offloads without a header to carry them"
        );
        if self.queues[self.cur].tx_blocked {
            return Sent::Blocked;
        }
        let full = |o: &Outbox| o.frames.len() >= OUTBOX_FRAMES || o.bytes.len() >= OUTBOX_BYTES;
        if full(&self.queues[self.cur].outbox)
            && (!self.flush_tx() || full(&self.queues[self.cur].outbox))
        {
            return Sent::Blocked;
        }
        self.sends = self.sends.wrapping_add(1);
        let o = &mut self.queues[self.cur].outbox;
        if self.hdr == Hdr::Hide {
            o.bytes
                .extend_from_slice(&hdr.map_or(NO_VNET_HDR, |h| h.to_bytes()));
        }
        let mut len = 0;
        for piece in frame {
            o.bytes.extend_from_slice(piece);
            len += piece.len();
        }
        o.frames.push((o.bytes.len(), len));
        Sent::Sent
    }

    /// Hands the frames in the current queue's outbox to the backend. True when the outbox
    /// is empty after it; false when the backend filled up ([`NetPort::tx_blocked`]), the
    /// rest waiting there, in order.
    pub fn flush_tx(&mut self) -> bool {
        let q = &mut self.queues[self.cur];
        let o = &mut q.outbox;
        if o.frames.is_empty() {
            return true;
        }
        let mut iov = guest_iov::recycle(std::mem::take(&mut o.iov));
        o.ends.clear();
        o.results.clear();
        let mut start = 0;
        for &(end, _) in &o.frames {
            iov.push(IoSlice::new(&o.bytes[start..end]));
            o.ends.push(iov.len());
            start = end;
        }
        lock(&q.io)
            .backend
            .send_batch(&iov, &o.ends, &mut o.results);
        o.iov = guest_iov::recycle(iov);
        let mut taken = 0;
        let mut blocked = false;
        for r in o.results.drain(..) {
            let Some(&(_, len)) = o.frames.get(taken) else {
                break; // more answers than frames: a backend's mistake
            };
            match r {
                Ok(()) => {
                    self.stats.tx_frames += 1;
                    self.stats.tx_bytes += len as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    blocked = true;
                    break;
                }
                Err(e) => {
                    log::debug!("{}: send failed: {e}", self.name);
                    self.stats.backend_dropped += 1;
                }
            }
            taken += 1;
        }
        // Frames left unanswered (a backend's mistake) wait as if it were full: never
        // without a wake-up.
        blocked |= taken < o.frames.len();
        let upto = taken.checked_sub(1).map_or(0, |i| o.frames[i].0);
        o.bytes.drain(..upto);
        o.frames.drain(..taken);
        for f in &mut o.frames {
            f.0 -= upto;
        }
        if o.frames.is_empty() {
            o.kicked = false;
        }
        if blocked && !q.tx_blocked {
            q.tx_blocked = true;
            // From a vCPU thread: the I/O thread learns to watch for writability.
            let _ = q.tx_kick.write(1);
        }
        o.frames.is_empty()
    }

    /// The end of a model's turn on a vCPU: the I/O thread is asked to hand over what the
    /// outboxes hold (once per batch), so that the vCPU goes back to the guest without a
    /// system call per frame.
    fn flush_later(&mut self) {
        for q in &mut self.queues {
            if !q.outbox.frames.is_empty() && !q.outbox.kicked {
                q.outbox.kicked = true;
                let _ = q.tx_kick.write(1);
            }
        }
    }

    /// [`NetPort::flush_tx`] on every queue (the end of a model's turn on the I/O thread).
    fn flush_all(&mut self) {
        let cur = self.cur;
        for q in 0..self.queues.len() {
            // A full backend is watched for room; its outbox goes when it drains.
            if !self.queues[q].outbox.frames.is_empty() && !self.queues[q].tx_blocked {
                self.cur = q;
                self.flush_tx();
            }
        }
        self.cur = cur;
    }

    /// What the backend's answer to a frame (`frame`: as the model gave it) makes of it.
    fn sent(&mut self, r: io::Result<()>, frame: &[IoSlice<'_>]) -> Sent {
        match r {
            Ok(()) => {
                let bytes: usize = frame.iter().map(|p| p.len()).sum();
                let hdr = if self.caps.vnet_hdr && self.hdr == Hdr::Pass {
                    VNET_HDR_LEN
                } else {
                    0
                };
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += bytes.saturating_sub(hdr) as u64;
                Sent::Sent
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let q = &mut self.queues[self.cur];
                if !q.tx_blocked {
                    q.tx_blocked = true;
                    // From a vCPU thread: the I/O thread learns to watch for writability.
                    let _ = q.tx_kick.write(1);
                }
                Sent::Blocked
            }
            Err(e) => {
                log::debug!("{}: send failed: {e}", self.name);
                self.stats.backend_dropped += 1;
                Sent::Lost
            }
        }
    }

    /// Frames handed to the backend so far, sent, refused or lost: a transmit walk counts
    /// them against [`TX_SENDS_PER_WALK`].
    pub fn sends(&self) -> u64 {
        self.sends
    }

    /// Whether a send was refused and the backend has not drained yet.
    pub fn tx_blocked(&self) -> bool {
        self.q().tx_blocked
    }

    /// Asks the I/O thread to run the model's `transmit` (a doorbell the model took on a
    /// vCPU thread, or work it left for later to bound one event).
    pub fn kick_tx(&self) {
        self.kick_tx_of(self.cur);
    }

    /// The guest made room (or the receiver changed): a stalled receiver tries again.
    pub fn kick_rx(&self) {
        self.kick_rx_of(self.cur);
    }

    /// [`NetPort::kick_tx`] for queue `q` (out of range: nothing).
    pub fn kick_tx_of(&self, q: usize) {
        if let Some(q) = self.queues.get(q) {
            q.walk_asked.store(true, Ordering::Relaxed);
            let _ = q.tx_kick.write(1);
        }
    }

    /// [`NetPort::kick_rx`] for queue `q` (out of range: nothing).
    pub fn kick_rx_of(&self, q: usize) {
        if let Some(q) = self.queues.get(q) {
            let _ = q.rx_kick.write(1);
        }
    }

    /// Whether the receiver waits for the guest to make room (models kick only then).
    pub fn rx_stalled(&self) -> bool {
        self.q().rx_stalled
    }

    /// The eventfds a guest's notifications of queue `q`'s transmit and receive rings can
    /// be wired to (KVM ioeventfd).
    pub fn tx_kick_fd(&self, q: usize) -> Option<&EventFd> {
        self.queues.get(q).map(|q| &q.tx_kick)
    }
    pub fn rx_kick_fd(&self, q: usize) -> Option<&EventFd> {
        self.queues.get(q).map(|q| &q.rx_kick)
    }

    /// A guest programming error: logged once, then rate-limited; counted for ever.
    pub fn guest_error(&mut self, what: std::fmt::Arguments) {
        self.errors.report(&self.name, what);
    }

    /// Guest errors so far.
    pub fn guest_errors(&self) -> u64 {
        self.errors.count
    }
}

/// Batches handed over to go after a turn ([`NetPort::send_later`]) that one queue's turn sends
/// at most: a model's walk hands over fewer (virtio-net: four of 64 chains), the bound is for
/// one that would not stop.
const FLIGHTS_PER_TURN: usize = 64;

/// Frames read from the backend together (one system call on a tap), at most.
pub const RX_BATCH: usize = 64;
/// Turns in a row that each read one frame, and found no second, after which frames are
/// taken to come alone: a turn then reads one frame and ends, and whether another came is
/// left to the event loop (it asks before it sleeps anyway), where a second read would find
/// nothing. A lone frame costs one read, not two.
const LONE_TURNS: u32 = 4;
/// While frames come alone, one turn in this many reads on after its frame, so that the
/// onset of a burst is seen (and batches grow again) within this many frames.
const LONE_PROBE: u32 = 16;

/// A receive slot: the largest frame a backend hands over.
const RX_SLOT: usize = net_backends::MAX_FRAME;

/// Frames read from the backend and not yet in the guest, and the slots they are in. Frames
/// are read only as many at a time as the guest has room for (as [`NicModel::rx_room`] says),
/// so one waits here only when the guest turned out to have less room than it seemed.
struct RxStage {
    /// [`RX_BATCH`] slots of [`RX_SLOT`] bytes (allocated untouched: a slot's pages become
    /// memory only once a frame is read into them).
    slab: Box<[u8]>,
    /// The frames of the last batch, (slot, length), in order; those from `next` on wait.
    frames: Vec<(usize, usize)>,
    next: usize,
    /// Frames the first batch of a turn asks for (the guest's room permitting): one more
    /// than the last turn read, so that a burst the size of the last one is read in one
    /// batch with one read that finds nothing. Within a turn a batch that came back full is
    /// followed by one twice its size: bursts that grow are read in few calls.
    want: usize,
    /// Frames the last burst took from the stage or the backend.
    last_burst: usize,
    /// Turns in a row that read one frame from the backend (see [`LONE_TURNS`]), counted
    /// round [`LONE_PROBE`] once past [`LONE_TURNS`].
    lone: u32,
    /// The frames in the slots were read ahead of the NIC's lock, asking for this many: the
    /// next turn's first batch.
    read_ahead: Option<usize>,
    /// Turns in a row whose read failed with an error, and when the first of them was (see
    /// [`RX_FAILED_MAX`]).
    failed: u32,
    failing_since: Option<Instant>,
}

impl RxStage {
    fn new() -> RxStage {
        RxStage {
            slab: vec![0; RX_BATCH * RX_SLOT].into_boxed_slice(),
            frames: Vec::with_capacity(RX_BATCH),
            next: 0,
            want: 1,
            last_burst: 0,
            lone: 0,
            read_ahead: None,
            failed: 0,
            failing_since: None,
        }
    }

    fn waiting(&self) -> bool {
        self.next < self.frames.len()
    }

    /// A read failed with `e`; true the first time reads have failed for long enough that
    /// the backend should be given up ([`RX_FAILED_MAX`]). WouldBlock and Interrupted are
    /// "nothing now", whatever the backend meant by them.
    fn failed(&mut self, e: &io::Error) -> bool {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ) {
            return false;
        }
        let was = self.given_up();
        self.failed = self.failed.saturating_add(1);
        self.failing_since.get_or_insert_with(Instant::now);
        !was && self.given_up()
    }

    fn read_ok(&mut self) {
        self.failed = 0;
        self.failing_since = None;
    }

    fn given_up(&self) -> bool {
        self.failed >= RX_FAILED_MAX
            && self
                .failing_since
                .is_some_and(|t| t.elapsed() >= RX_FAILED_FOR)
    }

    /// Frames come alone, and the next turn is not one that looks for more after its frame.
    fn alone(&self) -> bool {
        self.lone >= LONE_TURNS && (self.lone - LONE_TURNS) % LONE_PROBE != LONE_PROBE - 1
    }
}

/// Which readiness of the backend a NIC wants to hear about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendInterest {
    pub readable: bool,
    pub writable: bool,
}

/// What the I/O thread (or a test playing it) tells a [`Nic`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetEvent {
    /// The TX doorbell eventfd fired.
    TxKick,
    /// The RX kick eventfd fired: the guest made room.
    RxKick,
    /// The backend's fds are readable and writable (tests and the fuzzer use this; the event
    /// loop passes what each fd reported).
    Backend,
    /// The model's timer expired.
    Timer,
}

/// A NIC model with its port and receive stage: what the buses and the I/O thread share.
pub struct Nic<M> {
    pub model: M,
    pub port: NetPort,
    /// Told when the guest changes the receive filter, with the filter last seen and
    /// whether an event was sent and not yet followed by a query.
    filter_watch: Option<FilterWatch>,
    /// Each port queue's backend and stage, as in the port: held apart from it so that a
    /// turn can keep a queue's lock while the model has the port. (The port's queues are
    /// made once, with it, and `port` is not replaced: a debug build checks.)
    ios: Vec<Arc<Mutex<QueueIo>>>,
}

impl<M> std::ops::Deref for Nic<M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.model
    }
}

impl<M> std::ops::DerefMut for Nic<M> {
    fn deref_mut(&mut self) -> &mut M {
        &mut self.model
    }
}

impl<M: NicModel> Nic<M> {
    pub fn new(mut model: M, mut port: NetPort) -> Nic<M> {
        port.hdr = if port.caps.vnet_hdr && !model.wants_vnet_hdr() {
            Hdr::Hide
        } else {
            Hdr::Pass
        };
        if port.hdr == Hdr::Hide {
            // The header is stripped before the model sees a frame, so nothing may arrive
            // that needs it (a GSO frame, an unfinished checksum): whoever had the tap before
            // may have turned offloads on (QEMU resets them the same way).
            port.set_rx_offloads(Offloads::default());
        }
        let up = port.link_up;
        model.link_changed(&mut port, up);
        let ios = port.queues.iter().map(|q| q.io.clone()).collect();
        Nic {
            model,
            port,
            filter_watch: None,
            ios,
        }
    }

    /// After a guest register write: a changed receive filter is reported (once until the
    /// next query).
    fn check_filter(&mut self) {
        let Some(w) = &mut self.filter_watch else {
            return;
        };
        let now = self.model.rx_filter().fingerprint();
        if now != w.last {
            w.last = now;
            if !w.sent {
                w.sent = true;
                (w.notify)();
            }
        }
    }

    /// The counters: the port's, the model's interrupts and what the backend dropped, itself
    /// or by failing a send with an error it passed up.
    pub fn stats(&self) -> NicStats {
        let dropped: u64 = self
            .port
            .queues
            .iter()
            .map(|q| lock(&q.io).backend.dropped())
            .sum();
        NicStats {
            interrupts: self.model.interrupts(),
            backend_dropped: self.port.stats.backend_dropped + dropped,
            ..self.port.stats
        }
    }

    /// Handles one event of queue 0 as the I/O thread would; returns what the backend is
    /// watched for from now on.
    pub fn handle(&mut self, ev: NetEvent) -> BackendInterest {
        self.handle_queue(0, ev)
    }

    /// [`Nic::handle`] for port queue `q` (the timer is the model's, not a queue's).
    pub fn handle_queue(&mut self, q: usize, ev: NetEvent) -> BackendInterest {
        let q = self.turn(q, ev);
        self.end_turn(None);
        self.interest_of(q)
    }

    /// The work of one event of queue `q` (clamped to the queues there are: returned),
    /// before [`Nic::end_turn`].
    fn turn(&mut self, q: usize, ev: NetEvent) -> usize {
        let q = q.min(self.port.queues.len() - 1);
        match ev {
            NetEvent::TxKick => {
                let _ = self.port.queues[q].tx_kick.read();
                self.tx_kicked(q);
            }
            NetEvent::RxKick => {
                let _ = self.port.queues[q].rx_kick.read();
                self.rx_kicked(q);
            }
            NetEvent::Backend => self.backend_ready(q, true, true),
            NetEvent::Timer => {
                self.port.cur = 0;
                self.model.timer(&mut self.port)
            }
        }
        self.check_link_of(q);
        q
    }

    /// The end of a turn: the outboxes go, and so does every batch a model handed over to go
    /// after the turn, but queue `keep`'s: its worker sends that one once it let the NIC's
    /// lock go.
    fn end_turn(&mut self, keep: Option<usize>) {
        self.port.flush_all();
        self.fly(keep);
    }

    /// Sends the batches handed over to go after the turn, on every queue but `keep`, and
    /// gives the model the answers (each may hand over the next: a model's walk is bounded,
    /// and so is this).
    fn fly(&mut self, keep: Option<usize>) {
        if std::mem::take(&mut self.port.forget) {
            // Each queue's lock waits for a send in progress to end.
            for pq in &self.port.queues {
                let mut io = lock(&pq.io);
                io.epoch = io.epoch.wrapping_add(1);
            }
        }
        for q in 0..self.port.queues.len() {
            if Some(q) == keep {
                continue;
            }
            for _ in 0..FLIGHTS_PER_TURN {
                let pq = &mut self.port.queues[q];
                if !pq.flight.pending {
                    break;
                }
                // SAFETY: the batch was handed to this NIC, which `self` is.
                unsafe { pq.flight.send(&pq.io) };
                self.flight_done(q);
            }
            if self.port.queues[q].flight.pending {
                // Past the bound: the queue's worker goes on with it.
                self.port.kick_tx_of(q);
            }
        }
    }

    /// Queue `q`'s batch handed over to go after the turn, if any, for its worker to send
    /// without the NIC's lock ([`Flight::send`]): no other batch goes on the queue until it
    /// comes back with [`Nic::answer_flight`].
    pub(crate) fn take_flight(&mut self, q: usize) -> Option<Flight> {
        let slot = &mut self.port.queues.get_mut(q)?.flight;
        if !slot.pending {
            return None;
        }
        let flight = std::mem::take(slot);
        slot.away = true;
        Some(flight)
    }

    /// Queue `q`'s batch back from its worker, sent: the model hears the answer, and the turn
    /// ends again (the answer may have handed over the next batch, which stays for the
    /// worker).
    pub(crate) fn answer_flight(&mut self, q: usize, flight: Flight) {
        let Some(pq) = self.port.queues.get_mut(q) else {
            return;
        };
        pq.flight = flight;
        self.flight_done(q);
        self.end_turn(Some(q));
    }

    #[cfg(test)]
    /// Queue `q`'s backend and stage, as its worker holds them (for tests that play the
    /// worker).
    pub(crate) fn queue_io(&self, q: usize) -> Option<Arc<Mutex<QueueIo>>> {
        Some(self.port.queues.get(q)?.io.clone())
    }

    #[cfg(test)]
    /// The work of a worker's turn of queue `q` up to where it lets the NIC's lock go (for
    /// tests that play the worker: then [`Nic::take_flight`]).
    pub(crate) fn worker_turn(&mut self, q: usize, ev: NetEvent) {
        let q = self.turn(q, ev);
        self.end_turn(Some(q));
    }

    /// The backend answered queue `q`'s batch (its results are in): the counters, flow
    /// control as [`NetPort::send_batch`] does it, and the model told how many went.
    fn flight_done(&mut self, q: usize) {
        let mut f = std::mem::take(&mut self.port.queues[q].flight);
        self.port.cur = q;
        let mut taken = 0;
        let mut start = 0;
        for (r, &end) in f.results.drain(..).zip(&f.ends) {
            let frame = f.iov.get(start..end).unwrap_or(&[]);
            start = end.max(start);
            if self.port.sent(r, frame) == Sent::Blocked {
                break;
            }
            taken += 1;
        }
        let pq = &mut self.port.queues[q];
        if taken < f.ends.len() && !pq.tx_blocked {
            // Frames left unanswered (a backend's mistake) wait as if it were full.
            pq.tx_blocked = true;
            let _ = pq.tx_kick.write(1);
        }
        f.iov.clear();
        f.ends.clear();
        f.pending = false;
        f.away = false;
        pq.flight = f;
        self.model.tx_flown(&mut self.port, taken);
        // The send may have found the peer gone (a stream backend's link goes down there),
        // after the turn looked at the link.
        self.check_link_of(q);
    }

    /// Handles the kicks that are pending on every queue, as the I/O thread would (for tests
    /// and the fuzzer, which have no event loop). Returns queue 0's interest.
    pub fn run_kicks(&mut self) -> BackendInterest {
        for q in 0..self.port.queues.len() {
            if self.port.queues[q].tx_kick.read().is_ok() {
                self.tx_kicked(q);
            }
            if self.port.queues[q].rx_kick.read().is_ok() {
                self.rx_kicked(q);
            }
        }
        self.check_link();
        self.end_turn(None);
        self.interest()
    }

    fn tx_kicked(&mut self, q: usize) {
        let pq = &self.port.queues[q];
        // A kick the outbox asked for only hands it over (at the end of the event); any
        // other (the model's, a guest doorbell on an ioeventfd) runs the model's transmit.
        let walk = pq.walk_asked.swap(false, Ordering::Relaxed) || !pq.outbox.kicked;
        // While the backend is full, the kick only makes the loop watch for room.
        if walk && !pq.tx_blocked {
            self.port.cur = q;
            self.model.transmit(&mut self.port);
        }
    }

    fn rx_kicked(&mut self, q: usize) {
        self.port.queues[q].rx_stalled = false;
        self.receive_burst(q);
    }

    /// What the I/O thread does when a vCPU asked it to hand over the frames a model queued
    /// (for tests and the fuzzer, which have no event loop): the kick of each queue whose
    /// outbox asked for one. Returns queue 0's interest.
    pub fn run_flush_kicks(&mut self) -> BackendInterest {
        for q in 0..self.port.queues.len() {
            if self.port.queues[q].outbox.kicked {
                self.handle_queue(q, NetEvent::TxKick);
            }
        }
        self.interest()
    }

    /// What the event loop does while the backends stay readable: turns on each queue until
    /// one takes nothing (the backend is drained, or the guest out of room; a turn may end
    /// early with frames left, as one that reads a lone frame does), at most 1024. For tests
    /// and the fuzzer. Returns queue 0's interest.
    pub fn pump(&mut self) -> BackendInterest {
        for q in 0..self.port.queues.len() {
            for _ in 0..1024 {
                self.handle_queue(q, NetEvent::Backend);
                if lock(&self.port.queues[q].io).rx.last_burst == 0 || !self.wants_rx(q) {
                    break;
                }
            }
        }
        self.interest()
    }

    /// What queue 0's backend is watched for now.
    pub fn interest(&self) -> BackendInterest {
        self.interest_of(0)
    }

    fn interest_of(&self, q: usize) -> BackendInterest {
        // As [`Nic::backend_interest`]: a dead backend is watched for nothing.
        let dead = self.port.queues[q].dead;
        BackendInterest {
            readable: !dead && self.wants_rx(q),
            writable: !dead && self.port.queues[q].tx_blocked,
        }
    }

    /// A backend fd of queue `q` reported `set`: the backend does its own part (accepting,
    /// reconnecting, noticing a hang-up), then frames move.
    pub fn backend_event(&mut self, q: usize, fd: RawFd, set: EventSet) {
        self.backend_turn(q, fd, set);
        self.end_turn(None);
    }

    /// The work of [`Nic::backend_event`], before [`Nic::end_turn`].
    fn backend_turn(&mut self, q: usize, fd: RawFd, set: EventSet) {
        let Some(pq) = self.port.queues.get_mut(q) else {
            return;
        };
        let mut io = lock(&pq.io);
        io.backend.ready(fd, set);
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            // Reported on every wait whatever the interest: a backend that still wants this
            // fd watched after seeing it (a deleted tap) would make the loop spin.
            let mut still = vec![];
            io.backend.watch(true, true, &mut still);
            if still.iter().any(|(f, _)| *f == fd) {
                log::warn!(
                    "{}: the backend failed or hung up; no longer watched",
                    self.port.name
                );
                pq.dead = true;
            }
        }
        drop(io);
        self.backend_ready(q, set.contains(EventSet::IN), set.contains(EventSet::OUT));
        self.check_link_of(q);
    }

    fn backend_ready(&mut self, q: usize, readable: bool, writable: bool) {
        if writable && self.port.queues[q].tx_blocked {
            self.port.queues[q].tx_blocked = false;
            self.port.cur = q;
            if self.port.flush_tx() {
                self.model.transmit(&mut self.port);
            }
        }
        if readable {
            self.receive_burst(q);
        }
    }

    /// [`Nic::check_link`] after an event of queue `q`: the link is queue 0's, and another
    /// queue's events leave it as it was (their workers do not wait for queue 0's).
    fn check_link_of(&mut self, q: usize) {
        if q == 0 {
            self.check_link();
        }
    }

    fn check_link(&mut self) {
        let up = self.port.backend_link_up();
        if up != self.port.link_up {
            self.port.link_up = up;
            self.port.cur = 0;
            self.model.link_changed(&mut self.port, up);
            // A send the backend refused before the change may go (or be dropped, with no
            // peer) now: waiting for writability of a connection that is gone would be for
            // ever.
            for q in 0..self.port.queues.len() {
                if self.port.queues[q].tx_blocked {
                    self.port.queues[q].tx_blocked = false;
                    self.port.cur = q;
                    if self.port.flush_tx() {
                        self.model.transmit(&mut self.port);
                    }
                }
            }
        }
    }

    /// Moves up to [`RX_BURST`] frames from queue `q` of the backend (or its stage) into the
    /// guest: those waiting in the stage first, then batches read from the backend, each no
    /// larger than the guest's room and what is left of the burst.
    fn receive_burst(&mut self, q: usize) {
        if self.port.queues[q].dead {
            return;
        }
        let mut delivered = false;
        self.port.cur = q;
        debug_assert!(Arc::ptr_eq(&self.ios[q], &self.port.queues[q].io));
        let mut io = lock(&self.ios[q]);
        let QueueIo { backend, rx, .. } = &mut *io;
        rx.last_burst = 0;
        // A batch came back short: the backend had no more (for now).
        let mut drained = false;
        // Frames come alone, and this is not a turn that looks for more after its frame.
        let alone = rx.alone();
        let mut read = 0;
        // A read in this turn found fewer frames than it asked for: the backend ran dry.
        let mut short = false;
        let mut want = if alone { 1 } else { rx.want };
        // What the queue's worker read ahead of the NIC's lock is this turn's first batch.
        let mut ahead = rx.read_ahead.take();
        while rx.last_burst < RX_BURST {
            if self.port.queues[q].rx_stalled || !self.model.rx_ready() {
                break;
            }
            if !rx.waiting() || ahead.is_some() {
                let n = match ahead.take() {
                    Some(n) => n,
                    None if drained => break,
                    None => {
                        rx.frames.clear();
                        rx.next = 0;
                        let ask = want.min(RX_BURST - rx.last_burst);
                        let n = self.model.rx_room(&self.port, ask).clamp(1, ask);
                        if let Err(e) = backend.recv_batch(&mut rx.slab, RX_SLOT, n, &mut rx.frames)
                        {
                            log::debug!("{}: receive failed: {e}", self.port.name);
                            if rx.failed(&e) {
                                log::warn!(
                                    "{}: every read from the backend failed for {:?} ({e}); \
                                     it is no longer watched, as one that hung up",
                                    self.port.name,
                                    RX_FAILED_FOR
                                );
                            }
                            break;
                        }
                        rx.read_ok();
                        n
                    }
                };
                read += rx.frames.len();
                short |= rx.frames.len() < n;
                drained = rx.frames.len() < n || alone;
                if !drained {
                    want = (2 * n).min(RX_BATCH);
                }
                if rx.frames.is_empty() {
                    break;
                }
            }
            let (slot, len) = rx.frames[rx.next];
            rx.next += 1;
            rx.last_burst += 1;
            if len > RX_SLOT {
                // Cut short: a tap reports the length a frame had, also one longer than the
                // buffer it was read into.
                self.port.stats.rx_dropped += 1;
                continue;
            }
            let Some(raw) = rx.slab.get(slot * RX_SLOT..slot * RX_SLOT + len) else {
                continue;
            };
            let frame = match self.port.hdr {
                Hdr::Pass => raw,
                Hdr::Hide => match raw.get(VNET_HDR_LEN..) {
                    Some(f) => f,
                    None => continue, // shorter than its header: not a frame
                },
            };
            match self.model.receive(&mut self.port, frame) {
                Rx::Delivered => delivered = true,
                Rx::Dropped => {}
                Rx::NoRoom => {
                    rx.next -= 1;
                    rx.last_burst -= 1;
                    self.port.queues[q].rx_stalled = true;
                    break;
                }
            }
        }
        if read > 0 && !alone {
            rx.want = (read + 1).min(RX_BATCH);
        }
        // A turn that read one frame counts when the backend was seen dry after it (or was not
        // asked, frames coming alone): one the guest's room cut short does not.
        rx.lone = match read {
            0 => rx.lone,
            1 if alone || short => {
                if rx.lone >= LONE_TURNS {
                    LONE_TURNS + (rx.lone - LONE_TURNS + 1) % LONE_PROBE
                } else {
                    rx.lone + 1
                }
            }
            _ => 0,
        };
        let failing = rx.given_up();
        drop(io);
        if failing {
            // An fd that stays readable while every read fails would wake the loop for ever.
            self.port.queues[q].dead = true;
        }
        if delivered {
            self.model.rx_burst_done(&mut self.port);
        }
    }

    /// Whether queue `q`'s backend should be read: the receiver is ready and nothing waits.
    fn wants_rx(&self, q: usize) -> bool {
        let pq = &self.port.queues[q];
        !pq.rx_stalled && self.model.rx_ready() && !lock(&pq.io).rx.waiting()
    }

    /// A frame waits in a stage for guest buffers. It stays across device resets, as it
    /// would in the backend: the model kicks the receiver when the guest can take it.
    pub fn rx_waiting(&self) -> bool {
        self.port.queues.iter().any(|q| lock(&q.io).rx.waiting())
    }

    /// The fds of queue `q`'s backend the event loop should watch now, and for what; and
    /// what the queue's worker may read ahead of the next turn (its first batch: no more
    /// than the guest has room for now).
    pub fn backend_interest(&mut self, q: usize, out: &mut Vec<(RawFd, EventSet)>) {
        out.clear();
        let pq = &self.port.queues[q];
        let ready = !pq.rx_stalled && self.model.rx_ready();
        let mut io = lock(&pq.io);
        let io = &mut *io;
        if pq.dead {
            io.ahead = 0;
            return;
        }
        let wants = ready && !io.rx.waiting();
        io.ahead = if wants {
            let want = if io.rx.alone() { 1 } else { io.rx.want };
            let ask = want.min(RX_BURST);
            self.model.rx_room(&self.port, ask).clamp(1, ask)
        } else {
            0
        };
        io.backend.watch(wants, pq.tx_blocked, out);
    }
}

/// One port queue of a NIC as the I/O threads drive it: its kicks and its backend's fds
/// (and, for queue 0, the model's timer) on an event loop of the queue's own, so that a
/// multiqueue NIC's queues have a thread each. A turn takes the NIC's lock; the read of a
/// readable backend's first batch does not ([`QueueIo`]).
pub struct QueueWorker<M> {
    nic: Arc<Mutex<Nic<M>>>,
    io: Arc<Mutex<QueueIo>>,
    q: usize,
    name: String,
    /// Backend fds as registered with the event loop, and their interest.
    watched: Vec<(RawFd, EventSet)>,
    /// Scratch: the fds wanted now (kept for its allocation; the watch runs after every
    /// event).
    want: Vec<(RawFd, EventSet)>,
}

impl<M: NicModel> Nic<M> {
    /// The workers that drive `nic`, one per port queue, each for an event loop of its own.
    pub fn workers(nic: &Arc<Mutex<Nic<M>>>) -> Vec<QueueWorker<M>> {
        let n = lock(nic);
        n.port
            .queues
            .iter()
            .enumerate()
            .map(|(q, pq)| QueueWorker {
                nic: nic.clone(),
                io: pq.io.clone(),
                q,
                name: n.port.name.clone(),
                watched: vec![],
                want: vec![],
            })
            .collect()
    }
}

impl<M: NicModel> QueueWorker<M> {
    /// Reads the next turn's first batch into the queue's stage, without the NIC's lock:
    /// as many frames as the guest had room for at the end of the last event (it only adds
    /// room meanwhile; frames that find less wait in the stage, as those of any batch do).
    fn read_ahead(&self) {
        let mut io = lock(&self.io);
        let QueueIo {
            backend, rx, ahead, ..
        } = &mut *io;
        if *ahead == 0 || rx.waiting() || rx.read_ahead.is_some() {
            return;
        }
        rx.frames.clear();
        rx.next = 0;
        match backend.recv_batch(&mut rx.slab, RX_SLOT, *ahead, &mut rx.frames) {
            Ok(()) => {
                rx.read_ahead = Some(*ahead);
                rx.read_ok();
            }
            Err(e) => {
                rx.frames.clear();
                log::debug!("{}: receive failed: {e}", self.name);
            }
        }
    }
}

/// Brings the event loop's registrations of queue `q`'s backend fds in line with what the
/// backend and the model want now.
fn sync_watch<M: NicModel>(
    nic: &mut Nic<M>,
    q: usize,
    watched: &mut Vec<(RawFd, EventSet)>,
    want: &mut Vec<(RawFd, EventSet)>,
    ops: &mut EventOps,
) {
    nic.backend_interest(q, want);
    let token = token(q, BACKEND);
    // Gone, or changed.
    let mut i = 0;
    while i < watched.len() {
        let (fd, ev) = watched[i];
        match want.iter().find(|w| w.0 == fd) {
            Some(&(_, new)) => {
                if new != ev && ops.modify(Events::with_data_raw(fd, token, new)).is_ok() {
                    watched[i].1 = new;
                }
            }
            None => {
                let _ = ops.remove(Events::with_data_raw(fd, token, ev));
                watched.swap_remove(i);
                continue;
            }
        }
        i += 1;
    }
    // New.
    for &(fd, ev) in want.iter() {
        if !watched.iter().any(|w| w.0 == fd) {
            match ops.add(Events::with_data_raw(fd, token, ev)) {
                Ok(()) => watched.push((fd, ev)),
                Err(e) => log::error!("{}: cannot watch backend fd {fd}: {e}", nic.port.name),
            }
        }
    }
}

impl<M: NicModel> PciDevice for Nic<M> {
    fn config(&self) -> &PciConfig {
        self.model.config()
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        self.model.config_mut()
    }
    fn config_written(&mut self, offset: usize, len: usize) {
        self.port.cur = 0;
        self.model.config_written(&mut self.port, offset, len);
        self.port.flush_later();
        self.fly(None);
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        self.port.cur = 0;
        self.model.bar_read(&mut self.port, bar, offset, data);
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.port.cur = 0;
        self.model.bar_write(&mut self.port, bar, offset, data);
        self.port.flush_later();
        self.fly(None);
        if self.filter_watch.is_some() && self.model.filter_register(bar, offset) {
            self.check_filter();
        }
    }
    fn save(&self) -> State {
        crate::snapshot::to_state(&NicState {
            config: self.model.config().save(),
            model: self.model.save(),
        })
    }
    fn restore(&mut self, state: &State) -> Result<(), RestoreError> {
        let saved: NicState = crate::snapshot::from_state(state, "NIC")?;
        self.model.config_mut().restore(&saved.config)?;
        self.port.cur = 0;
        self.model.restore(&mut self.port, &saved.model)?;
        // The new backend's link may differ from the one the snapshot was taken on: the
        // model hears the link as it is now (a no-op where its restored view agrees).
        self.check_link();
        let up = self.port.link_up;
        self.port.cur = 0;
        self.model.link_changed(&mut self.port, up);
        self.end_turn(None);
        if let Some(w) = &mut self.filter_watch {
            w.last = self.model.rx_filter().fingerprint();
        }
        Ok(())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NicState {
    config: Vec<u8>,
    model: State,
}

struct FilterWatch {
    notify: Box<dyn Fn() + Send>,
    last: u64,
    sent: bool,
}

impl<M: NicModel> NicControl for Nic<M> {
    fn usernet(
        &self,
        ask: net_backends::UsernetAsk,
    ) -> Option<std::sync::mpsc::Receiver<net_backends::UsernetAnswer>> {
        lock(&self.port.queues.first()?.io).backend.usernet(ask)
    }
    fn set_link(&mut self, up: bool) {
        self.port.admin_down = !up;
        self.check_link();
        self.end_turn(None);
        // The I/O thread brings its watch of the backend in line.
        self.port.kick_rx_of(0);
    }
    fn link_up(&self) -> bool {
        self.port.link_up
    }
    fn rx_filter(&self) -> RxFilter {
        self.model.rx_filter()
    }
    fn watch_rx_filter(&mut self, notify: Box<dyn Fn() + Send>) {
        self.filter_watch = Some(FilterWatch {
            notify,
            last: self.model.rx_filter().fingerprint(),
            sent: false,
        });
    }
    fn rx_filter_queried(&mut self) {
        if let Some(w) = &mut self.filter_watch {
            w.sent = false;
        }
    }
    fn pci_ids(&self) -> (u16, u16, u16, u16, u32) {
        let c = self.model.config();
        (
            c.get16(0),
            c.get16(2),
            c.get16(0x2c),
            c.get16(0x2e),
            c.get32(8) >> 8,
        )
    }
    fn bars(&self) -> Vec<(usize, crate::pci::BarKind, u64, u64)> {
        let c = self.model.config();
        (0..6)
            .filter_map(|i| {
                Some((
                    i,
                    c.bar_kind(i)?,
                    c.bar_addr(i).unwrap_or(0),
                    c.bar_size(i)?,
                ))
            })
            .collect()
    }
    fn irq(&self) -> u8 {
        self.model.config().get16(0x3c) as u8
    }
}

// Tokens of the fds a NIC registers (`Events::data`): the kind in the low two bits, the port
// queue above them.
const TX_KICK: u32 = 0;
const RX_KICK: u32 = 1;
const TIMER: u32 = 2;
const BACKEND: u32 = 3;

fn token(q: usize, kind: u32) -> u32 {
    (q as u32) << 2 | kind
}

/// The I/O threads' side: event-manager calls this with the fd that is ready and for what.
impl<M: NicModel> MutEventSubscriber for QueueWorker<M> {
    fn init(&mut self, ops: &mut EventOps) {
        let q = self.q;
        let mut nic = lock(&self.nic);
        let pq = &nic.port.queues[q];
        let mut fds = vec![
            (pq.tx_kick.as_raw_fd(), token(q, TX_KICK)),
            (pq.rx_kick.as_raw_fd(), token(q, RX_KICK)),
        ];
        if q == 0 {
            if let Some(fd) = nic.model.timer_fd() {
                fds.push((fd, TIMER));
            }
        }
        for (fd, token) in fds {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                log::error!("{}: cannot watch fd {fd}: {e}", self.name);
            }
        }
        sync_watch(&mut nic, q, &mut self.watched, &mut self.want, ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let (q, set) = (self.q, events.event_set());
        log::trace!(
            "{}: queue {q} event {} fd {} {:?}",
            self.name,
            events.data(),
            events.fd(),
            set
        );
        let kind = events.data() & 3;
        if kind == BACKEND && set == EventSet::IN {
            self.read_ahead();
        }
        let mut nic = lock(&self.nic);
        match kind {
            TX_KICK => {
                nic.turn(q, NetEvent::TxKick);
            }
            RX_KICK => {
                nic.turn(q, NetEvent::RxKick);
            }
            TIMER => {
                nic.turn(0, NetEvent::Timer);
            }
            _ => nic.backend_turn(q, events.fd(), set),
        }
        nic.end_turn(Some(q));
        // The queue's batches go with the NIC's lock let go; each answer is the model's under
        // the lock again, and may hand over the next.
        for _ in 0..FLIGHTS_PER_TURN {
            let Some(mut flight) = nic.take_flight(q) else {
                break;
            };
            drop(nic);
            // SAFETY: `self.nic` keeps the NIC the batch was handed to alive.
            unsafe { flight.send(&self.io) };
            nic = lock(&self.nic);
            nic.answer_flight(q, flight);
        }
        if nic.port.queues[q].flight.pending {
            // Past the bound: the next turn goes on with it.
            nic.port.kick_tx_of(q);
        }
        sync_watch(&mut nic, q, &mut self.watched, &mut self.want, ops);
    }
}

#[cfg(test)]
mod worker_tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use net_backends::mem::{pair, MemBackend, MemPeer};
    use std::sync::mpsc;
    use std::sync::OnceLock;

    /// A model that takes every frame it is offered.
    struct Sink {
        config: PciConfig,
        got: Vec<Vec<u8>>,
    }

    impl NicModel for Sink {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.config
        }
        fn bar_read(&mut self, _: &mut NetPort, _: usize, _: u64, _: &mut [u8]) {}
        fn bar_write(&mut self, _: &mut NetPort, _: usize, _: u64, _: &[u8]) {}
        fn transmit(&mut self, _: &mut NetPort) {}
        fn rx_ready(&self) -> bool {
            true
        }
        fn rx_room(&self, _: &NetPort, max: usize) -> usize {
            max
        }
        fn receive(&mut self, _: &mut NetPort, frame: &[u8]) -> Rx {
            self.got.push(frame.to_vec());
            Rx::Delivered
        }
        fn interrupts(&self) -> u64 {
            0
        }
        fn rx_filter(&self) -> RxFilter {
            RxFilter::open([0; 6])
        }
        fn save(&self) -> State {
            State::Null
        }
        fn restore(&mut self, _: &mut NetPort, _: &State) -> Result<(), RestoreError> {
            Ok(())
        }
    }

    type Shared = Arc<Mutex<Nic<Sink>>>;
    /// What a [`Probe`] does at every batch read.
    type AtRead = Box<dyn FnMut(&Shared) + Send>;

    /// A backend that, at every batch read, calls `at_read` with the NIC it serves.
    struct Probe {
        inner: MemBackend,
        nic: Arc<OnceLock<Shared>>,
        at_read: AtRead,
    }

    impl NetBackend for Probe {
        fn capabilities(&self) -> net_backends::Capabilities {
            self.inner.capabilities()
        }
        fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<()> {
            self.inner.send(frame)
        }
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
            self.inner.recv(buf)
        }
        fn recv_batch(
            &mut self,
            slab: &mut [u8],
            slot: usize,
            n: usize,
            frames: &mut Vec<(usize, usize)>,
        ) -> io::Result<()> {
            if let Some(nic) = self.nic.get() {
                (self.at_read)(nic);
            }
            net_backends::recv_each(self, slab, slot, n, frames)
        }
        fn fd(&self) -> RawFd {
            self.inner.fd()
        }
    }

    /// A NIC over one Probe backend per entry of `at_read`, and the backends' peers.
    fn probed(at_read: Vec<AtRead>) -> (Shared, Vec<MemPeer>) {
        let slot = Arc::new(OnceLock::new());
        let mut peers = vec![];
        let mut backends: Vec<Box<dyn NetBackend>> = vec![];
        for at_read in at_read {
            let (inner, peer) = pair(Default::default());
            peers.push(peer);
            backends.push(Box::new(Probe {
                inner,
                nic: slot.clone(),
                at_read,
            }));
        }
        let port = NetPort::with_queues("sink".into(), backends).unwrap();
        let sink = Sink {
            config: PciConfig::new(0x1234, 0x5678, (2, 0, 0), 0),
            got: vec![],
        };
        let nic = Arc::new(Mutex::new(Nic::new(sink, port)));
        let _ = slot.set(nic.clone());
        (nic, peers)
    }

    #[test]
    fn a_worker_reads_the_first_batch_of_a_turn_without_the_nics_lock() {
        let (tx, rx) = mpsc::channel();
        let (nic, peers) = probed(vec![Box::new(move |nic: &Shared| {
            let _ = tx.send(nic.try_lock().is_ok());
        })]);
        let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().unwrap();
        for w in Nic::workers(&nic) {
            em.add_subscriber(Box::new(w));
        }
        peers[0].inject(b"first");
        em.run_with_timeout(1000).unwrap();
        // The read ahead of the turn, then (the batch came back full) one under the lock
        // that found the backend empty.
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [true, false]);
        assert_eq!(nic.lock().unwrap().model.got, [b"first".to_vec()]);
        // The next turn asks for one frame more than the last read, ahead of the lock.
        for f in [b"a", b"b", b"c"] {
            peers[0].inject(f);
        }
        em.run_with_timeout(1000).unwrap();
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [true, false]);
        assert_eq!(nic.lock().unwrap().model.got.len(), 4);
        assert_eq!(nic.lock().unwrap().model.got[3], b"c");
    }

    /// Two queues, each on a thread of its own, read their backends at the same time: each
    /// read waits (5 s at most) for the other queue's to begin. Under the NIC's lock the
    /// second read could not begin before the first ended.
    #[test]
    fn the_workers_of_two_queues_read_side_by_side() {
        let (a_in, a_seen) = mpsc::channel::<()>();
        let (b_in, b_seen) = mpsc::channel::<()>();
        let met = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let meet = |me: mpsc::Sender<()>,
                    other: mpsc::Receiver<()>,
                    met: Arc<std::sync::atomic::AtomicUsize>| {
            let other = Mutex::new(other);
            let mut first = true;
            Box::new(move |_: &Shared| {
                if std::mem::take(&mut first) {
                    let _ = me.send(());
                    if other
                        .lock()
                        .unwrap()
                        .recv_timeout(Duration::from_secs(5))
                        .is_ok()
                    {
                        met.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }) as AtRead
        };
        let (nic, peers) = probed(vec![
            meet(a_in, b_seen, met.clone()),
            meet(b_in, a_seen, met.clone()),
        ]);
        let threads: Vec<_> = Nic::workers(&nic)
            .into_iter()
            .zip(&peers)
            .map(|(w, peer)| {
                peer.inject(b"frame");
                std::thread::spawn(move || {
                    let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().unwrap();
                    em.add_subscriber(Box::new(w));
                    em.run_with_timeout(10_000).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            met.load(Ordering::Relaxed),
            2,
            "each read saw the other begin"
        );
        assert_eq!(nic.lock().unwrap().model.got.len(), 2);
    }
}
