//! Driver-like sequences against the virtio-net model with an in-memory backend: feature
//! negotiation, TX and RX with and without mergeable buffers, flow control, event-index
//! suppression, and hostile rings that must end in a device error, never a panic or a hang.

use super::driver::*;
use super::*;
use crate::net::NetEvent;
use crate::pci::PciDevice;
use net_backends::mem::{pair, MemPeer};
use net_backends::Capabilities;
use vm_memory::GuestAddress;

/// The synthetic driver and the test's end of the in-memory network.
struct Rig {
    d: Driver,
    peer: MemPeer,
}

impl std::ops::Deref for Rig {
    type Target = Driver;
    fn deref(&self) -> &Driver {
        &self.d
    }
}
impl std::ops::DerefMut for Rig {
    fn deref_mut(&mut self) -> &mut Driver {
        &mut self.d
    }
}

fn new_rig(caps: Capabilities) -> Rig {
    let (b, peer) = pair(caps);
    Rig {
        d: Driver::new(Box::new(b)),
        peer,
    }
}

fn started(caps: Capabilities, features: u64) -> Rig {
    let (b, peer) = pair(caps);
    Rig {
        d: Driver::start(Box::new(b), features),
        peer,
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
    let mut d = new_rig(PLAIN);
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
    let f = new_rig(VNET).device_features();
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
    let mut d = started(
        VNET,
        BASE | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4,
    );
    let o = d.peer.rx_offloads().unwrap();
    assert!(o.csum && o.tso4 && !o.tso6);
    let _ = d.status();
}

#[test]
fn tx_single_and_chained_descriptors() {
    let mut d = started(PLAIN, BASE);
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
    assert_eq!(d.dev.stats().tx_frames, 2);
    // Sent from the guest's buffers, header left out across pieces: no copy of ours.
    let ram = crate::test_util::host_range(&d.mem);
    assert_eq!(d.peer.take_sent_from(ram), 60 + 1514);
    d.post(TX, &[&[0u8; 4], &one[4..20], &one[20..]], false);
    d.dev.handle(NetEvent::TxKick);
    assert_eq!(
        d.peer.take_sent(),
        vec![frame(60, 1)],
        "header split over descriptors"
    );

    // With a vnet backend the header travels with the frame.
    let mut d = started(VNET, BASE | VIRTIO_NET_F_CSUM);
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

/// A header the device leaves out (the backend has none) must still be guest memory.
#[test]
fn tx_header_outside_guest_memory_is_a_device_error() {
    let mut d = started(PLAIN, BASE);
    let f = frame(60, 1);
    let head = d.post(TX, &[&[0u8; VNET_HDR_LEN], &f], false);
    // The header's descriptor now points past the end of RAM.
    let data = d.desc_addr(TX, head + 1);
    let flags = VRING_DESC_F_NEXT;
    d.write_desc(
        TX,
        head,
        MEM_SIZE as u64,
        VNET_HDR_LEN as u32,
        flags,
        head + 1,
    );
    d.write_desc(TX, head + 1, data, 60, 0, 0);
    d.dev.handle(NetEvent::TxKick);
    assert!(d.peer.take_sent().is_empty());
    assert!(needs_reset(&mut d));
}

#[test]
fn tx_waits_when_the_backend_is_full() {
    let mut d = started(PLAIN, BASE);
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
    let mut d = started(PLAIN, BASE);
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
    let mut d = started(PLAIN, BASE | VIRTIO_NET_F_MRG_RXBUF);
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
    let mut d = started(PLAIN, BASE | VIRTIO_NET_F_MRG_RXBUF);
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
    assert_eq!(d.dev.stats().rx_dropped, 0);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut d = started(PLAIN, BASE | VIRTIO_F_RING_EVENT_IDX);
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

fn needs_reset(d: &mut Rig) -> bool {
    d.status() & STATUS_DEVICE_NEEDS_RESET != 0
}

#[test]
fn hostile_rings_end_in_a_device_error() {
    // A descriptor chain that loops on itself: the walk is bounded.
    let mut d = started(PLAIN, BASE);
    d.write_desc(TX, 0, BUF_BASE[TX], 64, VRING_DESC_F_NEXT, 0);
    d.publish(TX, 0);
    d.dev.handle(NetEvent::TxKick);
    assert!(d.used(TX).len() <= 1);

    // A buffer outside guest memory.
    let mut d = started(PLAIN, BASE);
    d.write_desc(TX, 0, 1 << 40, 64, 0, 0);
    d.publish(TX, 0);
    d.dev.handle(NetEvent::TxKick);
    assert!(needs_reset(&mut d));
    assert!(d.peer.take_sent().is_empty());

    // A zero-length TX buffer (shorter than the header).
    let mut d = started(PLAIN, BASE);
    d.write_desc(TX, 0, BUF_BASE[TX], 0, 0, 0);
    d.publish(TX, 0);
    d.dev.handle(NetEvent::TxKick);
    assert!(needs_reset(&mut d));

    // An oversized TX chain (over 64 KiB + headers).
    let mut d = started(PLAIN, BASE);
    for i in 0..4 {
        let flags = if i < 3 { VRING_DESC_F_NEXT } else { 0 };
        d.write_desc(TX, i, BUF_BASE[TX], 0x8000, flags, i + 1);
    }
    d.publish(TX, 0);
    d.dev.handle(NetEvent::TxKick);
    assert!(needs_reset(&mut d));

    // A read-only RX buffer.
    let mut d = started(PLAIN, BASE);
    d.post(RX, &[&[0u8; 2048]], false);
    d.peer.inject(&frame(100, 0));
    d.dev.handle(NetEvent::Backend);
    assert!(needs_reset(&mut d));

    // Zero-length RX buffers: nothing can be delivered, nothing hangs.
    let mut d = started(PLAIN, BASE | VIRTIO_NET_F_MRG_RXBUF);
    for _ in 0..QSIZE {
        d.post(RX, &[&[]], true);
    }
    d.peer.inject(&frame(100, 0));
    let want = d.dev.handle(NetEvent::Backend);
    assert!(!want.readable);
    assert!(d.used(RX).is_empty());

    // The device recovers after a reset.
    let mut d2 = started(PLAIN, BASE);
    let mut p = vec![0u8; VNET_HDR_LEN];
    p.extend_from_slice(&frame(64, 1));
    d2.post(TX, &[&p], false);
    d2.dev.handle(NetEvent::TxKick);
    assert_eq!(d2.peer.take_sent().len(), 1);
}

#[test]
fn bad_queue_setup_is_refused_at_driver_ok() {
    // A queue size that is not a power of two.
    let mut d = new_rig(PLAIN);
    assert!(d.negotiate(BASE));
    d.setup_queue(RX, 100);
    d.setup_queue(TX, QSIZE);
    d.driver_ok();
    assert!(needs_reset(&mut d));
    // Rings outside guest memory.
    let mut d = new_rig(PLAIN);
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

#[test]
fn link_changes_reach_the_driver_as_a_config_interrupt() {
    let mut d = started(PLAIN, BASE);
    d.ack_irq();
    d.peer.set_link_up(false);
    d.dev.handle(NetEvent::Backend);
    assert!(d.irq());
    assert_eq!(d.ack_irq() & 2, 2, "configuration change");
    assert_eq!(d.r(DEVICE_CFG + 6, 2), 0, "link down in the status field");
    d.peer.set_link_up(true);
    d.dev.handle(NetEvent::Backend);
    assert_eq!(d.ack_irq() & 2, 2);
    assert_eq!(d.r(DEVICE_CFG + 6, 2), VIRTIO_NET_S_LINK_UP as u64);
}

/// Runs `f` against the device on another thread; fails the test when it does not return.
fn bounded(mut d: Rig, what: &str, f: impl FnOnce(&mut Rig) + Send + 'static) -> Rig {
    crate::test_util::finishes(what, move || {
        f(&mut d);
        d
    })
}

/// Found by nicvm-fuzz (virtio-net target), minimal case: a running device, the TX available
/// index written far ahead of the device's, a kick. The queue refused to hand out chains while
/// its notification check kept saying there was more: an endless loop in the I/O thread.
#[test]
fn avail_index_more_than_a_queue_ahead_is_a_device_error() {
    let d = started(PLAIN, BASE);
    let far: u16 = 0xc892;
    d.mem
        .write_obj(far, GuestAddress(avail_base(TX) + 2))
        .unwrap();
    let mut d = bounded(d, "TX kick", |d| {
        d.dev.handle(NetEvent::TxKick);
    });
    assert!(needs_reset(&mut d));
    assert!(d.peer.take_sent().is_empty());
}

/// Found by nicvm-fuzz: queues enabled without ring addresses (the available ring left at
/// address 0) pass the DRIVER_OK checks in a guest whose RAM starts at 0, but the queue then
/// refuses to walk them; a non-zero word at guest address 2 made the TX loop endless.
#[test]
fn queue_without_addresses_is_a_device_error() {
    let mut d = new_rig(PLAIN);
    assert!(d.negotiate(BASE));
    for q in [RX, TX] {
        d.w(QUEUE_SELECT, q as u64, 2);
        d.w(QUEUE_SIZE, QSIZE as u64, 2);
        d.w(QUEUE_ENABLE, 1, 2);
    }
    d.driver_ok();
    d.mem.write_obj(5u16, GuestAddress(2)).unwrap();
    let mut d = bounded(d, "TX kick", |d| {
        d.dev.handle(NetEvent::TxKick);
        d.dev.handle(NetEvent::RxKick);
    });
    assert!(needs_reset(&mut d));
}

/// A driver that clears DRIVER_OK without a reset and goes on reprogramming a queue would
/// change it under the running device: that is a device error (virtio 1.0 2.1.2), and the
/// device does not come back until it is reset.
#[test]
fn clearing_driver_ok_without_a_reset_is_a_device_error() {
    let mut d = started(PLAIN, BASE);
    let s = d.status() & !STATUS_DRIVER_OK;
    d.w(DEVICE_STATUS, s as u64, 1);
    assert!(needs_reset(&mut d));
    d.w(QUEUE_SELECT, TX as u64, 2);
    d.w(QUEUE_DRIVER, 0, 8);
    d.driver_ok();
    d.mem.write_obj(7u16, GuestAddress(2)).unwrap();
    let mut d = bounded(d, "TX kick", |d| {
        d.dev.handle(NetEvent::TxKick);
    });
    assert!(needs_reset(&mut d));
    // A reset brings it back.
    let mut d = Rig {
        d: {
            let mut drv = d.d;
            assert!(drv.negotiate(BASE));
            drv.setup_queue(RX, QSIZE);
            drv.setup_queue(TX, QSIZE);
            drv.driver_ok();
            drv
        },
        peer: d.peer,
    };
    assert!(!needs_reset(&mut d));
    d.post(TX, &[&[0u8; VNET_HDR_LEN], &[0xab; 60]], false);
    d.dev.handle(NetEvent::TxKick);
    assert_eq!(d.peer.take_sent().len(), 1);
}

/// Found by nicvm-fuzz (virtio-net target): an RX buffer address within a header's length of
/// 2^64 overflowed the address arithmetic (a panic with overflow checks, a wrapped write in
/// release). Now it is a device error.
#[test]
fn rx_buffer_at_the_top_of_the_address_space_is_a_device_error() {
    let mut d = started(PLAIN, BASE | VIRTIO_NET_F_MRG_RXBUF);
    d.post_at(RX, u64::MAX - 4, 1526, true);
    d.peer.inject(&[0x5a; 60]);
    let mut d = bounded(d, "RX", |d| {
        d.dev.handle(NetEvent::Backend);
    });
    assert!(needs_reset(&mut d));
}
