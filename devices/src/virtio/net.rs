//! virtio-net-pci (virtio 1.0, 5.1): RX and TX split virtqueues (one pair per queue of the
//! backend; more than one in use only with `mq=on` and VIRTIO_NET_F_MQ), the control virtqueue
//! (receive filter, MAC tables, queue pairs: `ctrl.rs`), MAC and link status in config space,
//! mergeable RX buffers, event-index suppression, and checksum/TSO offloads offered only when
//! the backend carries a virtio-net header.
//!
//! Queue `2p` receives and `2p + 1` transmits for pair `p`, whose frames cross queue `p` of
//! the port (a multiqueue tap's `p`th descriptor). The control queue is queue `2 * pairs` when
//! the driver accepted VIRTIO_NET_F_MQ, else queue 2 (virtio 1.0, 5.1.2); its notifications
//! are not wired to an ioeventfd, so commands run on the vCPU that rang, before it resumes
//! (Linux's driver spins for the answer).
//!
//! Register access (config space, common cfg, ISR, MSI-X) arrives on vCPU threads; queue work
//! runs on the I/O thread of the pair's port queue, woken by the port's kicks (wired to the
//! notify addresses through KVM ioeventfds). Both hold the device lock, but for the system
//! calls: a TX batch goes after the device's turn, sent without the lock, and its answer
//! returns the chains ([`NetPort::send_later`]); a reset or a device error forgets a batch
//! out, which is then not sent. A driver error sets DEVICE_NEEDS_RESET and stops the queues
//! until the driver resets the device (virtio 1.0, 2.1.2).
//!
//! A snapshot holds the common configuration, the ISR, the device config (MAC, link) and each
//! queue's setup and ring positions; the chains of a TX batch out are saved as still
//! available (see `VirtioNet::save_state`), so a restored device continues from the rings in
//! guest RAM.

use super::transport::*;
use super::*;
use crate::interrupt::{IntxLine, IrqChip};
use crate::net::guest_iov::{self, GuestRam};
use crate::net::{NetPort, NicModel, Rx, RxFilter};
use crate::pci::{BarKind, Msix, PciConfig};
use crate::snapshot::{RestoreError, State};
use net_backends::vnet::{VnetHdr, VNET_HDR_LEN};
use net_backends::{Capabilities, MacAddr, Offloads, MAX_FRAME};
use std::io::{self, IoSlice};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use virtio_bindings::virtio_net as vnet;
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

// Feature bits (virtio 1.0, 5.1.3) as masks.
pub const VIRTIO_NET_F_CSUM: u64 = 1 << vnet::VIRTIO_NET_F_CSUM;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << vnet::VIRTIO_NET_F_GUEST_CSUM;
pub const VIRTIO_NET_F_MTU: u64 = 1 << vnet::VIRTIO_NET_F_MTU;
pub const VIRTIO_NET_F_MAC: u64 = 1 << vnet::VIRTIO_NET_F_MAC;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << vnet::VIRTIO_NET_F_GUEST_TSO4;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << vnet::VIRTIO_NET_F_GUEST_TSO6;
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << vnet::VIRTIO_NET_F_GUEST_ECN;
pub const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << vnet::VIRTIO_NET_F_GUEST_UFO;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << vnet::VIRTIO_NET_F_HOST_TSO4;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << vnet::VIRTIO_NET_F_HOST_TSO6;
pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << vnet::VIRTIO_NET_F_HOST_ECN;
pub const VIRTIO_NET_F_HOST_UFO: u64 = 1 << vnet::VIRTIO_NET_F_HOST_UFO;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << vnet::VIRTIO_NET_F_MRG_RXBUF;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << vnet::VIRTIO_NET_F_STATUS;
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << vnet::VIRTIO_NET_F_CTRL_VQ;
pub const VIRTIO_NET_F_CTRL_RX: u64 = 1 << vnet::VIRTIO_NET_F_CTRL_RX;
pub const VIRTIO_NET_F_CTRL_RX_EXTRA: u64 = 1 << vnet::VIRTIO_NET_F_CTRL_RX_EXTRA;
pub const VIRTIO_NET_F_MQ: u64 = 1 << vnet::VIRTIO_NET_F_MQ;
pub const VIRTIO_NET_F_CTRL_MAC_ADDR: u64 = 1 << vnet::VIRTIO_NET_F_CTRL_MAC_ADDR;
pub const VIRTIO_NET_S_LINK_UP: u16 = vnet::VIRTIO_NET_S_LINK_UP as u16;

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_MAX: u16 = 256;
/// Queue pairs at most (QEMU's limit for virtio-net-pci on a tap is 1024; Linux asks for one
/// per vCPU).
pub const MAX_QUEUE_PAIRS: usize = 16;
/// MSI-X vectors at most: the table (16 bytes each) ends where the PBA begins.
pub const MAX_VECTORS: u16 = (MSIX_PBA / 16) as u16;
/// TX chains handled per event; the rest wait for the next turn of the I/O thread, which the
/// device asks for through its port.
const TX_BUDGET: usize = QUEUE_MAX as usize;
/// TX frames handed to the port together (one system call for all of them on a tap).
const TX_BATCH: usize = 64;
/// Times one frame is offered to the guest's RX buffers in one event (each after asking to be
/// notified of more and finding that some came in meanwhile).
const RX_TRIES: usize = 4;
/// Pieces one TX frame may come in: a chain can be no longer than the queue, and each
/// descriptor may cross a region boundary once.
const MAX_TX_PIECES: usize = 2 * QUEUE_MAX as usize;
/// Descriptors one chain may have, an indirect table's included: the virtio spec (2.7.5.3.1)
/// has a driver make none longer than the queue. Every descriptor counts, so a chain of
/// empty ones cannot make a walk long.
const MAX_CHAIN_DESCS: usize = QUEUE_MAX as usize;

/// A descriptor's length checked as every walk checks it: none may be empty (as QEMU
/// refuses "zero sized buffers"), and the `i`th of a chain (from 0) must be within
/// [`MAX_CHAIN_DESCS`].
fn chain_desc(i: usize, len: u32) -> Result<usize, &'static str> {
    if i >= MAX_CHAIN_DESCS {
        Err("descriptor chain longer than the queue")
    } else if len == 0 {
        Err("zero-sized descriptor")
    } else {
        Ok(len as usize)
    }
}

/// Whether a queue is ready and its three areas lie in guest memory, as virtio-queue's
/// `is_valid` checks, without its log line for each refusal: a driver can ask for the check
/// (DRIVER_OK after a reset) as often as it likes.
fn in_memory(q: &Queue, mem: &GuestRam) -> bool {
    let n = u64::from(q.size());
    // Sizes from the virtio spec's layout (2.7): 16 bytes a descriptor; flags, index and
    // event words around 2 bytes an entry (available) or 8 (used).
    let areas = [
        (q.desc_table(), 16 * n),
        (q.avail_ring(), 6 + 2 * n),
        (q.used_ring(), 6 + 8 * n),
    ];
    q.ready()
        && areas.iter().all(|&(base, len)| {
            mem.check_range(
                GuestAddress(base),
                len as usize,
                vm_memory::Permissions::Write,
            )
        })
}

mod ctrl;
use ctrl::{RxMode, ACK_ERR, ACK_OK, CTRL_MAX};

/// How the device is built (QEMU's virtio-net-pci properties).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioNetOptions {
    /// Queue pairs: one per queue of the port (`-netdev tap,queues=N`).
    pub queue_pairs: usize,
    /// `mq=`: VIRTIO_NET_F_MQ offered (with more than one pair), so the driver may use them.
    pub mq: bool,
    /// `ctrl_vq=`: the control queue with RX mode, MAC tables and the MAC address.
    pub ctrl_vq: bool,
    /// `mrg_rxbuf=`: mergeable receive buffers offered.
    pub mrg_rxbuf: bool,
    /// `vectors=`: MSI-X vectors (QEMU's default: two per pair, one for the configuration
    /// and one for the control queue).
    pub vectors: Option<u16>,
    /// Feature bits the user turned off (QEMU's offload properties: `csum=off`,
    /// `host_tso4=off`, `guest_tso4=off`, ...): never offered, nor any feature that needs one
    /// of them.
    pub withheld: u64,
    /// `host_mtu=`: VIRTIO_NET_F_MTU offered with this MTU in the configuration (virtio 1.0,
    /// 5.1.4: 68 to 65535); the driver takes it as its interface's MTU and largest MTU.
    pub mtu: Option<u16>,
}

