//! The Linux drivers' sequences against the model with an in-memory backend, for both
//! personalities, and hostile programming that must end in an error state, never a panic,
//! a hang or a read outside the frame.

use super::driver::*;
use super::rx::*;
use super::tx::*;
use super::*;
use crate::net::offload::{self, tests::peer_finishes, tests::tcp4_frame, tests::udp4_frame};
use crate::net::NetEvent;
use crate::pci::PciDevice;
use net_backends::mem::{pair, MemPeer};
use net_backends::vnet::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR_LEN};
use net_backends::{Capabilities, Offloads};
use vm_memory::{Bytes, GuestAddress};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn rig(cplus: bool) -> (Driver, MemPeer) {
    rig_with(cplus, Capabilities::default())
}

fn rig_with(cplus: bool, caps: Capabilities) -> (Driver, MemPeer) {
    let (b, peer) = pair(caps);
    (Driver::new(Box::new(b), cplus), peer)
}

fn cp_open() -> (Driver, MemPeer) {
    cp_open_with(Capabilities::default())
}

fn cp_open_with(caps: Capabilities) -> (Driver, MemPeer) {
    let (mut d, p) = rig_with(true, caps);
    assert_eq!(d.probe(), MAC);
    d.open_cp(CPCR_RXVLAN);
    (d, p)
}

fn too_open() -> (Driver, MemPeer) {
    let (mut d, p) = rig(false);
    assert_eq!(d.probe(), MAC);
    d.open_too(0);
    (d, p)
}

/// A frame from the network to `dst` with `len` bytes in all.
fn frame_to(dst: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed)
        .collect();
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&[0x52, 0x55, 10, 0, 2, 2]);
    f[12..14].copy_from_slice(&[0x08, 0x06]);
    f
}

fn checksums_ok(f: &[u8]) -> bool {
    let at = offload::parse(f).expect("parses");
    offload::ipv4_header_ok(f, &at) && offload::l4_checksum_ok(f, &at)
}

/// Found by nicvm-fuzz (rtl8139 and rtl8139-too targets), minimal case: TSD3 written while
/// the transmitter is off (CR.TE clear, as after reset), then any backend event. The I/O
/// thread looped forever putting the slot back. Now the slot waits for CR.TE and goes out
/// once the driver turns the transmitter on.
#[test]
fn slot_written_with_the_transmitter_off_waits_for_it() {
    for cplus in [true, false] {
        let (mut d, peer) = rig(cplus);
        d.w32(TSAD0 + 12, TOO_TX_BUFS as u32);
        d.mem
            .write_slice(&frame_to([0xff; 6], 60, 1), GuestAddress(TOO_TX_BUFS))
            .unwrap();
        d.w32(TSD0 + 12, 60);
        let mut d = crate::test_util::finishes("backend event with TE off", move || {
            d.dev.handle(NetEvent::Backend);
            d.dev.handle(NetEvent::TxKick);
            d
        });
        assert!(peer.take_sent().is_empty(), "nothing leaves with TE off");
        assert_eq!(
            d.r32(TSD0 + 12) & TSD_OWN,
            0,
            "the slot still belongs to the device"
        );
        d.w8(CR, CR_TE);
        d.dev.handle(NetEvent::TxKick);
        assert_eq!(peer.take_sent().len(), 1, "sent once TE is on");
        assert_ne!(d.r32(TSD0 + 12) & (TSD_OWN | TSD_TOK), 0);
    }
}

#[test]
fn personalities_identify_as_linux_expects() {
    let (mut cp, _p) = rig(true);
    assert_eq!(cp.dev.config().get16(0), REALTEK_VENDOR);
    assert_eq!(cp.dev.config().get16(2), RTL8139_DEVICE);
    assert_eq!(cp.dev.config().get32(8) & 0xff, REVISION_CPLUS as u32);
    assert_eq!(cp.r32(TCR) & TCR_HWVERID_MASK, HWVERID_8139CPLUS);
    assert_eq!(cp.probe(), MAC);
    // pci_set_mwi() in 8139cp's probe needs the cache line size to read back.
    cp.dev
        .config_mut()
        .write(crate::pci::PCI_CACHE_LINE_SIZE, &[16]);
    assert_eq!(
        cp.dev.config().get16(crate::pci::PCI_CACHE_LINE_SIZE) & 0xff,
        16
    );
    let (mut too, _p) = rig(false);
    assert_eq!(too.dev.config().get32(8) & 0xff, REVISION_NORMAL as u32);
    // 8139too's table: HW_REVID(1, 1, 1, 0, 1, 0, 0) is "RTL-8139C".
    assert_eq!(too.r32(TCR) & TCR_HWVERID_MASK, 0x7400_0000);
    assert_eq!(too.probe(), MAC);
    // The plain chip has no C+ registers.
    too.w16(CPCR, CPCR_TXON | CPCR_RXON);
    assert_eq!(too.r16(CPCR), 0);
    assert!(!too.dev.cplus_mode());
}

#[test]
fn mii_reports_link_and_reset_self_clears() {
    let (mut d, _p) = rig(true);
    let bmsr = d.r16(BMSR);
    assert_ne!(bmsr & BMSR_LINK, 0, "link up");
    assert_ne!(bmsr & BMSR_AN_COMPLETE, 0, "autonegotiation complete");
    assert_eq!(d.r8(MSR) & MSR_LINKB, 0, "MSR: link good");
    d.w16(BMCR, BMCR_RESET | 0x1000);
    assert_eq!(d.r16(BMCR) & BMCR_RESET, 0);
    assert_ne!(d.r16(ANLPAR), 0);
}

#[test]
fn link_loss_raises_linkchg_and_shows_in_bmsr() {
    let (mut d, peer) = too_open();
    d.w16(ISR, 0xffff);
    peer.set_link_up(false);
    d.pump();
    assert_ne!(d.r16(ISR) & INT_LINKCHG, 0);
    assert!(d.irq());
    assert_eq!(d.r16(BMSR) & BMSR_LINK, 0);
    assert_eq!(d.r8(MSR) & MSR_LINKB, MSR_LINKB);
    // 8139too looks at CSCR's link-change bit on LinkChg, then reads BMSR.
    assert_eq!(
        d.r16(CSCR) & (CSCR_LINK_CHANGE | CSCR_LINK_OK),
        CSCR_LINK_CHANGE
    );
    assert_eq!(d.r16(CSCR) & CSCR_LINK_CHANGE, 0, "cleared when read");
    d.w16(ISR, INT_LINKCHG);
    peer.set_link_up(true);
    d.pump();
    assert_ne!(d.r16(ISR) & INT_LINKCHG, 0);
    assert_ne!(d.r16(BMSR) & BMSR_LINK, 0);
    assert_eq!(
        d.r16(CSCR) & (CSCR_LINK_CHANGE | CSCR_LINK_OK),
        CSCR_LINK_CHANGE | CSCR_LINK_OK
    );
}

#[test]
fn config_registers_need_the_unlock() {
    let (mut d, _p) = rig(true);
    d.w8(CONFIG1, 0x21);
    assert_eq!(d.r8(CONFIG1), 0);
    d.w8(CR9346, 0xc0);
    d.w8(CONFIG1, 0x21);
    d.w8(CR9346, 0);
    assert_eq!(d.r8(CONFIG1), 0x21);
    // Auto-load brings the EEPROM's MAC back into IDR and returns to normal mode.
    d.w32(IDR0, 0);
    d.w8(CR9346, 0x40);
    assert_eq!(d.r8(CR9346) & 0xc0, 0);
    assert_eq!(d.r32(IDR0), u32::from_le_bytes([0x52, 0x54, 0, 0x12]));
}

// ---- C+ mode ------------------------------------------------------------------------------

