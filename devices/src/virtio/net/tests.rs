//! Driver-like sequences against the virtio-net model with an in-memory backend: feature
//! negotiation, TX and RX with and without mergeable buffers, flow control, event-index
//! suppression, and hostile rings that must end in a device error, never a panic or a hang.

use super::*;
use crate::interrupt::RecordingIrqChip;
use crate::pci::PCI_COMMAND_MEMORY;
use net_backends::mem::{pair, MemPeer};
use net_backends::Capabilities;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 1 << 20;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const QSIZE: u16 = 16;
/// Ring and buffer areas in the test's guest memory.
const RING_BASE: [u64; 2] = [0x1_0000, 0x2_0000];
const BUF_BASE: [u64; 2] = [0x4_0000, 0x8_0000];

struct Driver {
    dev: VirtioNet,
    mem: GuestMemoryMmap,
    peer: MemPeer,
    chip: Arc<RecordingIrqChip>,
    next_desc: [u16; 2],
    avail_idx: [u16; 2],
    next_buf: [u64; 2],
}

fn desc_base(q: usize) -> u64 {
    RING_BASE[q]
}
fn avail_base(q: usize) -> u64 {
    RING_BASE[q] + 16 * QSIZE as u64
}
fn used_base(q: usize) -> u64 {
    (avail_base(q) + 6 + 2 * QSIZE as u64 + 4095) & !4095
}