impl Default for VirtioNetOptions {
    fn default() -> Self {
        VirtioNetOptions {
            queue_pairs: 1,
            mq: false,
            ctrl_vq: true,
            mrg_rxbuf: true,
            vectors: None,
            withheld: 0,
            mtu: None,
        }
    }
}

/// `features` without the offloads whose prerequisite is not among them (virtio 1.0, 5.1.3.1:
/// a device must not offer a feature without the ones it requires): segmentation and UFO need
/// the checksum offload of their direction, ECN needs TSO4 or TSO6.
pub fn without_orphans(features: u64) -> u64 {
    let mut f = features;
    for (csum, tso4, tso6, ecn, ufo) in [
        (
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_HOST_UFO,
        ),
        (
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
        ),
    ] {
        if f & csum == 0 {
            f &= !(tso4 | tso6 | ufo);
        }
        if f & (tso4 | tso6) == 0 {
            f &= !ecn;
        }
    }
    f
}

/// PCI identity as QEMU presents virtio-net: transitional device ID, subsystem = net.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
pub const VIRTIO_NET_TRANSITIONAL_ID: u16 = 0x1000;
pub const VIRTIO_ID_NET: u16 = 1;

pub struct VirtioNet {
    config: PciConfig,
    msix: Msix,
    intx: IntxLine,
    ioevents: Arc<dyn IoEventRegistry>,
    /// Where the notify addresses are registered (BAR 4 base), if anywhere.
    registered_bar: Option<u64>,
    /// Where registering them last failed (another device's doorbell there, say): not tried
    /// again, nor said again, until the BAR moves (a guest could otherwise have every config
    /// write retry and log it).
    ioevents_failed_at: Option<u64>,
    /// Said once: a guest moving BAR 4 to and from a place that fails could otherwise write
    /// the log at its pace.
    ioevents_warned: bool,
    mem: GuestRam,
    /// The address the driver uses (config space; VIRTIO_NET_CTRL_MAC_ADDR_SET changes it).
    mac: MacAddr,
    /// The address the device was given (`mac=`): what a reset goes back to.
    configured_mac: MacAddr,
    /// Frames cross the backend with a virtio-net header (else the model adds and removes
    /// the guest's).
    vnet_hdr: bool,

    device_features: u64,
    driver_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    status: u8,
    isr: u8,
    msix_config: u16,
    queue_select: u16,
    /// Queue pairs the device has (the port's queues).
    pairs: usize,
    /// Pairs the driver uses (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET; 1 after a reset).
    curr_pairs: usize,
    /// The device has a control queue.
    ctrl_vq: bool,
    /// `host_mtu=`: the MTU offered (VIRTIO_NET_F_MTU).
    mtu: Option<u16>,
    n_vectors: u16,
    /// Every queue: the pairs', then the control queue's slot (index `2 * pairs`).
    queues: Vec<Queue>,
    vectors: Vec<u16>,
    /// The driver wrote a queue size the device cannot use (not a power of two, too big).
    bad_size: Vec<bool>,
    active: bool,
    rx_mode: RxMode,
    /// A control command's bytes (kept for its allocation).
    ctrl_buf: Vec<u8>,
    /// The backend's link, as the port last said (the config space's status field).
    link_up: bool,
    /// Interrupts raised so far.
    interrupts: u64,

    rx_heads: Vec<(u16, u32)>,
    rx_hdr_pieces: Vec<(vm_memory::GuestAddress, usize, usize)>,
    /// The I/O vectors of the TX frames going out, and where each ends (kept for their
    /// allocations).
    tx_iov: Vec<IoSlice<'static>>,
    tx_batch: TxBatch,
    /// Each pair's TX walk.
    tx_runs: Vec<TxRun>,
}

/// One pair's TX walk, which goes on over batches sent after the device's turn
/// ([`NetPort::send_later`]), each answered through [`NicModel::tx_flown`].
#[derive(Default)]
struct TxRun {
    /// Chains the walk may still take.
    budget: usize,
    /// Chains went back to the driver: it is signalled when the walk ends.
    used: bool,
    /// A batch is out: its chains are taken from the queue and not yet used.
    out: bool,
    /// The heads of the batch's chains, in order.
    heads: Vec<u16>,
    /// The error of the malformed chain that ended the batch (taken from the queue too).
    malformed: Option<&'static str>,
}

impl VirtioNet {
    /// A device whose port has `caps` (the backend's, as [`NetPort::capabilities`] gives
    /// them): offloads are offered only when frames carry a virtio-net header.
    pub fn new(
        mac: MacAddr,
        caps: Capabilities,
        mem: GuestMemoryMmap,
        chip: Arc<dyn IrqChip>,
        intx: IntxLine,
        ioevents: Arc<dyn IoEventRegistry>,
        opts: VirtioNetOptions,
    ) -> io::Result<Self> {
        let pairs = opts.queue_pairs;
        if !(1..=MAX_QUEUE_PAIRS).contains(&pairs) {
            return Err(io::Error::other(format!(
                "{pairs} queue pairs (1 to {MAX_QUEUE_PAIRS})"
            )));
        }
        let n_vectors = opts.vectors.unwrap_or(2 * pairs as u16 + 2);
        if !(1..=MAX_VECTORS).contains(&n_vectors) {
            return Err(io::Error::other(format!(
                "{n_vectors} MSI-X vectors (1 to {MAX_VECTORS})"
            )));
        }
        let mut config = PciConfig::new(
            VIRTIO_PCI_VENDOR,
            VIRTIO_NET_TRANSITIONAL_ID,
            (0x02, 0x00, 0x00),
            0,
        );
        config.set_subsystem(VIRTIO_PCI_VENDOR, VIRTIO_ID_NET);
        config.set_interrupt(1, intx.gsi() as u8);
        config.add_bar(MSIX_BAR, BarKind::Mem32, MSIX_BAR_SIZE);
        config.add_bar(VIRTIO_BAR, BarKind::Mem64, VIRTIO_BAR_SIZE);
        let msix = Msix::new(
            &mut config,
            chip.clone(),
            n_vectors,
            MSIX_BAR as u8,
            MSIX_TABLE as u32,
            MSIX_PBA as u32,
        )?;
        add_capabilities(&mut config);

        let mut device_features = VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_EVENT_IDX
            | VIRTIO_F_RING_INDIRECT_DESC
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS;
        if opts.mrg_rxbuf {
            device_features |= VIRTIO_NET_F_MRG_RXBUF;
        }
        if opts.mtu.is_some() {
            device_features |= VIRTIO_NET_F_MTU;
        }
        if opts.ctrl_vq {
            device_features |= VIRTIO_NET_F_CTRL_VQ
                | VIRTIO_NET_F_CTRL_RX
                | VIRTIO_NET_F_CTRL_RX_EXTRA
                | VIRTIO_NET_F_CTRL_MAC_ADDR;
            if opts.mq && pairs > 1 {
                device_features |= VIRTIO_NET_F_MQ;
            }
        }
        if caps.vnet_hdr {
            let o = caps.offloads;
            if o.csum {
                device_features |= VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM;
                if o.tso4 {
                    device_features |= VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_GUEST_TSO4;
                }
                if o.tso6 {
                    device_features |= VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_GUEST_TSO6;
                }
                if o.tso_ecn {
                    device_features |= VIRTIO_NET_F_HOST_ECN | VIRTIO_NET_F_GUEST_ECN;
                }
                if o.ufo {
                    device_features |= VIRTIO_NET_F_HOST_UFO | VIRTIO_NET_F_GUEST_UFO;
                }
            }
        }
        let device_features = without_orphans(device_features & !opts.withheld);
        let n_queues = 2 * pairs + opts.ctrl_vq as usize;
        let new_queue = |_| Queue::new(QUEUE_MAX).expect("256 is a valid queue size");
        Ok(VirtioNet {
            config,
            msix,
            intx,
            ioevents,
            registered_bar: None,
            ioevents_failed_at: None,
            ioevents_warned: false,
            mem: GuestRam(mem),
            mac,
            configured_mac: mac,
            vnet_hdr: caps.vnet_hdr,
            device_features,
            driver_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            status: 0,
            isr: 0,
            msix_config: VIRTIO_MSI_NO_VECTOR,
            queue_select: 0,
            pairs,
            curr_pairs: 1,
            ctrl_vq: opts.ctrl_vq,
            mtu: opts.mtu,
            n_vectors,
            queues: (0..n_queues).map(new_queue).collect(),
            vectors: vec![VIRTIO_MSI_NO_VECTOR; n_queues],
            bad_size: vec![false; n_queues],
            active: false,
            rx_mode: RxMode::default(),
            ctrl_buf: Vec::new(),
            link_up: true,
            interrupts: 0,
            rx_heads: Vec::with_capacity(64),
            rx_hdr_pieces: Vec::with_capacity(4),
            tx_iov: Vec::with_capacity(4 * TX_BATCH),
            tx_batch: TxBatch::default(),
            tx_runs: (0..pairs).map(|_| TxRun::default()).collect(),
        })
    }

    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// The driver took feature `f` (and the device offers it: a restored state cannot turn
    /// on what this device lacks).
    fn has(&self, f: u64) -> bool {
        self.driver_features & self.device_features & f != 0
    }