#[test]
fn cp_transmits_fragments_with_checksum_offload() {
    let (mut d, peer) = cp_open();
    let mut f = tcp4_frame(600, false);
    // Garbage where the checksums go: the device computes them.
    f[24] = 0xde;
    f[50] = 0xad;
    d.cp_xmit(&[&f[..54], &f[54..300], &f[300..]], TX_IPCS | TX_TCPCS, 0);
    let sent = peer.take_sent();
    assert_eq!(sent.len(), 1);
    assert!(checksums_ok(&sent[0]));
    assert_eq!(sent[0][54..], f[54..]);
    let done = d.cp_tx_done();
    assert_eq!(done.len(), 3, "every descriptor handed back");
    assert!(
        done.iter().all(|s| s & (1 << 23 | 1 << 25) == 0),
        "no error bits"
    );
    assert_ne!(d.r16(ISR) & INT_TOK, 0);
    assert!(d.irq());
    d.w16(ISR, INT_TOK);
    assert!(!d.irq());
    assert_eq!(d.dev.stats().tx_frames, 1);
}

/// One 65 000-byte large send in three fragments, MSS 1448: the frame, and what reached the
/// peer.
fn cp_large_send_65000(d: &mut Driver, peer: &MemPeer) -> (Vec<u8>, Vec<Vec<u8>>) {
    let f = tcp4_frame(65_000 - 54, false);
    d.cp_xmit(
        &[&f[..54], &f[54..30_000], &f[30_000..]],
        TX_LGSEN | (1448 << TX_MSS_SHIFT),
        0,
    );
    (f, peer.take_sent())
}

#[test]
fn cp_large_send_segments_a_64k_frame() {
    let (mut d, peer) = cp_open();
    let mss = 1448;
    let (f, sent) = cp_large_send_65000(&mut d, &peer);
    assert_eq!(sent.len(), (65_000 - 54usize).div_ceil(mss as usize));
    let mut payload = vec![];
    for s in &sent {
        assert!(s.len() <= 14 + 20 + 20 + mss as usize);
        assert!(checksums_ok(s));
        payload.extend_from_slice(&s[54..]);
    }
    assert_eq!(payload, f[54..]);
    // MSS bits overlap the error summary bits; the status written back must not.
    assert!(d.cp_tx_done().iter().all(|s| s & (1 << 23) == 0));
}

/// Large sends cut with an MSS of 16 bytes (about 4 000 wire frames each): a TPPoll write
/// sends until [`TX_SENDS_PER_WALK`] frames went out, finishes the frame it is on, and leaves
/// the rest to the I/O thread's next turns.
#[test]
fn cp_large_sends_cut_small_leave_the_rest_to_the_io_thread() {
    let (mut d, peer) = cp_open();
    let mss = 16usize;
    let f = tcp4_frame(65_000 - 54, false);
    let segs = (65_000 - 54usize).div_ceil(mss);
    assert!(segs as u64 > crate::net::port::TX_SENDS_PER_WALK);
    for _ in 0..3 {
        d.cp_queue(
            &[&f[..54], &f[54..]],
            TX_LGSEN | (mss as u32) << TX_MSS_SHIFT,
            0,
        );
    }
    // The doorbell's walk sends the first frame and stops there; the I/O thread's turn that
    // the walk asked for sends the second one.
    d.w_only(TPPOLL, TPPOLL_NPQ as u32, 1);
    assert_eq!(d.cp_tx_done().len(), 2, "its two descriptors back");
    d.kicked();
    assert_eq!(peer.take_sent().len(), 2 * segs, "two frames, whole");
    assert_eq!(d.cp_tx_done().len(), 2);
    d.kicked();
    let last = peer.take_sent();
    assert_eq!(last.len(), segs);
    assert!(checksums_ok(&last[segs - 1]));
    assert_eq!(d.cp_tx_done().len(), 2);
    d.kicked();
    assert!(peer.take_sent().is_empty());
}

/// On a tap with a virtio-net header the header goes in front of the copied frame (or the
/// copied headers of a large send): one piece fewer for the tap.
#[test]
fn cp_frame_and_header_reach_the_tap_in_one_piece() {
    let (mut d, peer) = cp_open_with(Capabilities {
        vnet_hdr: true,
        offloads: Offloads::ALL,
    });
    let f = frame_to([0xff; 6], 1514, 9);
    d.cp_xmit(&[&f[..54], &f[54..]], 0, 0);
    assert_eq!(peer.take_sent()[0][VNET_HDR_LEN..], f[..]);
    assert_eq!(peer.last_frame_runs(), 1);
    // With a tag inserted into the copy.
    d.cp_xmit(&[&f[..1000], &f[1000..1510]], 0, TX_TAGC | 0x0560);
    let s = &peer.take_sent()[0][VNET_HDR_LEN..];
    assert_eq!(
        (&s[..12], &s[12..14], &s[16..]),
        (&f[..12], &[0x81, 0][..], &f[12..1510])
    );
    assert_eq!(peer.last_frame_runs(), 1);
    // The large send: header and copied headers, then the rest from guest memory, whose
    // fragments the test driver lays back to back.
    let (f, sent) = cp_large_send_65000(&mut d, &peer);
    assert_eq!(sent[0][VNET_HDR_LEN + 256..], f[256..]);
    assert_eq!(peer.last_frame_runs(), 2);
}

/// A tap with a virtio-net header takes the checksum and the large send whole, for the host
/// kernel to finish; a tag to insert keeps them in the model.
#[test]
fn cp_offloads_go_to_a_tap_with_a_vnet_header() {
    let (mut d, peer) = cp_open_with(Capabilities {
        vnet_hdr: true,
        offloads: Offloads::ALL,
    });
    let mss = 1448;
    let (f, sent) = cp_large_send_65000(&mut d, &peer);
    assert_eq!(sent.len(), 1, "one frame for the host kernel to segment");
    let (h, g) = peer_finishes(&sent[0]);
    assert_eq!(
        (h.flags, h.gso_type),
        (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4)
    );
    assert_eq!(
        (h.hdr_len, h.gso_size, h.csum_start, h.csum_offset),
        (54, mss as u16, 34, 16)
    );
    assert!(checksums_ok(&g));
    assert_eq!(g[54..], f[54..]);
    assert_eq!(d.cp_tx_done().len(), 3);

    let mut c = tcp4_frame(600, false);
    c[24] = 0xde;
    c[50] = 0xad;
    d.cp_xmit(&[&c[..54], &c[54..]], TX_IPCS | TX_TCPCS, 0);
    let (h, g) = peer_finishes(&peer.take_sent()[0]);
    assert_eq!((h.gso_type, h.csum_start, h.csum_offset), (0, 34, 16));
    assert!(
        checksums_ok(&g),
        "IP checksum by the model, TCP by the peer"
    );

    d.cp_xmit(&[&c], TX_IPCS | TX_TCPCS, TX_TAGC | 0x0560);
    let sent = peer.take_sent().remove(0);
    assert_eq!(
        sent[..VNET_HDR_LEN],
        [0; VNET_HDR_LEN],
        "tagged: done in the model"
    );
    let mut untagged = sent[VNET_HDR_LEN..].to_vec();
    untagged.drain(12..16);
    assert!(checksums_ok(&untagged));
}