impl Driver {
    fn new(caps: Capabilities) -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let chip = Arc::new(RecordingIrqChip::default());
        let (backend, peer) = pair(caps);
        let mut dev = VirtioNet::new(
            "52:54:00:12:34:56".parse().unwrap(),
            Box::new(backend),
            mem.clone(),
            chip.clone(),
            19,
            Arc::new(NoIoEvents),
        )
        .unwrap();
        dev.config_mut().set_bar_addr(VIRTIO_BAR, 0xc000_0000);
        dev.config_mut().set_bar_addr(MSIX_BAR, 0xc001_0000);
        dev.config_mut()
            .write(crate::pci::PCI_COMMAND, &PCI_COMMAND_MEMORY.to_le_bytes());
        dev.config_written(crate::pci::PCI_COMMAND, 2);
        Driver {
            dev,
            mem,
            peer,
            chip,
            next_desc: [0; 2],
            avail_idx: [0; 2],
            next_buf: BUF_BASE,
        }
    }

    fn w(&mut self, off: u64, v: u64, len: usize) {
        self.dev.bar_write(VIRTIO_BAR, off, &v.to_le_bytes()[..len]);
    }
    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(VIRTIO_BAR, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn status(&mut self) -> u8 {
        self.r(DEVICE_STATUS, 1) as u8
    }

    fn device_features(&mut self) -> u64 {
        self.w(DEVICE_FEATURE_SELECT, 0, 4);
        let lo = self.r(DEVICE_FEATURE, 4);
        self.w(DEVICE_FEATURE_SELECT, 1, 4);
        lo | self.r(DEVICE_FEATURE, 4) << 32
    }

    /// The Linux probe order: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
    fn negotiate(&mut self, features: u64) -> bool {
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

    fn setup_queue(&mut self, q: usize, size: u16) {
        self.w(QUEUE_SELECT, q as u64, 2);
        self.w(QUEUE_SIZE, size as u64, 2);
        self.w(QUEUE_DESC, desc_base(q), 8);
        self.w(QUEUE_DRIVER, avail_base(q), 8);
        self.w(QUEUE_DEVICE, used_base(q), 8);
        self.w(QUEUE_MSIX_VECTOR, q as u64 + 1, 2);
        self.w(QUEUE_ENABLE, 1, 2);
    }

    fn driver_ok(&mut self) {
        let s = self.status() | STATUS_DRIVER_OK;
        self.w(DEVICE_STATUS, s as u64, 1);
    }

    /// Full bring-up with `features`, both queues of QSIZE.
    fn start(caps: Capabilities, features: u64) -> Driver {
        let mut d = Driver::new(caps);
        assert!(d.negotiate(features));
        d.setup_queue(RX, QSIZE);
        d.setup_queue(TX, QSIZE);
        d.driver_ok();
        assert_eq!(d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        d
    }

    fn write_desc(&mut self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&b, GuestAddress(desc_base(q) + 16 * i as u64))
            .unwrap();
    }

    fn publish(&mut self, q: usize, head: u16) {
        let slot = self.avail_idx[q] % QSIZE;
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
    fn post(&mut self, q: usize, parts: &[&[u8]], writable: bool) -> u16 {
        let head = self.next_desc[q];
        for (k, p) in parts.iter().enumerate() {
            let i = self.next_desc[q];
            self.next_desc[q] = (i + 1) % QSIZE;
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

    fn used(&self, q: usize) -> Vec<(u32, u32)> {
        let u = used_base(q);
        let idx: u16 = self.mem.read_obj(GuestAddress(u + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let e = u + 4 + 8 * (i % QSIZE) as u64;
                (
                    self.mem.read_obj(GuestAddress(e)).unwrap(),
                    self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
                )
            })
            .collect()
    }

    fn desc_addr(&self, q: usize, i: u16) -> u64 {
        self.mem
            .read_obj(GuestAddress(desc_base(q) + 16 * i as u64))
            .unwrap()
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// INTx asserted (MSI-X is never enabled in these tests).
    fn irq(&self) -> bool {
        self.chip.level(19)
    }

    fn ack_irq(&mut self) -> u8 {
        self.r(ISR_CFG, 1) as u8
    }
}

const BASE: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS;
const PLAIN: Capabilities = Capabilities {
    vnet_hdr: false,
    offloads: Offloads {
        csum: false,
        tso4: false,
        tso6: false,
        tso_ecn: false,
        ufo: false,
    },
};
const VNET: Capabilities = Capabilities {
    vnet_hdr: true,
    offloads: Offloads::ALL,
};

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn features_follow_the_backend() {
    let mut d = Driver::new(PLAIN);
    let f = d.device_features();
    for want in [
        VIRTIO_F_VERSION_1,
        VIRTIO_F_RING_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(f & want, 0, "{want:#x} offered");
    }
    assert_eq!(
        f & (VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_GUEST_CSUM),
        0
    );
    let f = Driver::new(VNET).device_features();
    for want in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
    ] {
        assert_ne!(f & want, 0, "{want:#x} offered with a vnet header");
    }
    // Acking something never offered: FEATURES_OK does not stick.
    assert!(!d.negotiate(BASE | VIRTIO_NET_F_CSUM));
    assert!(d.negotiate(BASE));
    // MAC and link status in device config.
    let mut mac = [0u8; 6];
    d.dev.bar_read(VIRTIO_BAR, DEVICE_CFG, &mut mac);
    assert_eq!(mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert_eq!(d.r(DEVICE_CFG + 6, 2), VIRTIO_NET_S_LINK_UP as u64);
    assert_eq!(d.r(NUM_QUEUES, 2), 2);
    // Guest offloads reach the backend at DRIVER_OK.
    let mut d = Driver::start(
        VNET,
        BASE | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4,
    );
    let o = d.peer.rx_offloads().unwrap();
    assert!(o.csum && o.tso4 && !o.tso6);
    let _ = d.status();
}

#[test]
fn tx_single_and_chained_descriptors() {
    let mut d = Driver::start(PLAIN, BASE);
    let f1 = frame(60, 1);
    let mut one = vec![0u8; VNET_HDR_LEN];
    one.extend_from_slice(&f1);
    d.post(TX, &[&one], false);
    let f2 = frame(1514, 2);
    d.post(TX, &[&[0u8; VNET_HDR_LEN], &f2[..100], &f2[100..]], false);
    d.dev.handle(NetEvent::TxKick);
    assert_eq!(
        d.peer.take_sent(),
        vec![f1, f2],
        "headers stripped for a plain backend"
    );
    assert_eq!(d.used(TX), vec![(0, 0), (1, 0)]);
    assert!(d.irq(), "INTx raised");
    assert_eq!(d.ack_irq(), 1, "ISR queue bit, cleared by the read");
    assert!(!d.irq());
    assert_eq!(d.dev.stats.tx_frames, 2);

    // With a vnet backend the header travels with the frame.
    let mut d = Driver::start(VNET, BASE | VIRTIO_NET_F_CSUM);
    let mut h = VnetHdr {
        flags: net_backends::vnet::VIRTIO_NET_HDR_F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    }
    .to_bytes()
    .to_vec();
    h.extend_from_slice(&frame(80, 3));
    d.post(TX, &[&h], false);
    d.dev.handle(NetEvent::TxKick);
    assert_eq!(d.peer.take_sent(), vec![h]);
}

#[test]
fn tx_waits_when_the_backend_is_full() {
    let mut d = Driver::start(PLAIN, BASE);
    d.peer.set_blocked(true);
    let mut p = vec![0u8; VNET_HDR_LEN];
    p.extend_from_slice(&frame(64, 9));
    d.post(TX, &[&p], false);
    let want = d.dev.handle(NetEvent::TxKick);
    assert!(want.writable, "asks to hear when the backend can take more");
    assert!(d.used(TX).is_empty(), "the chain stays with the device");
    d.peer.set_blocked(false);
    d.dev.handle(NetEvent::Backend);
    assert_eq!(d.peer.take_sent().len(), 1);
    assert_eq!(d.used(TX).len(), 1);
}

#[test]
fn rx_one_buffer_per_frame_without_mrg_rxbuf() {
    let mut d = Driver::start(PLAIN, BASE);
    let h0 = d.post(RX, &[&[0u8; 1526]], true);
    d.post(RX, &[&[0u8; 1526]], true);
    let f = frame(100, 5);
    d.peer.inject(&f);
    d.dev.handle(NetEvent::Backend);
    assert_eq!(d.used(RX), vec![(h0 as u32, (VNET_HDR_LEN + 100) as u32)]);
    let got = d.read(d.desc_addr(RX, h0), VNET_HDR_LEN + 100);
    let hdr = VnetHdr::parse(&got).unwrap();
    assert_eq!(hdr.num_buffers, 1);
    assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
    assert!(d.irq());
}

#[test]
fn rx_spreads_over_mergeable_buffers() {
    let mut d = Driver::start(PLAIN, BASE | VIRTIO_NET_F_MRG_RXBUF);
    let heads: Vec<u16> = (0..6).map(|_| d.post(RX, &[&[0u8; 256]], true)).collect();
    let f = frame(1000, 7);
    d.peer.inject(&f);
    d.dev.handle(NetEvent::Backend);
    let used = d.used(RX);
    assert_eq!(used.len(), 4, "1012 bytes in 256-byte buffers");
    let mut all = vec![];
    for (i, &(id, len)) in used.iter().enumerate() {
        assert_eq!(id, heads[i] as u32);
        all.extend(d.read(d.desc_addr(RX, heads[i]), len as usize));
    }
    assert_eq!(VnetHdr::parse(&all).unwrap().num_buffers, 4);
    assert_eq!(&all[VNET_HDR_LEN..], &f[..]);
}

#[test]
fn rx_waits_for_buffers_and_drops_nothing() {
    let mut d = Driver::start(PLAIN, BASE | VIRTIO_NET_F_MRG_RXBUF);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(200 + i, i as u8)).collect();
    for f in &frames {
        d.peer.inject(f);
    }
    let want = d.dev.handle(NetEvent::Backend);
    assert!(!want.readable, "no buffers: stop watching the backend");
    assert!(d.used(RX).is_empty());
    assert_eq!(d.peer.pending(), 2, "the rest stays queued in the backend");
    for _ in 0..3 {
        d.post(RX, &[&[0u8; 2048]], true);
    }
    let want = d.dev.handle(NetEvent::RxKick);
    assert!(want.readable);
    let used = d.used(RX);
    assert_eq!(used.len(), 3);
    for (i, f) in frames.iter().enumerate() {
        let got = d.read(d.desc_addr(RX, used[i].0 as u16), used[i].1 as usize);
        assert_eq!(&got[VNET_HDR_LEN..], &f[..], "frame {i} in order");
    }
    assert_eq!(d.dev.stats.rx_dropped, 0);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut d = Driver::start(PLAIN, BASE | VIRTIO_F_RING_EVENT_IDX);
    // used_event (after the avail ring) = 1: interrupt only once used idx passes 1.
    let used_event = GuestAddress(avail_base(TX) + 4 + 2 * QSIZE as u64);
    d.mem.write_obj(1u16, used_event).unwrap();
    let mut p = vec![0u8; VNET_HDR_LEN];
    p.extend_from_slice(&frame(64, 1));
    d.post(TX, &[&p], false);
    d.dev.handle(NetEvent::TxKick);
    assert_eq!(d.used(TX).len(), 1);
    assert!(!d.irq(), "used idx 1 has not passed used_event 1");
    d.post(TX, &[&p], false);
    d.dev.handle(NetEvent::TxKick);
    assert!(d.irq(), "used idx 2 passed used_event 1");
    // The device publishes avail_event so the driver can suppress kicks too.
    let avail_event: u16 = d
        .mem
        .read_obj(GuestAddress(used_base(TX) + 4 + 8 * QSIZE as u64))
        .unwrap();
    assert_eq!(avail_event, 2);
}

fn needs_reset(d: &mut Driver) -> bool {
    d.status() & STATUS_DEVICE_NEEDS_RESET != 0
}

#[test]
fn hostile_rings_end_in_a_device_error() {
    // A descriptor chain that loops on itself: the walk is bounded.
    let mut d = Driver::start(PLAIN, BASE);
    d.write_desc(TX, 0, BUF_BASE[TX], 64, VRING_DESC_F_NEXT, 0);
    d.publish(TX, 0);
    d.dev.handle(NetEvent::TxKick);
    assert!(d.used(TX).len() <= 1);

    // A buffer outside guest memory.
    let mut d = Driver::start(PLAIN, BASE);
    d.write_desc(TX, 0, 1 << 40, 64, 0, 0);
    d.publish(TX, 0);
    d.dev.handle(NetEvent::TxKick);
    assert!(needs_reset(&mut d));
    assert!(d.peer.take_sent().is_empty());

    // A zero-length TX buffer (shorter than the header).
    let mut d = Driver::start(PLAIN, BASE);
    d.write_desc(TX, 0, BUF_BASE[TX], 0, 0, 0);
    d.publish(TX, 0);
    d.dev.handle(NetEvent::TxKick);
    assert!(needs_reset(&mut d));

    // An oversized TX chain (over 64 KiB + headers).
    let mut d = Driver::start(PLAIN, BASE);
    for i in 0..4 {
        let flags = if i < 3 { VRING_DESC_F_NEXT } else { 0 };
        d.write_desc(TX, i, BUF_BASE[TX], 0x8000, flags, i + 1);
    }
    d.publish(TX, 0);
    d.dev.handle(NetEvent::TxKick);
    assert!(needs_reset(&mut d));

    // A read-only RX buffer.
    let mut d = Driver::start(PLAIN, BASE);
    d.post(RX, &[&[0u8; 2048]], false);
    d.peer.inject(&frame(100, 0));
    d.dev.handle(NetEvent::Backend);
    assert!(needs_reset(&mut d));

    // Zero-length RX buffers: nothing can be delivered, nothing hangs.
    let mut d = Driver::start(PLAIN, BASE | VIRTIO_NET_F_MRG_RXBUF);
    for _ in 0..QSIZE {
        d.post(RX, &[&[]], true);
    }
    d.peer.inject(&frame(100, 0));
    let want = d.dev.handle(NetEvent::Backend);
    assert!(!want.readable);
    assert!(d.used(RX).is_empty());

    // The device recovers after a reset.
    let mut d2 = Driver::start(PLAIN, BASE);
    let mut p = vec![0u8; VNET_HDR_LEN];
    p.extend_from_slice(&frame(64, 1));
    d2.post(TX, &[&p], false);
    d2.dev.handle(NetEvent::TxKick);
    assert_eq!(d2.peer.take_sent().len(), 1);
}

#[test]
fn bad_queue_setup_is_refused_at_driver_ok() {
    // A queue size that is not a power of two.
    let mut d = Driver::new(PLAIN);
    assert!(d.negotiate(BASE));
    d.setup_queue(RX, 100);
    d.setup_queue(TX, QSIZE);
    d.driver_ok();
    assert!(needs_reset(&mut d));
    // Rings outside guest memory.
    let mut d = Driver::new(PLAIN);
    assert!(d.negotiate(BASE));
    d.setup_queue(RX, QSIZE);
    d.setup_queue(TX, QSIZE);
    d.w(QUEUE_SELECT, TX as u64, 2);
    d.w(QUEUE_DESC, 1 << 40, 8);
    d.driver_ok();
    assert!(needs_reset(&mut d));
    // Kicks after the error do nothing.
    d.dev.handle(NetEvent::TxKick);
    // A reset brings it back.
    d.w(DEVICE_STATUS, 0, 1);
    assert_eq!(d.status(), 0);
}