    /// Pairs whose queues the driver may use: all with VIRTIO_NET_F_MQ, else the first.
    fn data_pairs(&self) -> usize {
        if self.has(VIRTIO_NET_F_MQ) {
            self.pairs
        } else {
            1
        }
    }

    /// The control queue's index (virtio 1.0, 5.1.2: after the data queues in use).
    fn ctrl_index(&self) -> Option<usize> {
        self.ctrl_vq.then(|| 2 * self.data_pairs())
    }

    /// The queue's notification offset: its index, but the control queue's is always the
    /// last one (`2 * pairs`), so that no data queue's ioeventfd ever takes its doorbell.
    fn notify_off(&self, q: usize) -> usize {
        if Some(q) == self.ctrl_index() {
            2 * self.pairs
        } else {
            q
        }
    }

    /// Turns the port's queues of the pairs in use on and the others off.
    fn apply_pairs(&self, port: &mut NetPort) {
        for q in 0..port.queue_count() {
            port.set_queue_enabled(q, q < self.curr_pairs);
        }
    }

    /// A driver error: logged through the port (once, then rate-limited), DEVICE_NEEDS_RESET
    /// set, the queues stopped, the driver told with a configuration interrupt.
    fn device_error(&mut self, port: &mut NetPort, what: &str) {
        port.guest_error(format_args!("{what}; the device needs a reset"));
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.active = false;
        self.forget_tx_batches(port);
        self.isr |= 2;
        self.interrupt(self.msix_config);
    }

    /// The TX batches out are no longer the device's business (a reset, a device error): their
    /// answers, when they come, are not put into the rings, and their chains count as never
    /// taken, as a save counts those of a batch out (a device error left them taken for good,
    /// and a queue more than its size ahead was a snapshot no restore would take).
    fn forget_tx_batches(&mut self, port: &mut NetPort) {
        for (pair, run) in self.tx_runs.iter_mut().enumerate() {
            if std::mem::take(&mut run.out) {
                let taken = run.heads.len() + run.malformed.take().is_some() as usize;
                let q = &mut self.queues[2 * pair + 1];
                q.set_next_avail(q.next_avail().wrapping_sub(taken as u16));
            }
            run.used = false;
        }
        port.forget_flights();
    }

    fn reset(&mut self, port: &mut NetPort) {
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.status = 0;
        self.isr = 0;
        self.intx.set(false);
        self.msix_config = VIRTIO_MSI_NO_VECTOR;
        self.queue_select = 0;
        self.forget_tx_batches(port);
        for q in self.queues.iter_mut() {
            q.reset();
        }
        self.vectors.fill(VIRTIO_MSI_NO_VECTOR);
        self.bad_size.fill(false);
        self.active = false;
        self.curr_pairs = 1;
        self.rx_mode = RxMode::default();
        self.mac = self.configured_mac;
        self.apply_pairs(port);
        // A receiver that stalled waits no more: the next activation kicks it (turning the
        // queues on and off above kicked every one).
    }

    /// Checks the queues at DRIVER_OK: the first pair must be set up; any other queue the
    /// driver enabled must be valid too (one it left off is never looked at).
    fn activate(&mut self, port: &mut NetPort) {
        let event_idx = self.has(VIRTIO_F_RING_EVENT_IDX);
        for i in 0..self.queues.len() {
            let q = &mut self.queues[i];
            if (i <= TX || q.ready()) && (!in_memory(q, &self.mem) || self.bad_size[i]) {
                let what = format!("queue {i} is not set up validly at DRIVER_OK");
                self.device_error(port, &what);
                return;
            }
            q.set_event_idx(event_idx);
        }
        self.start_queues(port);
    }

    /// What DRIVER_OK does once the queues checked out (and what a restore of a running
    /// device does again): the guest's offloads to the backend, the queues live, and both
    /// directions looked at, as frames may already be waiting on either side.
    fn start_queues(&mut self, port: &mut NetPort) {
        let offloads = Offloads {
            csum: self.has(VIRTIO_NET_F_GUEST_CSUM),
            tso4: self.has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: self.has(VIRTIO_NET_F_GUEST_TSO6),
            tso_ecn: self.has(VIRTIO_NET_F_GUEST_ECN),
            ufo: self.has(VIRTIO_NET_F_GUEST_UFO),
        };
        port.set_rx_offloads(offloads);
        self.active = true;
        self.apply_pairs(port);
        for q in 0..port.queue_count() {
            port.kick_tx_of(q);
            port.kick_rx_of(q);
        }
    }

    /// Raises `vector` (MSI-X) or INTx with the ISR's queue bit.
    fn interrupt(&mut self, vector: u16) {
        self.interrupts += 1;
        if self.msix.enabled() {
            if vector != VIRTIO_MSI_NO_VECTOR {
                self.msix.notify(vector as usize);
            }
            return;
        }
        self.drive_intx();
        self.config.set_interrupt_status(self.isr != 0);
    }

    /// INTx is up while the ISR holds a cause, MSI-X is off and the command register lets
    /// INTx out (PCI: Interrupt Disable deasserts the pin; the status bit stays).
    fn drive_intx(&mut self) {
        let intx_on = self.config.command() & crate::pci::PCI_COMMAND_INTX_DISABLE == 0;
        self.intx
            .set(self.isr != 0 && !self.msix.enabled() && intx_on);
    }

    fn signal_queue(&mut self, port: &mut NetPort, q: usize) {
        match self.queues[q].needs_notification(&self.mem) {
            Ok(true) => {
                self.isr |= 1;
                self.interrupt(self.vectors[q]);
            }
            Ok(false) => {}
            Err(_) => self.device_error(port, "cannot read the used-event index"),
        }
    }

    // ---- TX -------------------------------------------------------------------------------

    /// Whether the driver's view of queue `q` is one the device can walk: ready, with an
    /// available ring, and an available index at most a queue size ahead of what the device
    /// has taken (anything else is a driver error, virtio 1.0 2.4.6).
    fn queue_usable(&mut self, port: &mut NetPort, q: usize) -> bool {
        match self.queues[q].iter(&self.mem) {
            Ok(_) => true,
            Err(e) => {
                self.device_error(port, &format!("queue {q} cannot be used: {e}"));
                false
            }
        }
    }

    /// Starts a walk of the TX queue of the port's current pair, unless one is waiting for its
    /// batch's answer (which goes on with it).
    fn start_tx(&mut self, port: &mut NetPort) {
        let Some(run) = self.tx_runs.get_mut(port.queue()) else {
            return;
        };
        if run.out {
            return;
        }
        run.budget = TX_BUDGET;
        self.process_tx(port);
    }