/// A large frame leaves from the guest's buffers, its headers copied for the offloads; a
/// full-size frame goes through the outbox (copied there from guest memory), and one whose
/// offloads need all of it (a checksum with a tag to insert) is copied whole.
#[test]
fn cp_large_frames_leave_from_guest_memory() {
    let (mut d, peer) = cp_open_with(Capabilities {
        vnet_hdr: true,
        offloads: Offloads::ALL,
    });
    let from_guest = |d: &Driver| peer.take_sent_from(crate::test_util::host_range(&d.mem));
    let (f, sent) = cp_large_send_65000(&mut d, &peer);
    assert_eq!(sent[0][VNET_HDR_LEN + 256..], f[256..]);
    assert_eq!(from_guest(&d), 65_000 - 256);
    let mut c = tcp4_frame(3000 - 54, false);
    c[24] = 0xde;
    d.cp_xmit(&[&c[..54], &c[54..1000], &c[1000..]], TX_IPCS | TX_TCPCS, 0);
    let (h, g) = peer_finishes(&peer.take_sent()[0]);
    assert_eq!((h.gso_type, h.csum_start, h.csum_offset), (0, 34, 16));
    assert!(checksums_ok(&g));
    assert_eq!(g[256..], c[256..]);
    assert_eq!(from_guest(&d), 3000 - 256, "only the headers copied");
    d.cp_xmit(&[&c[..1514]], 0, 0);
    assert_eq!(peer.take_sent()[0][VNET_HDR_LEN..], c[..1514]);
    d.cp_xmit(&[&c], TX_IPCS | TX_TCPCS, TX_TAGC | 0x0560);
    assert_eq!(peer.take_sent()[0].len(), VNET_HDR_LEN + 3004);
    assert_eq!(from_guest(&d), 0);
    // A tag to insert and no offload: the tag goes in as a piece of its own.
    d.cp_xmit(&[&c], 0, TX_TAGC | 0x0560);
    let s = &peer.take_sent()[0][VNET_HDR_LEN..];
    assert_eq!(
        (&s[..12], &s[12..16], &s[16..]),
        (&c[..12], &[0x81, 0, 0x60, 0x05][..], &c[12..])
    );
    assert_eq!(from_guest(&d), 3000 - 256);
    assert_eq!(d.cp_tx_done().len(), 3 + 3 + 1 + 1 + 1);
}

/// A frame's descriptors go back to the driver once the frame is sent, not before: the guest
/// may reuse a buffer as soon as its descriptor is back, and the frame is read from it when
/// it is whole (a small one as a large one).
#[test]
fn cp_descriptors_come_back_once_their_frame_is_sent() {
    for len in [600, 5000] {
        cp_descriptors_come_back_once_sent(len);
    }
}

fn cp_descriptors_come_back_once_sent(len: usize) {
    let (mut d, peer) = cp_open();
    let mut f = tcp4_frame(len - 54, false);
    d.cp_queue(&[&f[..len / 2], &f[len / 2..]], 0, 0);
    // The driver has not handed over the last descriptor yet.
    let (opts1, opts2, addr) = d.read_desc(TX_RING, 1);
    d.write_desc(TX_RING, 1, opts1 & !DESC_OWN, opts2, addr);
    d.w8(TPPOLL, TPPOLL_NPQ);
    assert!(peer.take_sent().is_empty());
    assert!(
        d.cp_tx_done().is_empty(),
        "the first descriptor is still the device's"
    );
    // Still the device's: what its buffer holds when the frame is whole is what goes.
    let (_, _, first) = d.read_desc(TX_RING, 0);
    f[60] ^= 0xff;
    d.mem
        .write_slice(&f[60..61], GuestAddress(first + 60))
        .unwrap();
    d.write_desc(TX_RING, 1, opts1, opts2, addr);
    d.w8(TPPOLL, TPPOLL_NPQ);
    assert_eq!(peer.take_sent(), vec![f]);
    assert_eq!(d.cp_tx_done().len(), 2);
}

#[test]
fn cp_inserts_and_strips_vlan_tags() {
    let (mut d, peer) = cp_open();
    let f = frame_to([0xff; 6], 100, 1);
    // The driver stores the tag byte-swapped: VID 5, priority 3 = 0x6005 -> 0x0560.
    d.cp_xmit(&[&f], 0, TX_TAGC | 0x0560);
    let sent = peer.take_sent().remove(0);
    assert_eq!(sent[12..16], [0x81, 0x00, 0x60, 0x05]);
    assert_eq!(sent[16..], f[12..]);

    let mut tagged = frame_to(MAC, 80, 2);
    tagged.splice(12..12, [0x81, 0x00, 0x20, 0x07]);
    peer.inject(&tagged);
    d.pump();
    let got = d.cp_rx();
    assert_eq!(got.len(), 1);
    let (_, opts2, data) = &got[0];
    assert_eq!(*opts2, RX_TAVA | 0x0720);
    assert_eq!(data[..12], tagged[..12]);
    assert_eq!(data[12..], tagged[16..]);
}

#[test]
fn cp_receive_filters_and_reports() {
    let (mut d, peer) = cp_open();
    peer.inject(&frame_to(MAC, 42, 1)); // short: padded to 60
    peer.inject(&frame_to([0xff; 6], 300, 2));
    peer.inject(&frame_to([0x52, 0x54, 0, 0, 0, 1], 100, 3)); // not ours
    let group = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
    peer.inject(&frame_to(group, 100, 4)); // multicast, no hash bit yet
    d.pump();
    let got = d.cp_rx();
    assert_eq!(got.len(), 2);
    let (st, _, data) = &got[0];
    assert_eq!(st & (DESC_FS | DESC_LS), DESC_FS | DESC_LS);
    assert_ne!(st & RX_PAM, 0);
    assert_eq!(data.len(), 60, "padded to the minimum frame");
    assert_eq!(data[..42], frame_to(MAC, 42, 1)[..]);
    // The CRC after the data is the frame's.
    let crc: u32 = d.mem.read_obj(GuestAddress(RX_BUFS + 60)).unwrap();
    assert_eq!(crc, crc32fast::hash(data));
    assert_ne!(got[1].0 & RX_BAR, 0);
    assert_eq!(got[1].2, frame_to([0xff; 6], 300, 2));
    assert_eq!(d.dev.stats().rx_dropped, 2);

    // Join the group the way __cp_set_rx_mode does; then promiscuous.
    let bit = multicast_hash_bit(&group);
    let mut mar = [0u32; 2];
    mar[bit >> 5] |= 1 << (bit & 31);
    let rcr = d.r32(RCR);
    d.w32(RCR, rcr | RCR_AM);
    d.w32(MAR0, mar[0]);
    d.w32(MAR0 + 4, mar[1]);
    peer.inject(&frame_to(group, 100, 4));
    peer.inject(&frame_to([0x01, 0, 0x5e, 0, 0, 0x42], 100, 5)); // other group, other bit
    d.pump();
    let got = d.cp_rx();
    assert_eq!(got.len(), 1);
    assert_ne!(got[0].0 & RX_MAR, 0);
    let rcr = d.r32(RCR);
    d.w32(RCR, rcr | RCR_AAP);
    peer.inject(&frame_to([0x52, 0x54, 0, 0, 0, 1], 100, 3));
    d.pump();
    assert_eq!(
        d.cp_rx().len(),
        1,
        "promiscuous mode takes another station's frame"
    );
}

#[test]
fn multicast_hash_matches_linux() {
    // Linux: ether_crc(len, p) = bitrev32(crc32_le(~0, p, len)), i.e. the bit-reversed
    // complement of zlib's CRC-32. Python's zlib gave these for two well-known groups.
    assert_eq!(
        multicast_hash_bit(&[0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]),
        0x1f
    );
    assert_eq!(
        multicast_hash_bit(&[0x33, 0x33, 0x00, 0x00, 0x00, 0x01]),
        0x3e
    );
}

#[test]
fn cp_receive_checksum_status() {
    let (mut d, peer) = cp_open();
    let mut good = tcp4_frame(200, false);
    good[..6].copy_from_slice(&MAC);
    let at = offload::parse(&good).unwrap();
    offload::fill_ipv4_checksum(&mut good, &at);
    offload::fill_l4_checksum(&mut good, &at);
    let mut bad = good.clone();
    bad[100] ^= 0xff;
    peer.inject(&good);
    peer.inject(&bad);
    d.pump();
    let got = d.cp_rx();
    assert_eq!(got[0].0 & (3 << 16 | RX_TCPF | RX_IPF), RX_PID_TCP);
    assert_eq!(got[1].0 & (3 << 16 | RX_TCPF), RX_PID_TCP | RX_TCPF);
}

