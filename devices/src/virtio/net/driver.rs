//! A synthetic virtio-net driver: the register and ring sequences Linux's virtio_net uses,
//! played against the model from the host. Device tests and the no-guest benchmark use it.

use super::*;
use crate::interrupt::{IntxLine, RecordingIrqChip};
use crate::net::{NetPort, Nic};
use crate::pci::PciDevice;
use crate::pci::PCI_COMMAND_MEMORY;
use net_backends::NetBackend;
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 1 << 20;
pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// The queue size the driver sets up unless told otherwise.
pub const QSIZE: u16 = 16;
/// The largest queue the ring areas below have room for.
pub const RING_ROOM: u16 = 128;
/// Ring and buffer areas in the test's guest memory.
pub const RING_BASE: [u64; 2] = [0x1_0000, 0x2_0000];
pub const BUF_BASE: [u64; 2] = [0x4_0000, 0x8_0000];
/// Queues the driver can set up: three pairs and the control queue.
pub const MAX_QUEUES: usize = 7;

pub struct Driver {
    pub dev: Nic<VirtioNet>,
    pub mem: GuestMemoryMmap,
    pub chip: Arc<RecordingIrqChip>,
    next_desc: [u16; MAX_QUEUES],
    avail_idx: [u16; MAX_QUEUES],
    next_buf: [u64; MAX_QUEUES],
    qsize: [u16; MAX_QUEUES],
}

/// Where queue `q`'s buffers go: 256 KiB each for the first pair, 32 KiB for the others.
pub fn buf_base(q: usize) -> u64 {
    match BUF_BASE.get(q) {
        Some(b) => *b,
        None => 0xc_0000 + (q as u64 - 2) * 0x8000,
    }
}

pub fn desc_base(q: usize) -> u64 {
    match RING_BASE.get(q) {
        Some(b) => *b,
        None => 0x3_0000 + (q as u64 - 2) * 0x2000,
    }
}
pub fn avail_base(q: usize) -> u64 {
    desc_base(q) + 16 * RING_ROOM as u64
}
pub fn used_base(q: usize) -> u64 {
    (avail_base(q) + 6 + 2 * RING_ROOM as u64 + 4095) & !4095
}

/// A device as the machine builds it, before firmware or the guest touched it: on `backend`,
/// `mem` and `chip`, its BARs not placed (what a restore starts from).
pub fn fresh_device(
    backend: Box<dyn NetBackend>,
    mem: &GuestMemoryMmap,
    chip: &Arc<RecordingIrqChip>,
    ioevents: Arc<dyn IoEventRegistry>,
) -> Nic<VirtioNet> {
    fresh_device_with(
        vec![backend],
        mem,
        chip,
        ioevents,
        VirtioNetOptions::default(),
    )
}

/// [`fresh_device`] with a queue pair per backend, built as `opts` says (its `queue_pairs`
/// are the backends').
pub fn fresh_device_with(
    backends: Vec<Box<dyn NetBackend>>,
    mem: &GuestMemoryMmap,
    chip: &Arc<RecordingIrqChip>,
    ioevents: Arc<dyn IoEventRegistry>,
    opts: VirtioNetOptions,
) -> Nic<VirtioNet> {
    let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
    let port = NetPort::with_queues(format!("virtio-net {mac}"), backends).unwrap();
    let opts = VirtioNetOptions {
        queue_pairs: port.queue_count(),
        ..opts
    };
    let model = VirtioNet::new(
        mac,
        port.capabilities(),
        mem.clone(),
        chip.clone(),
        IntxLine::new(chip.clone(), 19, 0),
        ioevents,
        opts,
    )
    .unwrap();
    Nic::new(model, port)
}

impl Driver {
    /// A device on `backend`, BARs placed and memory decoding on, not yet negotiated.
    pub fn new(backend: Box<dyn NetBackend>) -> Driver {
        Driver::new_mq(vec![backend], false)
    }

    /// A device with a queue pair per backend, VIRTIO_NET_F_MQ offered with `mq`.
    pub fn new_mq(backends: Vec<Box<dyn NetBackend>>, mq: bool) -> Driver {
        let opts = VirtioNetOptions {
            mq,
            ..Default::default()
        };
        Driver::new_in(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
            backends,
            opts,
        )
    }