    /// Sends what waits in the TX queue of the port's current pair, in the walk's budget;
    /// returns when a batch is out (its answer goes on: [`VirtioNet::tx_answer`]).
    fn process_tx(&mut self, port: &mut NetPort) {
        let pair = port.queue();
        let tx = 2 * pair + 1;
        if !self.active || port.tx_blocked() || pair >= self.data_pairs() {
            return self.end_tx(port, pair);
        }
        if !self.queues[tx].ready() {
            return;
        }
        let run = &mut self.tx_runs[pair];
        let (mut budget, mut used) = (run.budget, run.used);
        let walk = loop {
            if self.queues[tx].disable_notification(&self.mem).is_err() {
                break Err("TX ring unreadable");
            }
            if !self.queue_usable(port, tx) {
                break Ok(TxWalk::Done);
            }
            let (mem, q) = (&self.mem, &mut self.queues[tx]);
            let mut iov = guest_iov::recycle(std::mem::take(&mut self.tx_iov));
            let r = transmit_chains(
                mem,
                q,
                port,
                self.vnet_hdr,
                &mut budget,
                &mut used,
                &mut iov,
                &mut self.tx_batch,
            );
            self.tx_iov = guest_iov::recycle(iov);
            match r {
                Ok(TxWalk::Done) => {}
                out => break out,
            }
            if port.tx_blocked() {
                break Ok(TxWalk::Done);
            }
            if budget == 0 {
                // More may be waiting: come back after the other fds had their turn.
                port.kick_tx();
                break Ok(TxWalk::Done);
            }
            match self.queues[tx].enable_notification(&self.mem) {
                Ok(true) => continue,
                Ok(false) => break Ok(TxWalk::Done),
                Err(_) => break Err("TX ring unreadable"),
            }
        };
        let run = &mut self.tx_runs[pair];
        (run.budget, run.used) = (budget, used);
        match walk {
            Ok(TxWalk::Done) => self.end_tx(port, pair),
            Ok(TxWalk::Out { malformed }) => {
                run.out = true;
                run.heads.clear();
                run.heads.extend_from_slice(&self.tx_batch.heads);
                run.malformed = malformed;
            }
            Err(what) => self.device_error(port, what),
        }
    }

    /// The end of a pair's walk: the driver is signalled if chains went back to it.
    fn end_tx(&mut self, port: &mut NetPort, pair: usize) {
        if let Some(run) = self.tx_runs.get_mut(pair) {
            if std::mem::take(&mut run.used) && self.active {
                self.signal_queue(port, 2 * pair + 1);
            }
        }
    }

    /// The answer to the batch of the port's current pair that went after the device's turn:
    /// the first `taken` chains go back to the driver, the rest back into the queue (as
    /// [`transmit_chains`] does with a batch it sends itself), and the walk goes on. Not
    /// into rings a reset or a device error took away meanwhile.
    fn tx_answer(&mut self, port: &mut NetPort, taken: usize) {
        let pair = port.queue();
        let tx = 2 * pair + 1;
        let Some(run) = self.tx_runs.get_mut(pair) else {
            return;
        };
        if !std::mem::take(&mut run.out) {
            return;
        }
        let (n, malformed) = (run.heads.len(), run.malformed.take());
        let taken = taken.min(n);
        for i in 0..taken {
            let head = self.tx_runs[pair].heads[i];
            if self.queues[tx].add_used(&self.mem, head, 0).is_err() {
                return self.device_error(port, "TX used ring unwritable");
            }
            self.tx_runs[pair].used = true;
        }
        if taken < n {
            // Put the rest back (a malformed chain too: it is seen again, and reported, when
            // the walk gets that far); the port calls transmit() when the backend drains.
            let back = (n - taken + malformed.is_some() as usize) as u16;
            let q = &mut self.queues[tx];
            q.set_next_avail(q.next_avail().wrapping_sub(back));
            return self.end_tx(port, pair);
        }
        if let Some(what) = malformed {
            return self.device_error(port, what);
        }
        self.process_tx(port);
    }

    // ---- RX -------------------------------------------------------------------------------

    /// Places one frame in the guest's buffers. With no (or not enough) buffers it asks the
    /// guest to notify it of more and looks again if some came in meanwhile, then leaves the
    /// frame waiting (a bounded number of tries; past them it kicks itself to try later).
    fn receive_frame(&mut self, port: &mut NetPort, raw: &[u8]) -> Rx {
        let rx = 2 * port.queue();
        if port.queue() >= self.curr_pairs || !self.queues[rx].ready() {
            return Rx::Dropped;
        }
        for _ in 0..RX_TRIES {
            match self.deliver(port, raw) {
                Ok(Some(r)) => return r,
                // No chain: no buffers, or a queue the device cannot walk (checked only now,
                // not on every frame).
                Ok(None) if !self.queue_usable(port, rx) => return Rx::Dropped,
                Ok(None) => match self.arm_rx_notification(rx) {
                    Ok(true) => continue,
                    Ok(false) => return Rx::NoRoom,
                    Err(_) => {
                        self.device_error(port, "RX ring unreadable");
                        return Rx::Dropped;
                    }
                },
                Err(what) => {
                    self.device_error(port, what);
                    return Rx::Dropped;
                }
            }
        }
        // The guest kept adding buffers, never enough: look again on the loop's next turn.
        port.kick_rx();
        Rx::NoRoom
    }

    /// Asks the guest to notify RX queue `rx` when it makes buffers available beyond all it
    /// has made available so far; true when some came in meanwhile (look again). Not beyond
    /// those the device has taken, as `enable_notification` would put it: after a frame
    /// that did not fit in the buffers there, the device has given them back (its position
    /// is behind the guest's index), and with VIRTIO_F_RING_EVENT_IDX a driver notifies only
    /// when its index crosses the one the device asked for, which then it never would.
    fn arm_rx_notification(&mut self, rx: usize) -> Result<bool, virtio_queue::Error> {
        let q = &mut self.queues[rx];
        let taken = q.next_avail();
        let avail = q.avail_idx(&self.mem, Ordering::Acquire)?.0;
        q.set_next_avail(avail);
        // Sets the event index (or clears NO_NOTIFY), fences, and reads the index again.
        let more = q.enable_notification(&self.mem);
        q.set_next_avail(taken);
        more
    }