/// UDP: a good datagram passes, a corrupted one is flagged, and one sent without a checksum
/// (zero) passes whatever its bytes, full-size or short.
#[test]
fn cp_receive_udp_checksum_status() {
    let (mut d, peer) = cp_open();
    let mut frames = vec![];
    for payload in [1472, 300] {
        let good = udp4_frame(MAC, payload);
        let mut bad = good.clone();
        bad[200] ^= 1;
        let mut unchecked = bad.clone();
        unchecked[40..42].copy_from_slice(&[0, 0]);
        frames.extend([good, bad, unchecked]);
    }
    for f in &frames {
        peer.inject(f);
    }
    d.pump();
    let got = d.cp_rx();
    assert_eq!(got.len(), frames.len());
    let status: Vec<u32> = got
        .iter()
        .map(|g| g.0 & (3 << 16 | RX_UDPF | RX_IPF))
        .collect();
    let (ok, failed) = (RX_PID_UDP, RX_PID_UDP | RX_UDPF);
    assert_eq!(status, [ok, failed, ok, ok, failed, ok]);
}

/// Full-size frames, whose transport sum is taken in the CRC's pass (on CPUs with the wide
/// kernel): a byte flipped anywhere in the segment, or two bytes swapped, is reported; the
/// CRC after a good frame is its own.
#[test]
fn cp_full_size_checksums_are_verified_in_the_crc_pass() {
    let (mut d, peer) = cp_open();
    for payload in [1460, 1459, 700] {
        let mut good = tcp4_frame(payload, false);
        good[..6].copy_from_slice(&MAC);
        let at = offload::parse(&good).unwrap();
        offload::fill_ipv4_checksum(&mut good, &at);
        offload::fill_l4_checksum(&mut good, &at);
        let mut frames = vec![good.clone()];
        for i in [40, 54, 700, good.len() - 1] {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            frames.push(bad);
        }
        let mut swapped = good.clone();
        swapped.swap(100, 101);
        frames.push(swapped);
        for f in &frames {
            peer.inject(f);
        }
        d.pump();
        let got = d.cp_rx();
        assert_eq!(got.len(), frames.len());
        assert_eq!(got[0].0 & (3 << 16 | RX_TCPF | RX_IPF), RX_PID_TCP);
        if payload == 1460 {
            // The first frame went to the first buffer; its CRC follows it.
            let crc: u32 = d
                .mem
                .read_obj(GuestAddress(RX_BUFS + good.len() as u64))
                .unwrap();
            assert_eq!(crc, crc32fast::hash(&good));
        }
        for (i, g) in got.iter().enumerate().skip(1) {
            assert_eq!(g.0 & RX_TCPF, RX_TCPF, "{payload}: frame {i}");
            assert_eq!(g.2, frames[i]);
        }
    }
}

#[test]
fn cp_full_ring_stalls_then_resumes_without_loss() {
    let (mut d, peer) = cp_open();
    for i in 0..(CP_RING as usize + 10) {
        peer.inject(&frame_to(MAC, 100, i as u8));
    }
    let interest = d.pump();
    assert!(!interest.readable, "no reading while the ring is full");
    assert_ne!(d.r16(ISR) & INT_RXOVW_RDU, 0, "RDU raised");
    assert_eq!(
        peer.pending(),
        9,
        "one frame waits in the model, the rest in the backend"
    );
    let first = d.cp_rx();
    assert_eq!(first.len(), CP_RING as usize);
    // The poll's IMR write told the device; the I/O thread's kick brings the rest.
    let interest = d.kicked();
    assert!(interest.readable);
    let rest = d.cp_rx();
    assert_eq!(rest.len(), 10);
    for (i, (_, _, data)) in first.iter().chain(&rest).enumerate() {
        assert_eq!(*data, frame_to(MAC, 100, i as u8), "frame {i} in order");
    }
}

#[test]
fn cp_stalled_receiver_polls_without_a_hint() {
    let (mut d, peer) = cp_open();
    for i in 0..(CP_RING as usize + 1) {
        peer.inject(&frame_to(MAC, 64, i as u8));
    }
    d.pump();
    assert!(d.dev.rx_waiting(), "the 65th frame waits for a descriptor");
    // A driver that refills without touching any register.
    for i in 0..CP_RING {
        let eor = if i == CP_RING - 1 { DESC_EOR } else { 0 };
        let (_, _, addr) = d.read_desc(RX_RING, i);
        let mut desc = [0u8; 16];
        desc[..4].copy_from_slice(&(DESC_OWN | eor | RX_BUF_SZ).to_le_bytes());
        desc[8..].copy_from_slice(&addr.to_le_bytes());
        d.mem
            .write_slice(&desc, GuestAddress(RX_RING + i as u64 * 16))
            .unwrap();
    }
    // The poll timer (1 ms) fires without any register access, and the retry it asks for
    // delivers the waiting frame.
    let mut p = libc::pollfd {
        fd: d.dev.timer.fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    assert_eq!(
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, 1000) },
        1,
        "the poll timer fires"
    );
    d.dev.handle(NetEvent::Timer);
    d.dev.run_kicks();
    assert!(!d.dev.rx_waiting());
    let (st, _, _) = d.read_desc(RX_RING, 0);
    assert_eq!(
        st & DESC_OWN,
        0,
        "the timer retry delivered the waiting frame"
    );
}

#[test]
fn cp_tally_dump() {
    let (mut d, peer) = cp_open();
    d.cp_xmit(&[&frame_to([0xff; 6], 60, 0)], 0, 0);
    peer.inject(&frame_to([0xff; 6], 60, 0));
    d.pump();
    d.w32(DTCCR + 4, 0);
    d.w32(DTCCR, 0x3_0000 | DTCCR_CMD);
    assert_eq!(d.r32(DTCCR) & DTCCR_CMD, 0, "command bit clears when done");
    let mut t = [0u8; 64];
    d.mem.read_slice(&mut t, GuestAddress(0x3_0000)).unwrap();
    assert_eq!(u64::from_le_bytes(t[0..8].try_into().unwrap()), 1, "TxOk");
    assert_eq!(u64::from_le_bytes(t[8..16].try_into().unwrap()), 1, "RxOk");
    assert_eq!(
        u64::from_le_bytes(t[48..56].try_into().unwrap()),
        1,
        "RxOkBrd"
    );
}

#[test]
fn cp_backend_backpressure_keeps_order() {
    let (mut d, peer) = cp_open();
    peer.set_blocked(true);
    for i in 0..3u8 {
        d.cp_xmit(&[&frame_to([0xff; 6], 100, i)], 0, 0);
    }
    assert!(peer.take_sent().is_empty());
    let interest = d.kicked();
    assert!(interest.writable, "the I/O thread waits for the backend");
    peer.set_blocked(false);
    let interest = d.pump();
    assert!(!interest.writable);
    let sent = peer.take_sent();
    assert_eq!(sent.len(), 3);
    for (i, s) in sent.iter().enumerate() {
        assert_eq!(*s, frame_to([0xff; 6], 100, i as u8));
    }
    assert_eq!(d.cp_tx_done().len(), 3);
}

/// Frames with a tag to insert that wait for a full backend go out once each, tagged.
#[test]
fn cp_tagged_frames_wait_for_the_backend_whole() {
    let (mut d, peer) = cp_open();
    peer.set_blocked(true);
    let small = frame_to([0xff; 6], 100, 1);
    let large = frame_to([0xff; 6], 3000, 2);
    d.cp_xmit(&[&small], 0, TX_TAGC | 0x0560);
    d.cp_xmit(&[&large[..1000], &large[1000..]], 0, TX_TAGC | 0x0560);
    assert!(peer.take_sent().is_empty());
    peer.set_blocked(false);
    d.pump();
    let tagged = |f: &[u8]| [&f[..12], &[0x81, 0x00, 0x60, 0x05], &f[12..]].concat();
    assert_eq!(peer.take_sent(), vec![tagged(&small), tagged(&large)]);
    d.kicked();
    assert!(peer.take_sent().is_empty());
    assert_eq!(d.cp_tx_done().len(), 3);
}