    /// A device with a queue pair per backend, built as `opts` says, with `mem` (MEM_SIZE
    /// bytes from 0) as guest RAM.
    pub fn new_in(
        mem: GuestMemoryMmap,
        backends: Vec<Box<dyn NetBackend>>,
        opts: VirtioNetOptions,
    ) -> Driver {
        let chip = Arc::new(RecordingIrqChip::default());
        let mut dev = fresh_device_with(backends, &mem, &chip, Arc::new(NoIoEvents), opts);
        dev.config_mut().set_bar_addr(VIRTIO_BAR, 0xc000_0000);
        dev.config_mut().set_bar_addr(MSIX_BAR, 0xc001_0000);
        dev.config_mut()
            .write(crate::pci::PCI_COMMAND, &PCI_COMMAND_MEMORY.to_le_bytes());
        dev.config_written(crate::pci::PCI_COMMAND, 2);
        Driver {
            dev,
            mem,
            chip,
            next_desc: [0; MAX_QUEUES],
            avail_idx: [0; MAX_QUEUES],
            next_buf: std::array::from_fn(buf_base),
            qsize: [QSIZE; MAX_QUEUES],
        }
    }

    /// Lends the device out, to be shared with I/O worker threads ([`Nic::workers`]), and
    /// leaves in its place one on a backend nothing reaches. The rings stay the driver's to
    /// fill through guest memory ([`Driver::post_at`], [`Driver::used_idx`]).
    pub fn lend(&mut self) -> Nic<VirtioNet> {
        let (b, _) = net_backends::mem::pair(Default::default());
        let stand_in = fresh_device(Box::new(b), &self.mem, &self.chip, Arc::new(NoIoEvents));
        std::mem::replace(&mut self.dev, stand_in)
    }

    pub fn w(&mut self, off: u64, v: u64, len: usize) {
        self.dev.bar_write(VIRTIO_BAR, off, &v.to_le_bytes()[..len]);
    }
    pub fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(VIRTIO_BAR, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    pub fn status(&mut self) -> u8 {
        self.r(DEVICE_STATUS, 1) as u8
    }

    pub fn device_features(&mut self) -> u64 {
        self.w(DEVICE_FEATURE_SELECT, 0, 4);
        let lo = self.r(DEVICE_FEATURE, 4);
        self.w(DEVICE_FEATURE_SELECT, 1, 4);
        lo | self.r(DEVICE_FEATURE, 4) << 32
    }

    /// The Linux probe order: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.w(DEVICE_STATUS, 0, 1);
        self.w(DEVICE_STATUS, STATUS_ACKNOWLEDGE as u64, 1);
        self.w(
            DEVICE_STATUS,
            (STATUS_ACKNOWLEDGE | STATUS_DRIVER) as u64,
            1,
        );
        self.w(DRIVER_FEATURE_SELECT, 0, 4);
        self.w(DRIVER_FEATURE, features & 0xffff_ffff, 4);
        self.w(DRIVER_FEATURE_SELECT, 1, 4);
        self.w(DRIVER_FEATURE, features >> 32, 4);
        let s = (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK) as u64;
        self.w(DEVICE_STATUS, s, 1);
        self.status() & STATUS_FEATURES_OK != 0
    }

    /// Sets queue `q` up on fresh rings, as Linux does after a reset (it allocates new ones):
    /// the driver's indexes and the rings' start from zero. (Rings not used yet are left
    /// untouched: when guest pages are first touched moves the benchmark's RX figures; see
    /// docs/benchmarks.md.)
    pub fn setup_queue(&mut self, q: usize, size: u16) {
        assert!(size <= RING_ROOM, "no room for a queue of {size}");
        self.qsize[q] = size;
        if self.avail_idx[q] != 0 || self.next_desc[q] != 0 {
            self.next_desc[q] = 0;
            self.avail_idx[q] = 0;
            for at in [avail_base(q), used_base(q)] {
                self.mem.write_obj(0u32, GuestAddress(at)).unwrap();
            }
        }
        self.w(QUEUE_SELECT, q as u64, 2);
        self.w(QUEUE_SIZE, size as u64, 2);
        self.w(QUEUE_DESC, desc_base(q), 8);
        self.w(QUEUE_DRIVER, avail_base(q), 8);
        self.w(QUEUE_DEVICE, used_base(q), 8);
        self.w(QUEUE_MSIX_VECTOR, q as u64 + 1, 2);
        self.w(QUEUE_ENABLE, 1, 2);
    }