    /// One try at placing a frame: `None` when the guest has no room (nothing consumed).
    fn deliver(&mut self, port: &mut NetPort, raw: &[u8]) -> Result<Option<Rx>, &'static str> {
        let (hdr, data) = if self.vnet_hdr {
            match raw.split_at_checked(VNET_HDR_LEN) {
                Some((h, d)) => (VnetHdr::parse(h).unwrap_or_default(), d),
                None => return Ok(Some(Rx::Dropped)), // shorter than a header: not a frame
            }
        } else {
            (VnetHdr::default(), raw)
        };
        if !self
            .rx_mode
            .accepts(&self.mac.0, data.get(..6).unwrap_or(data))
        {
            port.stats.rx_dropped += 1;
            return Ok(Some(Rx::Dropped));
        }
        let rx = 2 * port.queue();
        let start_avail = self.queues[rx].next_avail();
        // Scratch lists kept in the device so a frame costs no allocation.
        let mut heads = std::mem::take(&mut self.rx_heads);
        heads.clear();
        // Where the header's bytes went: (guest address, offset in header, length).
        let mut hdr_pieces = std::mem::take(&mut self.rx_hdr_pieces);
        hdr_pieces.clear();
        let r = self.fill_rx(
            port,
            rx,
            hdr,
            data,
            start_avail,
            &mut heads,
            &mut hdr_pieces,
        );
        self.rx_heads = heads;
        self.rx_hdr_pieces = hdr_pieces;
        r
    }

    /// Writes header + data over as many RX chains as it takes (one without MRG_RXBUF).
    #[allow(clippy::too_many_arguments)]
    fn fill_rx(
        &mut self,
        port: &mut NetPort,
        rx: usize,
        mut hdr: VnetHdr,
        data: &[u8],
        start_avail: u16,
        heads: &mut Vec<(u16, u32)>,
        hdr_pieces: &mut Vec<(vm_memory::GuestAddress, usize, usize)>,
    ) -> Result<Option<Rx>, &'static str> {
        let mrg = self.has(VIRTIO_NET_F_MRG_RXBUF);
        let total = VNET_HDR_LEN + data.len();
        let mut written = 0usize;
        while written < total {
            // A frame needing more chains than the ring holds never fits: dropped, the chains
            // left to the guest. (Taking them as the guest keeps adding more would make the
            // walk as long as the guest likes.)
            if heads.len() >= usize::from(self.queues[rx].size()) {
                self.queues[rx].set_next_avail(start_avail);
                port.stats.rx_dropped += 1;
                return Ok(Some(Rx::Dropped));
            }
            let Some(chain) = self.queues[rx].pop_descriptor_chain(&self.mem) else {
                self.queues[rx].set_next_avail(start_avail);
                return Ok(None);
            };
            let head = chain.head_index();
            let mut in_chain = 0usize;
            for (i, d) in chain.enumerate() {
                if !d.is_write_only() {
                    return Err("RX descriptor is not device-writable");
                }
                let n = chain_desc(i, d.len())?.min(total - written);
                let (mut pos, end, mut addr) = (written, written + n, d.addr());
                if pos < VNET_HDR_LEN && pos < end {
                    let h = (VNET_HDR_LEN.min(end)) - pos;
                    hdr_pieces.push((addr, pos, h));
                    pos += h;
                    addr = addr
                        .checked_add(h as u64)
                        .ok_or("RX buffer outside guest memory")?;
                }
                if pos < end {
                    let off = pos - VNET_HDR_LEN;
                    if !guest_iov::write(&self.mem, addr, &data[off..off + (end - pos)]) {
                        return Err("RX buffer outside guest memory");
                    }
                }
                written = end;
                in_chain += n;
                if written == total {
                    break;
                }
            }
            heads.push((head, in_chain as u32));
            if !mrg && written < total {
                // Without mergeable buffers one chain must hold the frame: drop it.
                port.stats.rx_dropped += 1;
                self.queues[rx]
                    .add_used(&self.mem, head, 0)
                    .map_err(|_| "RX used ring unwritable")?;
                return Ok(Some(Rx::Dropped));
            }
        }
        hdr.num_buffers = heads.len() as u16;
        let hb = hdr.to_bytes();
        for &(addr, off, n) in hdr_pieces.iter() {
            if !guest_iov::write(&self.mem, addr, &hb[off..off + n]) {
                return Err("RX buffer outside guest memory");
            }
        }
        for &(h, l) in heads.iter() {
            self.queues[rx]
                .add_used(&self.mem, h, l)
                .map_err(|_| "RX used ring unwritable")?;
        }
        port.stats.rx_frames += 1;
        port.stats.rx_bytes += data.len() as u64;
        Ok(Some(Rx::Delivered))
    }

    fn notify_addr(&self, base: u64, q: usize) -> u64 {
        base + NOTIFY_CFG + q as u64 * NOTIFY_OFF_MULTIPLIER as u64
    }

    /// The port's kick for data queue `q`: the guest's notification of that queue (pair
    /// `q / 2`, receive for even `q`).
    fn kick(port: &NetPort, q: usize) -> Option<&vmm_sys_util::eventfd::EventFd> {
        if q % 2 == RX {
            port.rx_kick_fd(q / 2)
        } else {
            port.tx_kick_fd(q / 2)
        }
    }

    /// Keeps the ioeventfds on the data queues' notify addresses where the guest put BAR 4
    /// (the control queue's doorbell stays an MMIO exit).
    fn sync_ioevents(&mut self, port: &NetPort) {
        let now = self
            .config
            .decoded_bars()
            .into_iter()
            .find(|b| b.0 == VIRTIO_BAR)
            .map(|b| b.2);
        if now == self.registered_bar || (now.is_some() && now == self.ioevents_failed_at) {
            return;
        }
        self.ioevents_failed_at = None;
        let data_queues = 2 * self.pairs;
        if let Some(old) = self.registered_bar.take() {
            for q in 0..data_queues {
                if let Some(fd) = Self::kick(port, q) {
                    let _ = self.ioevents.unregister(self.notify_addr(old, q), fd);
                }
            }
        }
        let Some(base) = now else {
            return;
        };
        let mut done = 0;
        while done < data_queues {
            let ok = Self::kick(port, done).is_some_and(|fd| {
                self.ioevents
                    .register(self.notify_addr(base, done), fd)
                    .is_ok()
            });
            if !ok {
                break;
            }
            done += 1;
        }
        if done == data_queues {
            self.registered_bar = Some(base);
            return;
        }
        for q in 0..done {
            if let Some(fd) = Self::kick(port, q) {
                let _ = self.ioevents.unregister(self.notify_addr(base, q), fd);
            }
        }
        self.ioevents_failed_at = Some(base);
        if !std::mem::replace(&mut self.ioevents_warned, true) {
            log::warn!(
                "virtio-net {}: no ioeventfd at {base:#x}; kicks there go through MMIO exits",
                self.mac
            );
        }
    }

    /// Runs the commands waiting in the control queue (on the vCPU that rang its doorbell),
    /// at most a queue's worth. The queue pairs the last of them asked for are applied once at
    /// the end, before the vCPU goes back to the driver that waits for their acks: each change
    /// attaches or detaches tap queues, and a driver could otherwise ask for a queue's worth
    /// of changes at one doorbell, each costing the host a network-stack-wide lock.
    fn process_ctrl(&mut self, port: &mut NetPort) {
        let pairs = self.curr_pairs;
        self.run_ctrl(port);
        if self.curr_pairs != pairs {
            self.apply_pairs(port);
        }
    }

    fn run_ctrl(&mut self, port: &mut NetPort) {
        let Some(cq) = self.ctrl_index() else {
            return;
        };
        if !self.active || !self.queues[cq].ready() || !self.queue_usable(port, cq) {
            return;
        }
        let mut buf = std::mem::take(&mut self.ctrl_buf);
        let mut used = false;
        for _ in 0..QUEUE_MAX {
            let Some(chain) = self.queues[cq].pop_descriptor_chain(&self.mem) else {
                // Ask for the next doorbell (with VIRTIO_F_RING_EVENT_IDX the driver rings
                // only past the avail_event the device published); look again if a command
                // came in meanwhile.
                match self.queues[cq].enable_notification(&self.mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(_) => {
                        self.ctrl_buf = buf;
                        return self.device_error(port, "control queue unreadable");
                    }
                }
            };
            if self.queues[cq].disable_notification(&self.mem).is_err() {
                self.ctrl_buf = buf;
                return self.device_error(port, "control queue unreadable");
            }
            let head = chain.head_index();
            buf.clear();
            let mut ack = None;
            let mut too_long = false;
            for (i, d) in chain.enumerate() {
                if let Err(what) = chain_desc(i, d.len()) {
                    self.ctrl_buf = buf;
                    return self.device_error(port, what);
                }
                if d.is_write_only() {
                    if ack.is_none() {
                        ack = Some(d.addr());
                    }
                    continue;
                }
                if ack.is_some() {
                    ack = None; // data after the ack: not a command
                    break;
                }
                let len = d.len() as usize;
                if buf.len() + len > CTRL_MAX {
                    too_long = true;
                    continue;
                }
                let at = buf.len();
                buf.resize(at + len, 0);
                if self.mem.read_slice(&mut buf[at..], d.addr()).is_err() {
                    self.ctrl_buf = buf;
                    return self.device_error(port, "control command outside guest memory");
                }
            }
            let Some(ack_addr) = ack else {
                self.ctrl_buf = buf;
                return self.device_error(port, "control command without room for its ack");
            };
            let status = if too_long {
                ACK_ERR
            } else {
                self.ctrl_command(&buf)
            };
            if self.mem.write_obj(status, ack_addr).is_err()
                || self.queues[cq].add_used(&self.mem, head, 1).is_err()
            {
                self.ctrl_buf = buf;
                return self.device_error(port, "control queue unwritable");
            }
            used = true;
        }
        self.ctrl_buf = buf;
        // A queue's worth done and more may wait (another vCPU keeps adding): ask for the
        // next doorbell all the same, which then takes the rest.
        if self.queues[cq].enable_notification(&self.mem).is_err() {
            return self.device_error(port, "control queue unreadable");
        }
        if used {
            self.signal_queue(port, cq);
        }
    }

    /// One control command: its effect, and the ack.
    fn ctrl_command(&mut self, bytes: &[u8]) -> u8 {
        let n = ctrl::Negotiated {
            ctrl_rx: self.has(VIRTIO_NET_F_CTRL_RX),
            ctrl_rx_extra: self.has(VIRTIO_NET_F_CTRL_RX_EXTRA),
            ctrl_mac_addr: self.has(VIRTIO_NET_F_CTRL_MAC_ADDR),
            mq: self.has(VIRTIO_NET_F_MQ),
            max_pairs: self.pairs as u16,
        };
        let Some(c) = ctrl::decode(bytes, &n) else {
            log::debug!(
                "virtio-net {}: control command {bytes:02x?} refused",
                self.mac
            );
            return ACK_ERR;
        };
        match c {
            ctrl::Command::MacAddr(mac) => self.mac = MacAddr(mac),
            ctrl::Command::QueuePairs(p) => self.curr_pairs = p as usize,
            _ => self.rx_mode.apply(&c),
        }
        ACK_OK
    }

    // ---- register files ---------------------------------------------------------------------

    fn common_read(&mut self, off: u64, data: &mut [u8]) {
        let qs = self.queue_select as usize;
        let q = self.queues.get(qs);
        let (value, width, base): (u64, usize, u64) = match off {
            DEVICE_FEATURE_SELECT..=0x03 => {
                (self.device_feature_select as u64, 4, DEVICE_FEATURE_SELECT)
            }
            DEVICE_FEATURE..=0x07 => {
                let v = match self.device_feature_select {
                    0 => self.device_features as u32,
                    1 => (self.device_features >> 32) as u32,
                    _ => 0,
                };
                (v as u64, 4, DEVICE_FEATURE)
            }
            DRIVER_FEATURE_SELECT..=0x0b => {
                (self.driver_feature_select as u64, 4, DRIVER_FEATURE_SELECT)
            }
            DRIVER_FEATURE..=0x0f => {
                let v = match self.driver_feature_select {
                    0 => self.driver_features as u32,
                    1 => (self.driver_features >> 32) as u32,
                    _ => 0,
                };
                (v as u64, 4, DRIVER_FEATURE)
            }
            MSIX_CONFIG..=0x11 => (self.msix_config as u64, 2, MSIX_CONFIG),
            NUM_QUEUES..=0x13 => (self.queues.len() as u64, 2, NUM_QUEUES),
            DEVICE_STATUS => (self.status as u64, 1, DEVICE_STATUS),
            CONFIG_GENERATION => (0, 1, CONFIG_GENERATION),
            QUEUE_SELECT..=0x17 => (self.queue_select as u64, 2, QUEUE_SELECT),
            QUEUE_SIZE..=0x19 => (q.map_or(0, |q| q.size() as u64), 2, QUEUE_SIZE),
            QUEUE_MSIX_VECTOR..=0x1b => (
                self.vectors.get(qs).map_or(VIRTIO_MSI_NO_VECTOR, |v| *v) as u64,
                2,
                QUEUE_MSIX_VECTOR,
            ),
            QUEUE_ENABLE..=0x1d => (q.map_or(0, |q| q.ready() as u64), 2, QUEUE_ENABLE),
            QUEUE_NOTIFY_OFF..=0x1f => (self.notify_off(qs) as u64, 2, QUEUE_NOTIFY_OFF),
            QUEUE_DESC..=0x27 => (q.map_or(0, |q| q.desc_table()), 8, QUEUE_DESC),
            QUEUE_DRIVER..=0x2f => (q.map_or(0, |q| q.avail_ring()), 8, QUEUE_DRIVER),
            QUEUE_DEVICE..=0x37 => (q.map_or(0, |q| q.used_ring()), 8, QUEUE_DEVICE),
            _ => (0, 0, off),
        };
        read_le(value, width, (off - base) as usize, data);
    }

    fn common_write(&mut self, port: &mut NetPort, off: u64, data: &[u8]) {
        let mut v = 0u64;
        let qs = self.queue_select as usize;
        let live = self.status & STATUS_DRIVER_OK != 0;
        match off {
            DEVICE_FEATURE_SELECT => {
                write_le(&mut v, 0, data);
                self.device_feature_select = v as u32;
            }
            DRIVER_FEATURE_SELECT => {
                write_le(&mut v, 0, data);
                self.driver_feature_select = v as u32;
            }
            DRIVER_FEATURE if self.status & STATUS_FEATURES_OK == 0 => {
                write_le(&mut v, 0, data);
                let v = v & 0xffff_ffff;
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            MSIX_CONFIG => {
                write_le(&mut v, 0, data);
                self.msix_config = v as u16;
            }
            DEVICE_STATUS => {
                let s = data[0];
                if s == 0 {
                    self.reset(port);
                    return;
                }
                if self.status & !s & !STATUS_DEVICE_NEEDS_RESET != 0 {
                    // Bits go away only through a reset (virtio 1.0 2.1.2); a driver that
                    // clears DRIVER_OK and goes on reprogramming queues would have them changed
                    // under a running device.
                    self.status |= s;
                    let what = "the driver cleared a device status bit without a reset";
                    self.device_error(port, what);
                    return;
                }
                let newly = s & !self.status;
                if newly & STATUS_FEATURES_OK != 0
                    && (self.driver_features & !self.device_features != 0
                        || self.driver_features & VIRTIO_F_VERSION_1 == 0)
                {
                    // Features the device never offered: FEATURES_OK does not stick.
                    self.status = s & !STATUS_FEATURES_OK;
                    return;
                }
                self.status = s | (self.status & STATUS_DEVICE_NEEDS_RESET);
                if newly & STATUS_DRIVER_OK != 0
                    && self.status & STATUS_FEATURES_OK != 0
                    && self.status & STATUS_DEVICE_NEEDS_RESET == 0
                {
                    self.activate(port);
                }
            }
            QUEUE_SELECT => {
                write_le(&mut v, 0, data);
                self.queue_select = v as u16;
            }
            _ if qs >= self.queues.len() || live => {} // no such queue, or fields frozen
            QUEUE_SIZE => {
                write_le(&mut v, 0, data);
                // A size that is not a power of two (or too large) fails at DRIVER_OK.
                self.bad_size[qs] = self.queues[qs].try_set_size(v as u16).is_err();
            }
            QUEUE_MSIX_VECTOR => {
                write_le(&mut v, 0, data);
                let vec = v as u16;
                self.vectors[qs] = if vec < self.n_vectors || vec == VIRTIO_MSI_NO_VECTOR {
                    vec
                } else {
                    VIRTIO_MSI_NO_VECTOR
                };
            }
            QUEUE_ENABLE => self.queues[qs].set_ready(data[0] == 1),
            QUEUE_DESC..=0x37 => {
                let q = &mut self.queues[qs];
                let (base, cur) = match off {
                    QUEUE_DESC..=0x27 => (QUEUE_DESC, q.desc_table()),
                    QUEUE_DRIVER..=0x2f => (QUEUE_DRIVER, q.avail_ring()),
                    _ => (QUEUE_DEVICE, q.used_ring()),
                };
                let mut val = cur;
                write_le(&mut val, (off - base) as usize, data);
                let addr = GuestAddress(val);
                // virtio-queue's own setters log each refusal: a guest writing odd addresses
                // in a loop would write the host's log at its pace. Refused here through the
                // port's rate-limited log instead; the field keeps its value.
                let (set, what) = match base {
                    QUEUE_DESC => (q.try_set_desc_table_address(addr), "descriptor table"),
                    QUEUE_DRIVER => (q.try_set_avail_ring_address(addr), "driver area"),
                    _ => (q.try_set_used_ring_address(addr), "device area"),
                };
                if set.is_err() {
                    port.guest_error(format_args!(
                        "queue {qs}: {what} address {val:#x} breaks its alignment"
                    ));
                }
            }
            _ => {}
        }
    }

    /// The device-specific configuration (virtio 1.0, 5.1.4): `mac`, `status`,
    /// `max_virtqueue_pairs`, `mtu` (zero when VIRTIO_NET_F_MTU is not offered).
    fn device_cfg_read(&self, off: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.mac.0);
        let link = if self.link_up {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        };
        cfg[6..8].copy_from_slice(&link.to_le_bytes());
        cfg[8..10].copy_from_slice(&(self.pairs as u16).to_le_bytes()); // max_virtqueue_pairs
        cfg[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = cfg.get(off as usize + i).copied().unwrap_or(0);
        }
    }
}