// ---- normal mode --------------------------------------------------------------------------

#[test]
fn too_transmits_round_robin() {
    let (mut d, peer) = too_open();
    for i in 0..6u8 {
        let slot = d.too_xmit(&frame_to([0xff; 6], 50 + i as usize, i));
        let tsd = d.r32(TSD0 + 4 * slot);
        assert_eq!(
            tsd & (TSD_OWN | TSD_TOK),
            TSD_OWN | TSD_TOK,
            "slot {slot} done"
        );
    }
    assert_eq!(d.r16(TSAD) >> 12, 0xf, "TSAD: all four TOK");
    let sent = peer.take_sent();
    assert_eq!(sent.len(), 6);
    assert_eq!(sent[0].len(), 60, "the driver's padding is sent as is");
    assert_eq!(sent[5][..55], frame_to([0xff; 6], 55, 5)[..]);
    assert_ne!(d.r16(ISR) & INT_TOK, 0);
    assert!(d.irq());
}

/// On a tap with a virtio-net header the port's empty header goes in front of the slot's
/// copy: header and frame reach the tap as one piece.
#[test]
fn too_frame_and_header_reach_the_tap_in_one_piece() {
    let (mut d, peer) = rig_with(
        false,
        Capabilities {
            vnet_hdr: true,
            offloads: Offloads::ALL,
        },
    );
    d.probe();
    d.open_too(0);
    let f = frame_to([0xff; 6], 1514, 3);
    d.too_xmit(&f);
    let sent = peer.take_sent();
    assert_eq!(sent[0][..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
    assert_eq!(sent[0][VNET_HDR_LEN..], f[..]);
    assert_eq!(peer.last_frame_runs(), 1);
}

#[test]
fn too_receives_through_the_ring() {
    let (mut d, peer) = too_open();
    assert_ne!(d.r8(CR) & CR_BUFE, 0, "empty ring");
    peer.inject(&frame_to(MAC, 42, 9));
    peer.inject(&frame_to([0xff; 6], 1514, 3));
    d.pump();
    assert!(d.irq());
    let got = d.too_rx();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, RSR_ROK | RSR_PAM);
    assert_eq!(got[0].1.len(), 60);
    assert_eq!(got[1].0, RSR_ROK | RSR_BAR);
    assert_eq!(got[1].1, frame_to([0xff; 6], 1514, 3));
    assert_ne!(d.r8(CR) & CR_BUFE, 0);
}

#[test]
fn too_rok_stays_set_while_frames_remain() {
    // 8139too acks ROK after each frame and polls again only while a receive cause is
    // pending: a poll that stops on its budget must still find one.
    let (mut d, peer) = too_open();
    for i in 0..3 {
        peer.inject(&frame_to(MAC, 60, i));
    }
    d.pump();
    d.w16(ISR, 0x51); // rtl8139_isr_ack(), with three frames still unread
    assert_ne!(d.r16(ISR) & INT_ROK, 0);
    assert_eq!(d.too_rx().len(), 3);
    d.w16(ISR, 0x51);
    assert_eq!(d.r16(ISR) & INT_ROK, 0, "an empty ring clears it");
}

#[test]
fn too_ring_wraps_and_applies_backpressure() {
    for wrap in [false, true] {
        let (mut d, peer) = rig(false);
        d.probe();
        // 8 KiB ring; with WRAP the frame runs on into the slack, without it wraps.
        d.open_too(if wrap { 0 } else { 0x8000_0000 });
        let n = 40; // 40 x 1000 bytes: five times round the 8 KiB ring
        for i in 0..n {
            peer.inject(&frame_to(MAC, 1000, i as u8));
        }
        let mut got = vec![];
        for _ in 0..100 {
            d.kicked();
            d.pump();
            got.extend(d.too_rx());
            if got.len() == n {
                break;
            }
        }
        assert_eq!(got.len(), n, "wrap={wrap}");
        for (i, (st, data)) in got.iter().enumerate() {
            assert_eq!(*st, RSR_ROK | RSR_PAM);
            assert_eq!(
                *data,
                frame_to(MAC, 1000, i as u8),
                "frame {i}, wrap={wrap}"
            );
        }
    }
}

#[test]
fn too_waits_for_capr_when_the_ring_is_full() {
    let (mut d, peer) = too_open();
    for i in 0..40 {
        peer.inject(&frame_to(MAC, 1514, i as u8));
    }
    let interest = d.pump();
    assert!(
        !interest.readable,
        "32 KiB hold 21 frames of 1514; the rest wait"
    );
    assert!(peer.pending() > 0);
    let first = d.too_rx();
    assert_eq!(first.len(), 21);
    d.kicked();
    let rest = d.too_rx();
    assert_eq!(first.len() + rest.len(), 40);
    assert_eq!(rest.last().unwrap().1, frame_to(MAC, 1514, 39));
}

#[test]
fn interrupt_mask_status_and_intx_disable() {
    let (mut d, peer) = too_open();
    peer.inject(&frame_to(MAC, 60, 0));
    d.pump();
    assert!(d.irq());
    d.w16(IMR, 0);
    assert!(!d.irq(), "masked");
    d.w16(IMR, TOO_INTR_MASK);
    assert!(d.irq());
    let cmd = d.dev.config().command() | crate::pci::PCI_COMMAND_INTX_DISABLE;
    d.dev
        .config_mut()
        .write(crate::pci::PCI_COMMAND, &cmd.to_le_bytes());
    d.dev.config_written(crate::pci::PCI_COMMAND, 2);
    assert!(!d.irq(), "INTx disabled in PCI command");
    assert_ne!(
        d.dev.config().get16(crate::pci::PCI_STATUS) & 8,
        0,
        "still pending"
    );
    d.too_rx();
    d.w16(ISR, INT_ROK);
    assert_eq!(d.r16(ISR) & INT_ROK, 0, "write 1 to clear");
}

#[test]
fn timer_interrupt_fires_at_timerint() {
    let (mut d, _p) = too_open();
    d.w32(TCTR, 0);
    let t0 = d.r32(TCTR);
    std::thread::sleep(Duration::from_millis(2));
    assert!(d.r32(TCTR) > t0, "TCTR counts");
    d.w32(TIMER_INT, 33_000); // 1 ms
    d.w32(TCTR, 0);
    std::thread::sleep(Duration::from_millis(3));
    d.dev.handle(NetEvent::Timer);
    assert_ne!(d.r16(ISR) & INT_TIMEOUT, 0);
    assert!(d.irq());
}

/// TimerInt below what TCTR has counted already matches when TCTR next comes round to it,
/// a period (about 130 s) on: not at once, and not once for every period since the epoch (a
/// guest writing it over and over after a long uptime kept the I/O thread busy).
#[test]
fn a_timerint_tctr_has_passed_waits_for_the_next_round() {
    let (mut d, _p) = too_open();
    d.w32(TCTR, 0);
    std::thread::sleep(Duration::from_millis(5));
    let _ = d.r16(ISR);
    d.w16(ISR, INT_TIMEOUT);
    d.w32(TIMER_INT, 33_000); // 1 ms: passed 4 ms ago
    d.dev.handle(NetEvent::Timer);
    assert_eq!(d.r16(ISR) & INT_TIMEOUT, 0, "not before TCTR comes round");
    let (t, p) = (std::time::Instant::now(), super::TCTR_PERIOD);
    assert_eq!(super::next_match(t, t), t);
    assert_eq!(super::next_match(t, t + p * 3 / 2), t + 2 * p);
    assert_eq!(super::next_match(t, t + 1000 * p), t + 1000 * p);
}

// ---- hostile programming ------------------------------------------------------------------

#[test]
fn cp_rings_outside_memory_stop_with_serr_and_reset_recovers() {
    let (mut d, peer) = cp_open();
    d.w32(RDSAR + 4, 0x10); // far beyond guest RAM
    d.w32(TNPDS + 4, 0x10);
    peer.inject(&frame_to(MAC, 100, 0));
    d.pump();
    d.w8(TPPOLL, TPPOLL_NPQ);
    assert_ne!(d.r16(ISR) & INT_SERR, 0);
    assert!(peer.take_sent().is_empty());
    assert_eq!(d.dev.port.guest_errors(), 2);
    // Still stopped, and quiet, however often the guest pokes it.
    for _ in 0..3 {
        d.w8(TPPOLL, TPPOLL_NPQ);
        peer.inject(&frame_to(MAC, 100, 0));
        d.pump();
    }
    assert_eq!(d.dev.port.guest_errors(), 2);
    d.open_cp(0);
    peer.inject(&frame_to(MAC, 100, 7));
    d.pump();
    assert_eq!(d.cp_rx().len(), 1, "works again after a reset");
}

#[test]
fn cp_hostile_descriptors_are_bounded() {
    let (mut d, peer) = cp_open();
    // Every TX descriptor owned by the device, none with EOR or LS, all 64 KiB long: the
    // walk stops after a bounded number and drops the oversized frame.
    for i in 0..CP_RING_MAX {
        let ring = TX_RING;
        let mut desc = [0u8; 16];
        desc[..4].copy_from_slice(&(DESC_OWN | 0xffff).to_le_bytes());
        desc[8..].copy_from_slice(&TX_BUFS.to_le_bytes());
        d.mem
            .write_slice(&desc, GuestAddress(ring + i as u64 * 16))
            .unwrap();
    }
    d.w8(TPPOLL, TPPOLL_NPQ);
    assert!(peer.take_sent().is_empty());
    assert!(d.dev.port.guest_errors() >= 1);

    // A ring of descriptors without LS, the first large enough to be sent from where it
    // lies (so it stays the device's): the walk comes back to it, drops the frame with SERR,
    // hands every descriptor back and reports nothing sent.
    let (mut d, peer) = cp_open();
    for i in 0..CP_RING {
        let len = if i == 0 { 2100 } else { 100 };
        let eor = if i == CP_RING - 1 { DESC_EOR } else { 0 };
        let fs = if i == 0 { DESC_FS } else { 0 };
        d.write_desc(TX_RING, i, DESC_OWN | fs | eor | len, 0, TX_BUFS);
    }
    d.w8(TPPOLL, TPPOLL_NPQ);
    assert!(peer.take_sent().is_empty());
    assert_eq!(d.r16(ISR) & (INT_SERR | INT_TOK), INT_SERR);
    assert!((0..CP_RING).all(|i| d.read_desc(TX_RING, i).0 & DESC_OWN == 0));

    // A large frame in more pieces than are sent in place: copied, sent whole.
    let (mut d, peer) = cp_open_with(Capabilities {
        vnet_hdr: true,
        offloads: Offloads::ALL,
    });
    let f = tcp4_frame(3000, false);
    let mut frags: Vec<&[u8]> = vec![&f[..2100]];
    frags.extend(f[2100..].chunks(20));
    assert!(frags.len() > 32 && frags.len() < CP_RING as usize);
    d.cp_xmit(&frags, 0, 0);
    assert_eq!(peer.take_sent()[0][VNET_HDR_LEN..], f[..]);
    assert_eq!(peer.take_sent_from(crate::test_util::host_range(&d.mem)), 0);

    // Zero-sized RX buffers cannot hold anything: error, not a spin.
    let (mut d, peer) = cp_open();
    for i in 0..CP_RING {
        let mut desc = [0u8; 16];
        desc[..4].copy_from_slice(&DESC_OWN.to_le_bytes());
        d.mem
            .write_slice(&desc, GuestAddress(RX_RING + i as u64 * 16))
            .unwrap();
    }
    peer.inject(&frame_to(MAC, 100, 0));
    d.pump();
    assert_ne!(d.r16(ISR) & INT_SERR, 0);

    // Large send of a frame whose IP header claims more than the frame holds: sent
    // unsegmented, nothing read beyond it.
    let (mut d, peer) = cp_open();
    let mut f = tcp4_frame(3000, false);
    f[14] = 0x4f;
    d.cp_xmit(&[&f[..40]], TX_LGSEN | 1448 << TX_MSS_SHIFT, 0);
    let sent = peer.take_sent();
    assert_eq!(sent, vec![f[..40].to_vec()]);
}

#[test]
fn too_hostile_slots_and_ring() {
    let (mut d, peer) = too_open();
    d.w32(TSD0, 4000); // beyond the 1792-byte limit
    let tsd = d.r32(TSD0);
    assert_ne!(tsd & TSD_TABT, 0, "aborted");
    assert_ne!(d.r16(ISR) & INT_TER, 0);
    d.w32(TSAD0 + 4, 0xffff_0000); // outside RAM
    d.w32(TSD0 + 4, 100);
    assert_ne!(d.r32(TSD0 + 4) & TSD_TABT, 0);
    assert!(peer.take_sent().is_empty());
    // CAPR anywhere: the ring arithmetic stays inside the ring.
    for capr in [0u16, 0x7ffe, 0xfff0, 0xffff, 0x1234] {
        d.w16(CAPR, capr);
        peer.inject(&frame_to(MAC, 500, 0));
        d.pump();
        d.kicked();
    }
    // RBSTART outside memory: SERR and the receiver stops.
    d.w32(RBSTART, 0xfff0_0000);
    d.w16(CAPR, 0xfff0);
    peer.inject(&frame_to(MAC, 100, 0));
    d.pump();
    d.kicked();
    assert_ne!(d.r16(ISR) & INT_SERR, 0);
}

// ---- snapshot and restore -----------------------------------------------------------------

/// Saves the device mid-stream and carries on with a new one restored on a copy of guest
/// memory and a new backend, as `migrate` to a file and `-incoming` do; the new peer.
fn migrate(d: &mut Driver) -> MemPeer {
    let (b, peer) = pair(Capabilities::default());
    d.migrate(Box::new(b)).expect("restores");
    peer
}

/// The state as saved, as JSON, with `edit` applied to the model's part.
fn edited_state(d: &Driver, edit: impl FnOnce(&mut serde_json::Value)) -> serde_json::Value {
    let mut s = d.dev.save();
    edit(&mut s["model"]);
    s
}

/// Restore of `state` into a new device fails, naming `what`; the driver keeps the old one.
fn refused(d: &mut Driver, state: &serde_json::Value, what: &str) {
    let (b, _peer) = pair(Capabilities::default());
    let e = d.restore_into_new(Box::new(b), state).unwrap_err();
    assert!(e.0.contains(what), "{what}: {e}");
}

/// The state without what moves with time (keys ending in `_ns`).
fn timeless(mut v: serde_json::Value) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.retain(|k, _| !k.ends_with("_ns"));
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

#[test]
fn too_snapshot_mid_stream_continues() {
    let (mut d, peer) = too_open();
    let mut expect_tx = vec![];
    for i in 0..5u8 {
        let f = frame_to([0xff; 6], 60 + 37 * i as usize, i);
        d.too_xmit(&f);
        expect_tx.push(f);
    }
    for i in 0..4u8 {
        peer.inject(&frame_to(MAC, 100 + 50 * i as usize, 0x40 | i));
    }
    d.pump();
    assert_eq!(d.too_rx().len(), 4);
    assert_eq!(peer.take_sent(), expect_tx);
    // Mid-stream: three frames in the ring the driver has not read, ROK unacknowledged, the
    // ring pointers away from zero, TCTR running.
    for i in 0..3u8 {
        peer.inject(&frame_to(MAC, 200 + i as usize, 0x80 | i));
    }
    d.pump();
    d.w32(TIMER_INT, 0);
    d.w32(TCTR, 0);
    std::thread::sleep(Duration::from_millis(2));
    let tctr = d.r32(TCTR);
    let (isr, cbr, capr) = (d.r16(ISR), d.r16(CBR), d.r16(CAPR));
    assert!(d.irq());

    let peer = migrate(&mut d);
    assert!(d.irq(), "the asserted line is asserted again");
    assert_eq!((d.r16(ISR), d.r16(CBR), d.r16(CAPR)), (isr, cbr, capr));
    assert!(d.r32(TCTR) >= tctr, "TCTR carries on");
    assert_eq!(
        d.read_eeprom(7, 6).to_le_bytes(),
        MAC[..2],
        "the EEPROM answers as before"
    );
    let got = d.too_rx();
    let want: Vec<_> = (0..3u8)
        .map(|i| frame_to(MAC, 200 + i as usize, 0x80 | i))
        .collect();
    assert_eq!(got.iter().map(|g| g.1.clone()).collect::<Vec<_>>(), want);
    // Both directions carry on from where the rings stood.
    d.w16(ISR, 0xffff);
    for i in 0..6u8 {
        let f = frame_to(MAC, 300 + 11 * i as usize, i);
        peer.inject(&f);
        d.pump();
        assert!(d.irq(), "ROK after restore");
        assert_eq!(d.too_rx()[0].1, f);
        let t = frame_to([0xff; 6], 80 + i as usize, 0x20 | i);
        let slot = d.too_xmit(&t);
        assert_eq!(
            d.r32(TSD0 + 4 * slot) & (TSD_OWN | TSD_TOK),
            TSD_OWN | TSD_TOK
        );
        assert_eq!(peer.take_sent(), vec![t]);
    }
}

#[test]
fn cp_snapshot_mid_stream_continues() {
    let (mut d, peer) = cp_open();
    for round in 0..3u8 {
        for i in 0..20u8 {
            d.cp_xmit(&[&frame_to([0xff; 6], 64 + i as usize, round ^ i)], 0, 0);
            peer.inject(&frame_to(MAC, 70 + i as usize, round ^ i));
        }
        d.pump();
        assert_eq!(d.cp_rx().len(), 20);
        assert_eq!(d.cp_tx_done().len(), 20);
        assert_eq!(peer.take_sent().len(), 20);
    }
    // Mid-stream: received frames not yet taken, TOK/ROK pending, tally counting.
    for i in 0..5u8 {
        peer.inject(&frame_to(MAC, 90 + i as usize, 0x60 | i));
    }
    d.pump();
    d.cp_xmit(&[&frame_to([0xff; 6], 64, 0x77)], 0, 0);
    assert_eq!(peer.take_sent().len(), 1);
    let tally = d.dev.tally;
    assert!(d.irq());

    let peer = migrate(&mut d);
    assert!(d.irq(), "the asserted line is asserted again");
    assert_eq!(d.dev.tally, tally);
    let got = d.cp_rx();
    assert_eq!(got.len(), 5);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.2, frame_to(MAC, 90 + i, 0x60 | i as u8));
    }
    assert_eq!(d.cp_tx_done().len(), 1);
    // Around the rings more than once from where they stood.
    for i in 0..150u8 {
        let t = frame_to([0xff; 6], 100 + i as usize, i);
        d.cp_xmit(&[&t[..40], &t[40..]], 0, 0);
        assert_eq!(peer.take_sent(), vec![t]);
        assert_eq!(d.cp_tx_done().len(), 2);
        let r = frame_to(MAC, 61 + i as usize, !i);
        peer.inject(&r);
        d.pump();
        assert!(d.irq(), "ROK after restore");
        assert_eq!(d.cp_rx()[0].2, r);
        d.w16(ISR, 0xffff);
    }
}