    /// MSI-X on as Linux's virtio_pci sets it up: vector 0 for configuration changes,
    /// `q + 1` for queue `q` (as [`Driver::setup_queue`] assigns them), each with its own
    /// message, unmasked. Before the queues are set up.
    pub fn enable_msix(&mut self) {
        let cap = self.msix_cap();
        let n = (self.dev.config().get16(cap + 2) & 0x7ff) as u64 + 1;
        for v in 0..n {
            let e = MSIX_TABLE + 16 * v;
            let w = |d: &mut Self, off: u64, val: u32| {
                d.dev.bar_write(MSIX_BAR, off, &val.to_le_bytes())
            };
            w(self, e, 0xfee0_0000 | (v as u32) << 12);
            w(self, e + 4, 0);
            w(self, e + 8, 0x4030 + v as u32);
            w(self, e + 12, 0);
        }
        let cap = self.msix_cap();
        let ctl = 0x8000u16;
        self.dev.config_mut().write(cap + 2, &ctl.to_le_bytes());
        self.dev.config_written(cap + 2, 2);
        self.w(MSIX_CONFIG, 0, 2);
    }

    /// Where the MSI-X capability is in config space.
    pub fn msix_cap(&self) -> usize {
        let c = self.dev.config();
        let mut at = c.get16(crate::pci::PCI_CAPABILITY_LIST) as usize & 0xff;
        while c.get16(at) & 0xff != crate::pci::PCI_CAP_ID_MSIX as u16 {
            at = (c.get16(at) >> 8) as usize;
        }
        at
    }

    /// Whether MSI-X vector `v` fired since the last look (reads its irqfd).
    pub fn msix_fired(&self, v: usize) -> bool {
        self.dev.msix.irqfd(v).unwrap().read().is_ok()
    }

    pub fn driver_ok(&mut self) {
        let s = self.status() | STATUS_DRIVER_OK;
        self.w(DEVICE_STATUS, s as u64, 1);
    }

    /// Full bring-up with `features`, both queues of QSIZE.
    pub fn start(backend: Box<dyn NetBackend>, features: u64) -> Driver {
        Driver::start_sized(backend, features, QSIZE)
    }

    /// Full bring-up with `features`, both queues of `size` entries.
    pub fn start_sized(backend: Box<dyn NetBackend>, features: u64, size: u16) -> Driver {
        let mut d = Driver::new(backend);
        assert!(d.negotiate(features));
        d.setup_queue(RX, size);
        d.setup_queue(TX, size);
        d.driver_ok();
        assert_eq!(d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        d
    }

    /// The size queue `q` was set up with.
    pub fn queue_size(&self, q: usize) -> u16 {
        self.qsize[q]
    }

    pub fn write_desc(&mut self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&b, GuestAddress(desc_base(q) + 16 * i as u64))
            .unwrap();
    }