/// One virtqueue as the driver set it up and as far as the device has walked it. Names as
/// in the common configuration (virtio 1.0, 4.1.4.3): `desc`, `driver` (available ring) and
/// `device` (used ring) are the three areas' guest addresses.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueSnapshot {
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
    /// The next available-ring entry the device will take.
    next_avail: u16,
    /// The next used-ring entry the device will fill (the used index it last published).
    next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX in force on the queue (set at DRIVER_OK).
    event_idx: bool,
    msix_vector: u16,
    /// The driver wrote a size the device cannot use: DRIVER_OK will fail.
    bad_size: bool,
}

/// What the driver can observe of the device beyond PCI config space. Host-side things are
/// not here: the backend and its header/offload capabilities (the restoring command line's;
/// the driver's features must be among what it offers), the interrupt counter, scratch lists.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VirtioNetState {
    device_feature_select: u32,
    /// What the saved device offered (for the error when the new backend offers less).
    device_features: u64,
    driver_feature_select: u32,
    driver_features: u64,
    device_status: u8,
    /// Always 0: the device config changes only in its two-byte status field, atomically.
    config_generation: u8,
    queue_select: u16,
    isr: u8,
    msix_config: u16,
    /// The address in config space (the driver may have set it through the control queue).
    mac: [u8; 6],
    /// The address the device was given, which a reset restores.
    configured_mac: [u8; 6],
    /// The link as config space's status field showed it.
    link_up: bool,
    /// The queues are live (DRIVER_OK accepted, no device error since).
    active: bool,
    /// Every queue, the control queue's slot last.
    queues: Vec<QueueSnapshot>,
    /// Queue pairs in use.
    curr_pairs: usize,
    rx_mode: RxMode,
    msix: State,
}