#[test]
fn too_pending_transmit_completes_after_restore() {
    let (mut d, peer) = too_open();
    peer.set_blocked(true);
    let first = frame_to([0xff; 6], 100, 1);
    let second = frame_to([0xff; 6], 200, 2);
    d.too_xmit(&first);
    let slot = d.too_xmit(&second);
    assert_eq!(
        d.r32(TSD0) & TSD_TOK,
        TSD_TOK,
        "reported sent, waiting in the backlog"
    );
    assert_eq!(
        d.r32(TSD0 + 4 * slot) & (TSD_OWN | TSD_TOK),
        0,
        "the driver still waits for this one"
    );
    d.w16(ISR, 0xffff);

    let peer = migrate(&mut d);
    // The slot the driver waits for goes out without a new doorbell; the frame already
    // reported sent was lost with the old backend, as a wire may lose it.
    assert_eq!(peer.take_sent(), vec![second]);
    assert_eq!(
        d.r32(TSD0 + 4 * slot) & (TSD_OWN | TSD_TOK),
        TSD_OWN | TSD_TOK
    );
    assert_ne!(d.r16(ISR) & INT_TOK, 0);
    assert!(d.irq());
}

/// The I/O thread's turn that hands the outbox over does not walk the C+ ring: a
/// descriptor the driver handed over without polling (TPPoll) waits for its poll, as on the
/// chip.
#[test]
fn cp_a_flush_does_not_send_what_was_not_polled_for() {
    let (mut d, peer) = cp_open();
    let first = frame_to([0xff; 6], 100, 1);
    let second = frame_to([0xff; 6], 120, 2);
    d.cp_queue(&[&first], 0, 0);
    d.w_only(TPPOLL, TPPOLL_NPQ as u32, 1);
    d.cp_queue(&[&second], 0, 0);
    d.dev.run_flush_kicks();
    assert_eq!(peer.take_sent(), vec![first], "only the polled-for frame");
    d.w8(TPPOLL, TPPOLL_NPQ);
    assert_eq!(peer.take_sent(), vec![second]);
}