    pub fn publish(&mut self, q: usize, head: u16) {
        let slot = self.avail_idx[q] % self.qsize[q];
        let a = avail_base(q);
        self.mem
            .write_obj(head, GuestAddress(a + 4 + 2 * slot as u64))
            .unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(a + 2))
            .unwrap();
    }

    /// Posts a chain of buffers (sizes), device-writable for RX. Returns the head.
    pub fn post(&mut self, q: usize, parts: &[&[u8]], writable: bool) -> u16 {
        let head = self.next_desc[q];
        for (k, p) in parts.iter().enumerate() {
            let i = self.next_desc[q];
            self.next_desc[q] = (i + 1) % self.qsize[q];
            let addr = self.next_buf[q];
            self.next_buf[q] += (p.len() as u64 + 64) & !63;
            self.mem.write_slice(p, GuestAddress(addr)).unwrap();
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if k + 1 < parts.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(q, i, addr, p.len() as u32, flags, self.next_desc[q]);
        }
        self.publish(q, head);
        head
    }

    pub fn used(&self, q: usize) -> Vec<(u32, u32)> {
        let u = used_base(q);
        let idx: u16 = self.mem.read_obj(GuestAddress(u + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let e = u + 4 + 8 * (i % self.qsize[q]) as u64;
                (
                    self.mem.read_obj(GuestAddress(e)).unwrap(),
                    self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
                )
            })
            .collect()
    }

    pub fn desc_addr(&self, q: usize, i: u16) -> u64 {
        self.mem
            .read_obj(GuestAddress(desc_base(q) + 16 * i as u64))
            .unwrap()
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// INTx asserted (MSI-X is never enabled in these tests).
    pub fn irq(&self) -> bool {
        self.chip.level(19)
    }

    pub fn ack_irq(&mut self) -> u8 {
        self.r(ISR_CFG, 1) as u8
    }

    /// Posts one single-descriptor chain over guest bytes already in place at `addr`.
    pub fn post_at(&mut self, q: usize, addr: u64, len: u32, writable: bool) -> u16 {
        let i = self.next_desc[q];
        self.next_desc[q] = (i + 1) % self.qsize[q];
        let flags = if writable { VRING_DESC_F_WRITE } else { 0 };
        self.write_desc(q, i, addr, len, flags, 0);
        self.publish(q, i);
        i
    }

    /// The driver's available index of queue `q` (entries it has made available so far).
    pub fn avail_idx(&self, q: usize) -> u16 {
        self.avail_idx[q]
    }

    /// Whether Linux's virtio_ring would notify queue `q` after moving its available index
    /// from `old` to where it is now, with VIRTIO_F_RING_EVENT_IDX: only when the index
    /// crossed the event index the device wrote after the used ring (vring_need_event).
    pub fn needs_kick(&self, q: usize, old: u16) -> bool {
        let event: u16 = self
            .mem
            .read_obj(GuestAddress(used_base(q) + 4 + 8 * self.qsize[q] as u64))
            .unwrap();
        let new = self.avail_idx[q];
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// Entries the device has put in the used ring so far (its index).
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(used_base(q) + 2)).unwrap()
    }

    /// Rings queue `q`'s doorbell at the notification offset the device gives it.
    pub fn notify(&mut self, q: usize) {
        self.w(QUEUE_SELECT, q as u64, 2);
        let off = self.r(QUEUE_NOTIFY_OFF, 2);
        self.w(NOTIFY_CFG + off * NOTIFY_OFF_MULTIPLIER as u64, q as u64, 2);
    }

    /// Sends one control command (class, command, data) on control queue `q` as Linux
    /// does (header, data, ack in three descriptors) and returns the ack, or None if the
    /// device did not use the chain.
    pub fn ctrl(&mut self, q: usize, class: u8, cmd: u8, data: &[u8]) -> Option<u8> {
        let before = self.used_idx(q);
        let ack_at = self.post_ctrl(q, class, cmd, data);
        self.notify(q);
        if self.used_idx(q) == before {
            return None;
        }
        Some(self.read(ack_at, 1)[0])
    }

    /// Puts one control command in control queue `q` without ringing its doorbell; returns
    /// where its ack goes.
    pub fn post_ctrl(&mut self, q: usize, class: u8, cmd: u8, data: &[u8]) -> u64 {
        let head = self.next_desc[q];
        let mut parts: Vec<(u64, u32, u16)> = vec![];
        for (p, writable) in [
            (&[class, cmd][..], false),
            (data, false),
            (&[0xee][..], true),
        ] {
            if p.is_empty() {
                continue;
            }
            let addr = self.next_buf[q];
            self.next_buf[q] = buf_base(q) + (self.next_buf[q] + 64 - buf_base(q)) % 0x4000;
            self.mem.write_slice(p, GuestAddress(addr)).unwrap();
            parts.push((
                addr,
                p.len() as u32,
                if writable { VRING_DESC_F_WRITE } else { 0 },
            ));
        }
        let n = parts.len();
        for (k, (addr, len, mut flags)) in parts.iter().copied().enumerate() {
            let i = self.next_desc[q];
            self.next_desc[q] = (i + 1) % self.qsize[q];
            if k + 1 < n {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(q, i, addr, len, flags, self.next_desc[q]);
        }
        self.publish(q, head);
        parts.last().unwrap().0
    }
}