impl VirtioNet {
    /// In-flight chains: the device never keeps a chain it took from the available ring
    /// across a return to its caller, but for a TX batch out to be sent after its turn. TX
    /// puts a chain the backend refused back (`next_avail` steps back) and RX rewinds when a
    /// frame does not fit; the chains of a batch that is out are saved as still available
    /// (sent again after a restore, where their answer never comes: a frame may then go
    /// twice). So in a saved live device `next_avail == next_used`: every chain is either
    /// used or still available, and an available one is taken again after the restore.
    fn save_state(&self) -> State {
        let queues = (0..self.queues.len())
            .map(|i| {
                let mut q = self.queues[i].state();
                let out = self
                    .tx_runs
                    .get(i / 2)
                    .filter(|r| i % 2 == TX && r.out)
                    .map_or(0, |r| r.heads.len() + r.malformed.is_some() as usize);
                q.next_avail = q.next_avail.wrapping_sub(out as u16);
                QueueSnapshot {
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc_table,
                    driver: q.avail_ring,
                    device: q.used_ring,
                    next_avail: q.next_avail,
                    next_used: q.next_used,
                    event_idx: q.event_idx_enabled,
                    msix_vector: self.vectors[i],
                    bad_size: self.bad_size[i],
                }
            })
            .collect();
        crate::snapshot::to_state(&VirtioNetState {
            device_feature_select: self.device_feature_select,
            device_features: self.device_features,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            device_status: self.status,
            config_generation: 0,
            queue_select: self.queue_select,
            isr: self.isr,
            msix_config: self.msix_config,
            mac: self.mac.0,
            configured_mac: self.configured_mac.0,
            link_up: self.link_up,
            active: self.active,
            queues,
            curr_pairs: self.curr_pairs,
            rx_mode: self.rx_mode.clone(),
            msix: self.msix.save(),
        })
    }

    /// A queue from its saved state, checked as the driver's writes are (a power-of-two size
    /// within the maximum, aligned areas) and, for a live queue, as DRIVER_OK checks it (the
    /// areas in guest memory) plus the in-flight rule of [`VirtioNet::save_state`].
    fn restore_queue(
        &self,
        i: usize,
        s: &QueueSnapshot,
        live: bool,
        event_idx: bool,
    ) -> Result<Queue, String> {
        let q = Queue::try_from(QueueState {
            max_size: QUEUE_MAX,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc,
            avail_ring: s.driver,
            used_ring: s.device,
        })
        .map_err(|e| format!("queue {i}: {e} (size {})", s.size))?;
        let taken = s.next_avail.wrapping_sub(s.next_used);
        if taken > s.size {
            return Err(format!(
                "queue {i}: next_avail {} is {taken} entries past next_used {} in a queue of {}",
                s.next_avail, s.next_used, s.size
            ));
        }
        if s.msix_vector >= self.n_vectors && s.msix_vector != VIRTIO_MSI_NO_VECTOR {
            return Err(format!(
                "queue {i}: MSI-X vector {} out of range",
                s.msix_vector
            ));
        }
        if live && (i <= TX || s.ready) {
            if !in_memory(&q, &self.mem) || s.bad_size {
                return Err(format!(
                    "queue {i}: live, yet not ready or not inside guest memory"
                ));
            }
            if taken != 0 {
                return Err(format!(
                    "queue {i}: {taken} chains taken and not used in a live queue"
                ));
            }
            if s.event_idx != event_idx {
                return Err(format!(
                    "queue {i}: event index disagrees with the features"
                ));
            }
        }
        Ok(q)
    }

    fn restore_state(&mut self, port: &mut NetPort, state: &State) -> Result<(), RestoreError> {
        let err = |what: String| RestoreError(format!("virtio-net: {what}"));
        let s: VirtioNetState = crate::snapshot::from_state(state, "virtio-net")?;
        // What FEATURES_OK accepted must be offered here too (a backend without the
        // virtio-net header or its offloads cannot carry them on). Other bits the driver wrote
        // (before FEATURES_OK, which then did not stick, or after it: the live device keeps
        // them too) are restored as they were.
        let accepted = if s.device_status & STATUS_FEATURES_OK != 0 {
            s.driver_features & s.device_features
        } else {
            0
        };
        if accepted & !self.device_features != 0 {
            return Err(err(format!(
                "the driver accepted features {:#x} this device does not offer ({:#x}, was \
                 {:#x}): restore on a backend with the same virtio-net header and offloads, \
                 and with the same offload properties (csum=, host_tso4=, ...)",
                accepted & !self.device_features,
                self.device_features,
                s.device_features
            )));
        }
        if s.config_generation != 0 {
            return Err(err(format!(
                "config generation {} (this device's is always 0)",
                s.config_generation
            )));
        }
        let ok_needed = STATUS_DRIVER_OK | STATUS_FEATURES_OK;
        if s.active
            && (s.device_status & ok_needed != ok_needed
                || s.driver_features & VIRTIO_F_VERSION_1 == 0)
        {
            return Err(err(format!(
                "live queues with device status {:#04x} and features {:#x}",
                s.device_status, s.driver_features
            )));
        }
        if s.queues.len() != self.queues.len() {
            return Err(err(format!(
                "{} queues where the device has {}",
                s.queues.len(),
                self.queues.len()
            )));
        }
        let max_pairs = if accepted & self.device_features & VIRTIO_NET_F_MQ != 0 {
            self.pairs
        } else {
            1
        };
        if !(1..=max_pairs).contains(&s.curr_pairs) {
            return Err(err(format!(
                "{} queue pairs in use (1 to {max_pairs})",
                s.curr_pairs
            )));
        }
        s.rx_mode.check().map_err(err)?;
        let event_idx = s.driver_features & VIRTIO_F_RING_EVENT_IDX != 0;
        let queues = (0..s.queues.len())
            .map(|i| self.restore_queue(i, &s.queues[i], s.active, event_idx))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        self.msix
            .restore(&self.config, &s.msix)
            .map_err(|e| err(e.0))?;

        let configured = MacAddr(s.configured_mac);
        if configured != self.configured_mac {
            // The guest keeps the address it read (as it would on real hardware whose EEPROM
            // moved with it); the command line's is not what it knows.
            log::warn!(
                "virtio-net {}: the snapshot's MAC is {configured}; the guest keeps it",
                self.configured_mac
            );
            self.configured_mac = configured;
        }
        self.mac = MacAddr(s.mac);
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.status = s.device_status;
        self.queue_select = s.queue_select;
        self.isr = s.isr;
        self.msix_config = s.msix_config;
        self.link_up = s.link_up;
        self.curr_pairs = s.curr_pairs;
        self.rx_mode = s.rx_mode;
        for (i, (q, saved)) in queues.into_iter().zip(&s.queues).enumerate() {
            self.queues[i] = q;
            self.vectors[i] = saved.msix_vector;
            self.bad_size[i] = saved.bad_size;
        }

        // What the guest's writes had caused: kicks reach the I/O thread through ioeventfds
        // at the BAR where the guest put it, an unacknowledged INTx interrupt keeps its line
        // up, and live queues start as at DRIVER_OK. That last step kicks both directions:
        // chains made available before the snapshot (with or without their doorbell) go
        // out, and the backend is read again, with no doorbell from the guest.
        self.sync_ioevents(port);
        self.drive_intx();
        self.active = false;
        self.apply_pairs(port);
        if s.active {
            self.start_queues(port);
        }
        Ok(())
    }
}

impl NicModel for VirtioNet {
    fn save(&self) -> State {
        self.save_state()
    }

    fn restore(&mut self, port: &mut NetPort, state: &State) -> Result<(), RestoreError> {
        self.restore_state(port, state)
    }