/// An empty 32 KiB ring takes a burst of 21 full-size frames (what it holds) in one turn,
/// where the room counted at the longest frame it accepts let 18 in; a frame after them waits
/// for room, and so do longer frames than the room is counted at, none lost.
#[test]
fn too_takes_a_ring_of_full_frames_in_one_turn() {
    let (mut d, peer) = too_open();
    assert_eq!(d.dev.model.rx_room_for(64), 21);
    for i in 0..22u8 {
        peer.inject(&frame_to(MAC, 1514, i));
    }
    d.dev.handle(NetEvent::Backend);
    let got = d.too_rx();
    assert_eq!(got.len(), 21, "one turn fills the ring");
    for (i, (_, f)) in got.iter().enumerate() {
        assert_eq!(*f, frame_to(MAC, 1514, i as u8));
    }
    // The driver's CAPR write made room: the waiting frame follows on the kick.
    d.kicked();
    assert_eq!(d.too_rx()[0].1, frame_to(MAC, 1514, 21));
    // Longer frames than the estimate counts with wait for room, and none is lost.
    for i in 0..20u8 {
        peer.inject(&frame_to(MAC, MAX_NORMAL_FRAME, i));
    }
    let mut seen = 0;
    for _ in 0..10 {
        d.pump();
        d.kicked();
        for (_, f) in d.too_rx() {
            assert_eq!(f, frame_to(MAC, MAX_NORMAL_FRAME, seen as u8));
            seen += 1;
        }
    }
    assert_eq!(seen, 20);
}

/// On a ring of four descriptors the guest has room for four frames, however many are
/// asked for: counting stops where the ring comes round.
#[test]
fn cp_rx_room_counts_each_descriptor_once() {
    let (d, _peer) = cp_open();
    let base = RX_RING;
    for i in 0..4u64 {
        let eor = if i == 3 { DESC_EOR } else { 0 };
        d.mem
            .write_obj((DESC_OWN | eor | 2048).to_le(), GuestAddress(base + 16 * i))
            .unwrap();
    }
    assert_eq!(d.dev.model.rx_room_for(64), 4);
}