    fn wants_vnet_hdr(&self) -> bool {
        true
    }
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn config_written(&mut self, port: &mut NetPort, _offset: usize, _len: usize) {
        self.msix.config_written(&self.config);
        self.sync_ioevents(port);
        // Interrupt Disable or MSI-X turned on takes a raised line down; turned off again,
        // a cause still in the ISR raises it.
        self.drive_intx();
    }

    fn bar_read(&mut self, _port: &mut NetPort, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (bar, offset) {
            (MSIX_BAR, o) if o < MSIX_PBA => self.msix.table_read(o - MSIX_TABLE, data),
            (MSIX_BAR, o) => self.msix.pba_read(o - MSIX_PBA, data),
            (VIRTIO_BAR, o) if o < COMMON_CFG + COMMON_CFG_LEN => self.common_read(o, data),
            (VIRTIO_BAR, ISR_CFG) => {
                data[0] = self.isr;
                self.isr = 0;
                self.intx.set(false);
                self.config.set_interrupt_status(false);
            }
            (VIRTIO_BAR, o) if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.device_cfg_read(o - DEVICE_CFG, data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, port: &mut NetPort, bar: usize, offset: u64, data: &[u8]) {
        match (bar, offset) {
            (MSIX_BAR, o) if o < MSIX_PBA => self.msix.table_write(o - MSIX_TABLE, data),
            (VIRTIO_BAR, o) if o < COMMON_CFG + COMMON_CFG_LEN => self.common_write(port, o, data),
            (VIRTIO_BAR, o) if (NOTIFY_CFG..NOTIFY_CFG + 0x1000).contains(&o) => {
                // A kick that did not go through an ioeventfd, or the control queue's.
                let off = ((o - NOTIFY_CFG) / NOTIFY_OFF_MULTIPLIER as u64) as usize;
                if off == 2 * self.pairs {
                    self.process_ctrl(port);
                } else if off % 2 == RX {
                    port.kick_rx_of(off / 2);
                } else {
                    port.kick_tx_of(off / 2);
                }
            }
            _ => {}
        }
    }

    fn transmit(&mut self, port: &mut NetPort) {
        self.start_tx(port);
    }

    fn tx_flown(&mut self, port: &mut NetPort, taken: usize) {
        self.tx_answer(port, taken);
    }

    fn rx_ready(&self) -> bool {
        self.active
    }

    /// The chains the driver made available on the pair's RX queue and the device has not
    /// taken (a frame takes one, or more with mergeable buffers).
    fn rx_room(&self, port: &NetPort, max: usize) -> usize {
        let q = &self.queues[2 * port.queue()];
        if port.queue() >= self.curr_pairs || !q.ready() {
            return max; // dropped
        }
        q.avail_idx(&self.mem, Ordering::Acquire)
            .map_or(1, |a| a.0.wrapping_sub(q.next_avail()) as usize)
            .min(max)
    }

    fn receive(&mut self, port: &mut NetPort, frame: &[u8]) -> Rx {
        self.receive_frame(port, frame)
    }

    fn rx_burst_done(&mut self, port: &mut NetPort) {
        self.signal_queue(port, 2 * port.queue());
    }

    fn link_changed(&mut self, _port: &mut NetPort, up: bool) {
        if up != self.link_up {
            self.link_up = up;
            if self.active {
                self.isr |= 2; // configuration change: the driver rereads the status
                self.interrupt(self.msix_config);
            }
        }
    }

    fn interrupts(&self) -> u64 {
        self.interrupts
    }

    /// The control queue's doorbell (its commands run as it rings).
    fn filter_register(&self, bar: usize, offset: u64) -> bool {
        bar == VIRTIO_BAR && offset >= NOTIFY_CFG
    }

    fn rx_filter(&self) -> RxFilter {
        self.rx_mode.to_filter(self.mac.0)
    }
}

/// A synthetic driver for tests, the fuzzer and the no-guest benchmark.
#[cfg(any(test, feature = "test-drivers"))]
pub mod driver;

/// How a walk of [`transmit_chains`] ended.
enum TxWalk {
    /// No batch is out: the chains went (or were put back for a full backend), or the budget
    /// ran out.
    Done,
    /// A batch (its heads in the [`TxBatch`]) went to be sent after the device's turn; a
    /// malformed chain ended it when `malformed` says so.
    Out { malformed: Option<&'static str> },
}

/// Sends the frames of the TX chains waiting in `q`, at most `budget` chains (counted down),
/// gathered [`TX_BATCH`] at a time and handed to the port together; each chain's buffers go
/// as they lie in guest memory and are returned to the driver (`used` set) only once the
/// backend has taken the frame. A batch the port takes to send after the device's turn
/// ([`NetPort::send_later`]) ends the walk: its answer goes on with it. Chains the backend had
/// no room for are put back; the port calls `transmit` again when it drains. A malformed chain
/// ends the walk with its error, after the frames before it went.
#[allow(clippy::too_many_arguments)]
fn transmit_chains<'m>(
    mem: &'m GuestRam,
    q: &mut Queue,
    port: &mut NetPort,
    vnet_hdr: bool,
    budget: &mut usize,
    used: &mut bool,
    iov: &mut Vec<IoSlice<'m>>,
    batch: &mut TxBatch,
) -> Result<TxWalk, &'static str> {
    while *budget > 0 {
        iov.clear();
        batch.ends.clear();
        batch.heads.clear();
        let mut malformed = None;
        while batch.heads.len() < TX_BATCH && *budget > 0 {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            *budget -= 1;
            let head = chain.head_index();
            let start = iov.len();
            if let Err(what) = gather_chain(mem, chain, vnet_hdr, iov, start) {
                iov.truncate(start);
                malformed = Some(what);
                break;
            }
            batch.heads.push(head);
            batch.ends.push(iov.len());
        }
        if batch.heads.is_empty() {
            return malformed.map_or(Ok(TxWalk::Done), Err);
        }
        // SAFETY: the pieces are guest memory (`gather_chain` checked them), which the
        // device's handle keeps mapped as long as the NIC lives.
        if unsafe { port.send_later(iov, &batch.ends) } {
            return Ok(TxWalk::Out { malformed });
        }
        let taken = port.send_batch(iov, &batch.ends);
        for &head in &batch.heads[..taken] {
            q.add_used(mem, head, 0)
                .map_err(|_| "TX used ring unwritable")?;
            *used = true;
        }
        if taken < batch.heads.len() {
            // Put the rest back (a malformed chain too: it is seen again, and reported, when
            // the walk gets that far); the port calls transmit() when the backend drains.
            let back = batch.heads.len() - taken + malformed.is_some() as usize;
            q.set_next_avail(q.next_avail().wrapping_sub(back as u16));
            return Ok(TxWalk::Done);
        }
        if let Some(what) = malformed {
            return Err(what);
        }
    }
    Ok(TxWalk::Done)
}

/// Appends one TX chain's frame to `iov` (its pieces from `start` on): the buffers as they
/// lie in guest memory, without the virtio-net header when the backend carries none.
fn gather_chain<'m>(
    mem: &'m GuestRam,
    chain: virtio_queue::DescriptorChain<&'m GuestRam>,
    vnet_hdr: bool,
    iov: &mut Vec<IoSlice<'m>>,
    start: usize,
) -> Result<(), &'static str> {
    // Header bytes still to leave out of the frame.
    let mut skip = if vnet_hdr { 0 } else { VNET_HDR_LEN };
    let mut total = 0usize;
    for (i, d) in chain.enumerate() {
        let len = chain_desc(i, d.len())?;
        total += len;
        if d.is_write_only() || total > MAX_FRAME || iov.len() - start == MAX_TX_PIECES {
            return Err("malformed TX descriptor chain");
        }
        let s = skip.min(len);
        skip -= s;
        // The header's bytes are left out, yet must be guest memory like the rest.
        let addr = d.addr().checked_add(s as u64);
        if !addr.is_some_and(|a| guest_iov::push(mem, a, len - s, iov))
            || (s > 0 && !guest_iov::is_memory(mem, d.addr(), s))
        {
            return Err("malformed TX descriptor chain");
        }
    }
    if total < VNET_HDR_LEN {
        return Err("malformed TX descriptor chain");
    }
    Ok(())
}

/// What a TX walk keeps between batches (for the allocations): each frame's end in the
/// pieces, and its chain's head.
#[derive(Default)]
struct TxBatch {
    ends: Vec<usize>,
    heads: Vec<u16>,
}

#[cfg(test)]
mod tests;