#[test]
fn cp_pending_transmit_completes_after_restore() {
    let (mut d, peer) = cp_open();
    peer.set_blocked(true);
    let first = frame_to([0xff; 6], 100, 1);
    let second = frame_to([0xff; 6], 300, 2);
    d.cp_xmit(&[&first], 0, 0);
    d.cp_xmit(&[&second[..50], &second[50..]], 0, 0);
    assert_eq!(
        d.cp_tx_done().len(),
        1,
        "the first is back, its frame in the backlog"
    );
    d.w16(ISR, 0xffff);

    let peer = migrate(&mut d);
    assert_eq!(peer.take_sent(), vec![second]);
    assert_eq!(d.cp_tx_done().len(), 2);
    assert_ne!(d.r16(ISR) & INT_TOK, 0);
    assert!(d.irq());
}

/// Hands the device the first `first` bytes of `f` in descriptor 0 (FS, no LS) and polls:
/// the frame is half gathered. Returns where the rest of `f` lies in guest memory.
fn cp_first_piece_sent(d: &mut Driver, f: &[u8], first: usize) -> u64 {
    let (a, b) = (TX_BUFS, TX_BUFS + 0x1_0000);
    d.mem.write_slice(&f[..first], GuestAddress(a)).unwrap();
    d.mem.write_slice(&f[first..], GuestAddress(b)).unwrap();
    d.write_desc(TX_RING, 0, DESC_OWN | DESC_FS | first as u32, 0, a);
    d.w8(TPPOLL, TPPOLL_NPQ);
    b
}

/// A large C+ frame whose first descriptor was taken (it is sent from where it lies, so its
/// write-back waits for the send) and whose last one the driver had not handed over yet at
/// the snapshot: after restore the frame is completed and sent whole, and both descriptors
/// come back.
#[test]
fn cp_frame_half_gathered_at_the_snapshot_goes_out_whole() {
    let (mut d, _peer) = cp_open();
    let f = frame_to([0xff; 6], 6000, 5);
    let b = cp_first_piece_sent(&mut d, &f, 4000);
    assert_ne!(
        d.read_desc(TX_RING, 0).0 & DESC_OWN,
        0,
        "held until the frame is sent"
    );

    let peer = migrate(&mut d);
    d.write_desc(TX_RING, 1, DESC_OWN | DESC_LS | 2000, 0, b);
    d.w8(TPPOLL, TPPOLL_NPQ);
    assert_eq!(peer.take_sent(), vec![f]);
    for i in 0..2 {
        assert_eq!(
            d.read_desc(TX_RING, i).0 & DESC_OWN,
            0,
            "descriptor {i} back"
        );
    }
}

/// A frame half gathered in C+ mode survives a normal-mode send in between (a driver that
/// turns C+ off and on again): the two modes copy frames into buffers of their own.
#[test]
fn cp_frame_half_gathered_survives_a_normal_mode_send() {
    let (mut d, peer) = cp_open();
    let f = frame_to([0xff; 6], 1000, 6);
    let b = cp_first_piece_sent(&mut d, &f, 54);
    assert!(peer.take_sent().is_empty());

    let cpcr = d.r16(CPCR);
    d.w16(CPCR, 0);
    let g = frame_to([0xff; 6], 60, 7);
    let slot = TX_BUFS + 0x4_0000;
    d.mem.write_slice(&g, GuestAddress(slot)).unwrap();
    d.w32(TSAD0, slot as u32);
    d.w32(TSD0, g.len() as u32);
    assert_eq!(peer.take_sent(), vec![g], "the normal-mode frame");

    // TSAD0 and TNPDS share their bytes: the driver points the ring back.
    d.w16(CPCR, cpcr);
    d.w32(TNPDS, TX_RING as u32);
    d.w32(TNPDS + 4, 0);
    d.write_desc(TX_RING, 1, DESC_OWN | DESC_LS | (f.len() as u32 - 54), 0, b);
    d.w8(TPPOLL, TPPOLL_NPQ);
    assert_eq!(peer.take_sent(), vec![f], "the C+ frame, whole");
}

#[test]
fn timerint_deadline_survives_restore() {
    let (mut d, _peer) = too_open();
    d.w32(TIMER_INT, 33_000); // 1 ms
    d.w32(TCTR, 0);
    let _peer = migrate(&mut d);
    std::thread::sleep(Duration::from_millis(3));
    // The restored timer fd fires (nothing was rewritten after restore).
    let mut p = libc::pollfd {
        fd: d.dev.timer.fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    assert_eq!(unsafe { libc::poll(&mut p, 1, 1000) }, 1, "timer armed");
    d.dev.handle(NetEvent::Timer);
    assert_ne!(d.r16(ISR) & INT_TIMEOUT, 0);
    assert!(d.irq());
}

#[test]
fn never_ran_device_restores_and_then_works() {
    for cplus in [true, false] {
        let (mut d, _p) = rig(cplus);
        let saved = timeless(d.dev.save());
        let peer = migrate(&mut d);
        assert_eq!(timeless(d.dev.save()), saved, "the same state again");
        assert_eq!(d.probe(), MAC);
        let f = frame_to([0xff; 6], 100, 9);
        if cplus {
            d.open_cp(0);
            d.cp_xmit(&[&f], 0, 0);
        } else {
            d.open_too(0);
            d.too_xmit(&f);
        }
        assert_eq!(peer.take_sent(), vec![f]);
    }
}

#[test]
fn restored_state_saves_the_same() {
    let (mut d, peer) = cp_open();
    for i in 0..3u8 {
        peer.inject(&frame_to(MAC, 100, i));
        d.cp_xmit(&[&frame_to([0xff; 6], 100, i)], 0, 0);
    }
    d.pump();
    let saved = timeless(d.dev.save());
    migrate(&mut d);
    assert_eq!(timeless(d.dev.save()), saved);
}

#[test]
fn hostile_states_are_refused() {
    let (mut d, _peer) = cp_open();
    let bad = edited_state(&d, |m| m["cp_tx_index"] = 5000.into());
    refused(&mut d, &bad, "cp_tx_index");
    let bad = edited_state(&d, |m| m["cp_rx_index"] = 1024.into());
    refused(&mut d, &bad, "cp_rx_index");
    let bad = edited_state(&d, |m| {
        m["regs"].as_array_mut().unwrap().pop();
    });
    refused(&mut d, &bad, "255 entries");
    let bad = edited_state(&d, |m| {
        m["eeprom"]["words"].as_array_mut().unwrap().push(0.into());
    });
    refused(&mut d, &bad, "EEPROM");
    let bad = edited_state(&d, |m| m["tx_waiting"] = serde_json::json!([1, 1]));
    refused(&mut d, &bad, "tx_waiting");
    let bad = edited_state(&d, |m| m["tx_waiting"] = serde_json::json!([4]));
    refused(&mut d, &bad, "tx_waiting");
    let bad = edited_state(&d, |m| {
        m["cp_tx_pieces"] = serde_json::json!([[0xffff_ff00_0000u64, 100]]);
        m["cp_tx_len"] = 100.into();
    });
    refused(&mut d, &bad, "guest memory");
    let bad = edited_state(&d, |m| m["cp_tx_copied"] = vec![0u8; 3000].into());
    refused(&mut d, &bad, "copied");
    let bad = edited_state(&d, |m| {
        m["eeprom"]["state"] = serde_json::json!({"Reading": {"addr": 64, "bit": 0}})
    });
    refused(&mut d, &bad, "EEPROM");
    let bad = edited_state(&d, |m| m["isr"] = (-1).into());
    refused(&mut d, &bad, "rtl8139");
    let bad = edited_state(&d, |m| m["surprise"] = true.into());
    refused(&mut d, &bad, "unknown field");
    // The other personality, whole (its config space) or just the model's part.
    let (too, _p) = too_open();
    refused(&mut d, &too.dev.save(), "config space");
    let bad = edited_state(&d, |m| m["cplus"] = false.into());
    refused(&mut d, &bad, "personality");
    let mut too = too;
    let bad = edited_state(&d, |_| {});
    refused(&mut too, &bad, "config space");
    let mut bad = too.dev.save();
    bad["model"]["cplus"] = true.into();
    refused(&mut too, &bad, "personality");
    // Nothing of that touched the running device.
    assert_eq!(d.probe(), MAC);
}
