//! The Linux e1000 driver's sequences against the model with an in-memory backend: probe,
//! open, transmit (plain, checksum offload, TSO, VLAN), receive (filters, long frames,
//! checksums, VLAN strip), interrupts and ITR, statistics, flow control, and hostile rings
//! that must end in an error state or a dropped frame and recover after a reset.

use super::driver::*;
use super::phy::*;
use super::*;
use crate::net::offload::tests::{peer_finishes, udp4_frame};
use crate::net::offload::{fold, ones_sum, parse, IPPROTO_TCP};
use crate::net::{BackendInterest, NetEvent};
use crate::pci::PciDevice;
use net_backends::mem::{pair, MemBackend, MemPeer};
use net_backends::vnet::{VnetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4};
use net_backends::{Capabilities, NetBackend};
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const PEER: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
const VNET_HDR: usize = net_backends::vnet::VNET_HDR_LEN;

/// The in-memory backend plus knobs a test turns: link state, and a send budget after which
/// the backend reports WouldBlock.
struct TestBackend {
    inner: MemBackend,
    ctl: Arc<Ctl>,
}

struct Ctl {
    link: AtomicBool,
    /// Sends allowed before WouldBlock; usize::MAX for unlimited.
    budget: AtomicUsize,
    /// Batches handed over.
    batches: AtomicUsize,
}

impl NetBackend for TestBackend {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<()> {
        let b = self.ctl.budget.load(Ordering::SeqCst);
        if b == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if b != usize::MAX {
            self.ctl.budget.store(b - 1, Ordering::SeqCst);
        }
        self.inner.send(frame)
    }
    fn send_batch(&mut self, iov: &[IoSlice<'_>], ends: &[usize], out: &mut Vec<io::Result<()>>) {
        self.ctl.batches.fetch_add(1, Ordering::SeqCst);
        net_backends::send_each(self, iov, ends, out)
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.inner.recv(buf)
    }
    fn fd(&self) -> RawFd {
        self.inner.fd()
    }
    fn link_up(&self) -> bool {
        self.ctl.link.load(Ordering::SeqCst)
    }
}

struct Rig {
    d: Driver,
    peer: MemPeer,
    ctl: Arc<Ctl>,
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

fn rig() -> Rig {
    rig_with(Capabilities::default())
}

fn rig_with(caps: Capabilities) -> Rig {
    let (inner, peer) = pair(caps);
    let ctl = Arc::new(Ctl {
        link: AtomicBool::new(true),
        budget: AtomicUsize::new(usize::MAX),
        batches: AtomicUsize::new(0),
    });
    let b = TestBackend {
        inner,
        ctl: ctl.clone(),
    };
    Rig {
        d: Driver::new(Box::new(b)),
        peer,
        ctl,
    }
}

/// Probed and opened, the LSC of e1000_open acknowledged.
fn opened() -> Rig {
    opened_with(Capabilities::default())
}

/// A tap with a virtio-net header: the peer takes every offload.
const VNET_TAP: Capabilities = Capabilities {
    vnet_hdr: true,
    offloads: net_backends::Offloads::ALL,
};

fn opened_with(caps: Capabilities) -> Rig {
    let mut r = rig_with(caps);
    r.probe();
    r.open();
    let _ = r.r(ICR);
    r
}

impl Rig {
    /// Frames from the peer into the guest, through the I/O thread's turns while they wait
    /// and the device wants them (its epoll is level-triggered: a turn may leave frames for
    /// the next one).
    fn inject<F: AsRef<[u8]>>(&mut self, frames: &[F]) -> BackendInterest {
        for f in frames {
            self.peer.inject(f.as_ref());
        }
        let mut interest = self.dev.handle(NetEvent::Backend);
        for _ in 0..frames.len() {
            if !interest.readable || self.peer.pending() == 0 {
                break;
            }
            interest = self.dev.handle(NetEvent::Backend);
        }
        interest
    }

    fn rx_kick(&mut self) -> BackendInterest {
        self.dev.handle(NetEvent::RxKick)
    }
}

fn eth(dst: [u8; 6], ethertype: u16, payload: usize) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&PEER);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend((0..payload).map(|i| (i * 13 + 7) as u8));
    f
}

/// Ethernet + IPv4 + TCP with valid checksums and `payload` data bytes.
fn tcp4(dst: [u8; 6], payload: usize) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&PEER);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (40 + payload) as u16;
    f.extend_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[10, 0, 2, 15, 10, 0, 2, 2]);
    f.extend_from_slice(&[0x9c, 0x40, 0x00, 0x50]);
    f.extend_from_slice(&1000u32.to_be_bytes());
    f.extend_from_slice(&7u32.to_be_bytes());
    f.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend((0..payload).map(|i| (i * 7 + 3) as u8));
    let at = parse(&f).unwrap();
    crate::net::offload::fill_ipv4_checksum(&mut f, &at);
    crate::net::offload::fill_l4_checksum(&mut f, &at);
    f
}

/// Puts a pseudo-header sum in the TCP checksum field, as a driver does for offload.
fn seed(f: &mut [u8], sum: u64) {
    f[50..52].copy_from_slice(&fold(sum).to_be_bytes());
}

/// What e1000_tso leaves in the headers: IP total length and checksum 0, TCP checksum field
/// = pseudo-header sum without the length.
fn tso_prep(f: &mut [u8]) {
    f[16..18].fill(0);
    f[24..26].fill(0);
    let sum = ones_sum(&f[26..34]) + IPPROTO_TCP as u64;
    seed(f, sum);
}

fn pseudo(f: &[u8], l4_len: usize) -> u64 {
    ones_sum(&f[26..34]) + IPPROTO_TCP as u64 + l4_len as u64
}

/// Both checksums of an IPv4 frame verify as a receiver checks them.
fn checksums_ok(f: &[u8]) -> bool {
    let at = parse(f).expect("parses");
    let l4 = ones_sum(&f[at.l3 + 12..at.l3 + 20]) + at.proto as u64 + (at.end - at.l4) as u64;
    fold(ones_sum(&f[at.l3..at.l4])) == 0xffff && fold(l4 + ones_sum(&f[at.l4..at.end])) == 0xffff
}

fn mta_hash(addr: [u8; 6]) -> u32 {
    ((addr[4] >> 4) as u32 | (addr[5] as u32) << 4) & 0xfff
}

#[test]
fn pci_identity_and_bars() {
    let r = rig();
    let c = r.dev.config();
    assert_eq!(c.get16(0), 0x8086);
    assert_eq!(c.get16(2), 0x100e);
    assert_eq!(c.get32(8) >> 8, 0x02_00_00, "Ethernet controller");
    assert_eq!(c.bar_kind(MMIO_BAR), Some(BarKind::Mem32));
    assert_eq!(c.bar_size(MMIO_BAR), Some(128 << 10));
    assert_eq!(c.bar_kind(IO_BAR), Some(BarKind::Io));
    assert_eq!(c.interrupt_pin(), 1);
}

#[test]
fn probe_eeprom_and_phy() {
    let mut r = rig();
    r.reset_hw();
    // EECD: present, 64-word part (SIZE clear), no grant before a request.
    let eecd = r.r(EECD);
    assert_ne!(eecd & EECD_PRES, 0);
    assert_eq!(eecd & (1 << 9 | EECD_GNT), 0);
    assert!(r.eeprom_checksum_ok());
    let mut sum = 0u16;
    for i in 0..64u16 {
        let bb = r.ee_read_bitbang(i).unwrap();
        assert_eq!(r.ee_read_eerd(i), Some(bb), "word {i} the same both ways");
        sum = sum.wrapping_add(bb);
    }
    assert_eq!(sum, 0xbaba);
    let all = r.ee_read_words(0, 64).unwrap();
    assert_eq!(
        all.iter().fold(0u16, |a, &w| a.wrapping_add(w)),
        0xbaba,
        "one acquisition"
    );
    assert_eq!(r.read_mac(), MacAddr(MAC));
    assert_eq!(r.ee_read_bitbang(0x0d), Some(0x100e), "device ID word");
    assert_eq!(r.ee_read_bitbang(0x0e), Some(0x8086), "vendor ID word");
    // RAL0/RAH0 hold the MAC after reset.
    assert_eq!(r.r(RAL0), 0x1200_5452);
    assert_eq!(r.r(RAH0), 0x5634 | RAH_AV);
    // PHY.
    assert_eq!(r.phy_id(), Some(0x0141_0c20));
    assert_eq!(
        r.phy_read_at(2, PHY_ID1 as u32),
        None,
        "nothing at PHY address 2"
    );
    assert!(r.phy_write(M88_PHY_SPEC_CTRL as u32, 0x0808));
    assert_eq!(r.phy_read(M88_PHY_SPEC_CTRL as u32), Some(0x0808));
    assert!(r.phy_write(PHY_ID1 as u32, 0));
    assert_eq!(r.phy_read(PHY_ID1 as u32), Some(0x0141), "ID is read-only");
    // The same registers through the I/O window.
    assert_eq!(r.io_r(RAL0), 0x1200_5452);
}

#[test]
fn open_brings_link_up_with_lsc() {
    let mut r = rig();
    r.reset_hw();
    assert_eq!(r.r(STATUS) & STATUS_LU, 0, "no link before SLU");
    let mac = r.read_mac();
    r.init_hw(mac);
    let st = r.r(STATUS);
    assert_ne!(st & STATUS_LU, 0);
    assert_ne!(st & STATUS_FD, 0);
    assert_eq!(st & (3 << 6), STATUS_SPEED_1000);
    let ps = r.phy_read(PHY_STATUS as u32).unwrap();
    assert_eq!(
        ps & (MII_SR_LINK_STATUS | MII_SR_AUTONEG_COMPLETE),
        MII_SR_LINK_STATUS | MII_SR_AUTONEG_COMPLETE
    );
    assert_eq!(
        r.phy_read(PHY_LP_ABILITY as u32).map(|v| v & 0x4000),
        Some(0x4000)
    );
    assert!(!r.irq(), "LSC is masked until open");
    r.open();
    assert!(r.irq());
    assert_ne!(r.r(ICR) & ICR_LSC, 0);
    assert!(!r.irq(), "ICR read deasserts");
    // The backend loses its peer: link down in STATUS and PHY, with an LSC, once the port
    // has seen it (at the backend's next event).
    r.ctl.link.store(false, Ordering::SeqCst);
    r.dev.handle(NetEvent::Backend);
    assert_eq!(r.r(STATUS) & STATUS_LU, 0);
    assert!(r.irq());
    assert_eq!(r.r(ICR) & ICR_LSC, ICR_LSC);
    assert_eq!(
        r.phy_read(PHY_STATUS as u32).unwrap() & MII_SR_LINK_STATUS,
        0
    );
    r.ctl.link.store(true, Ordering::SeqCst);
    r.dev.handle(NetEvent::Timer);
    assert!(r.irq(), "link back: LSC");
    assert_ne!(r.r(STATUS) & STATUS_LU, 0);
    // PHY power-down drops it, restarting autoneg brings it back.
    let _ = r.r(ICR);
    r.phy_write(PHY_CTRL as u32, MII_CR_POWER_DOWN);
    assert_eq!(r.r(STATUS) & STATUS_LU, 0);
    r.phy_write(PHY_CTRL as u32, MII_CR_AUTONEG_EN | MII_CR_RESTART_AUTONEG);
    assert_ne!(r.r(STATUS) & STATUS_LU, 0);
    assert_eq!(
        r.phy_read(PHY_CTRL as u32).unwrap() & MII_CR_RESTART_AUTONEG,
        0
    );
}

#[test]
fn xmit_plain_frame() {
    let mut r = opened();
    let f = eth(PEER, 0x0800, 1486);
    r.xmit_legacy(&f, None, None);
    assert_eq!(r.peer.take_sent(), vec![f]);
    assert_eq!(r.tx_done(), 1);
    // Linux asks for a delayed TXDW (IDE, TIDV 8 = 8.192 us).
    assert!(r.run_timer(), "TIDV armed the timer");
    assert!(r.irq());
    let icr = r.r(ICR);
    assert_eq!(icr & (ICR_TXDW | ICR_TXQE), ICR_TXDW | ICR_TXQE);
    assert_eq!(r.r(TDH) as usize, r.tx_next());
    // A short frame is padded to 60 bytes (TCTL.PSP).
    let short = eth(PEER, 0x0806, 28);
    r.xmit_legacy(&short, None, None);
    let sent = r.peer.take_sent();
    assert_eq!(sent[0].len(), 60);
    assert_eq!(&sent[0][..42], &short[..]);
    assert!(sent[0][42..].iter().all(|&b| b == 0));
    assert_eq!(r.dev.stats().tx_frames, 2);
    assert_eq!(r.r(GPTC), 2);
    assert_eq!(r.r(TPT), 2);
    assert_eq!(r.r(GOTCL), (1500 + 4 + 64) as u32);
}

/// A send the backend fails with an error it passes up (the tap takes some itself) is lost, not
/// sent: counted as dropped by the backend, its descriptors back to the driver, and frames
/// go again once the backend takes them. Both ways out: a small frame through the port's
/// outbox, a large one straight from guest memory.
#[test]
fn refused_sends_count_as_dropped_not_sent() {
    let mut r = opened();
    r.peer.set_failing(true);
    let small = eth(PEER, 0x0800, 100);
    let large = eth(PEER, 0x0800, 3000);
    r.xmit_legacy(&small, None, None);
    r.xmit_legacy(&large, None, None);
    assert_eq!(r.r(TDH) as usize, r.tx_next(), "both descriptors came back");
    let s = r.dev.stats();
    assert_eq!((s.tx_frames, s.backend_dropped), (0, 2));
    assert!(r.peer.take_sent().is_empty());
    r.peer.set_failing(false);
    r.xmit_legacy(&small, None, None);
    r.xmit_legacy(&large, None, None);
    assert_eq!(r.peer.take_sent(), vec![small, large]);
    let s = r.dev.stats();
    assert_eq!((s.tx_frames, s.backend_dropped), (2, 2));
}

/// The full-size frames that take the FCS's pass or not, with the status bits they always
/// had: a VLAN tag left in the frame (the segment two words on), UDP with and without a
/// checksum, and RCTL.SECRC (no FCS: the sum is taken alone).
#[test]
fn full_size_checksum_status_in_every_kind_of_frame() {
    let mut r = opened();
    let both = RXD_STAT_IPCS | RXD_STAT_TCPCS;
    let status = |r: &mut Rig, f: &[u8]| {
        r.inject(&[f.to_vec()]);
        let got = r.rx_poll();
        assert_eq!(got.len(), 1);
        (got[0].status & both, got[0].errors)
    };
    let mut tagged = tcp4(MAC, 1456);
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    assert_eq!(status(&mut r, &tagged), (both, 0));
    tagged[900] ^= 1;
    assert_eq!(status(&mut r, &tagged), (both, RXD_ERR_TCPE));
    let mut udp = udp4_frame(MAC, 1472);
    assert_eq!(status(&mut r, &udp), (both, 0));
    udp[700] ^= 1;
    assert_eq!(status(&mut r, &udp), (both, RXD_ERR_TCPE));
    udp[40..42].copy_from_slice(&[0, 0]);
    assert_eq!(
        status(&mut r, &udp),
        (RXD_STAT_IPCS, 0),
        "no UDP checksum: none checked"
    );
    let rctl = r.r(RCTL);
    r.w(RCTL, rctl | RCTL_SECRC);
    let mut tcp = tcp4(MAC, 1460);
    assert_eq!(status(&mut r, &tcp), (both, 0));
    tcp[1000] ^= 1;
    assert_eq!(status(&mut r, &tcp), (both, RXD_ERR_TCPE));
}

/// A frame of null descriptors (length 0) puts nothing on the wire, not even the padding
/// PSP gives a short frame: its descriptor just comes back.
#[test]
fn null_descriptors_send_nothing() {
    let mut r = opened();
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&0x1000u64.to_le_bytes());
    d[11] = TXD_CMD_EOP | TXD_CMD_IFCS | TXD_CMD_RS;
    let i = r.put_tx_desc(d);
    r.kick_tx();
    assert_eq!(r.r(TDH) as usize, r.tx_next());
    let st: u8 = r
        .mem
        .read_obj(GuestAddress(TX_RING + 16 * i as u64 + 12))
        .unwrap();
    assert_ne!(st & TXD_STAT_DD, 0, "the descriptor came back");
    assert!(r.peer.take_sent().is_empty());
    assert_eq!((r.r(GPTC), r.r(TPT), r.r(GOTCL)), (0, 0, 0));
    assert_eq!(r.dev.stats().tx_frames, 0);
    // A frame after it goes as usual.
    let f = eth(PEER, 0x0800, 100);
    r.xmit_legacy(&f, None, None);
    assert_eq!(r.peer.take_sent(), vec![f]);
}

#[test]
fn xmit_checksum_offload() {
    let mut r = opened();
    // Context + data descriptors: the driver leaves the pseudo-header sum in the field.
    let mut f = tcp4(PEER, 300);
    let sum = pseudo(&f, 320);
    seed(&mut f, sum);
    r.xmit_csum(&f, 34, 50, true);
    let sent = r.peer.take_sent();
    assert!(checksums_ok(&sent[0]));
    // Legacy descriptor with IC/CSS/CSO.
    let sum = pseudo(&f, 320);
    seed(&mut f, sum);
    r.xmit_legacy(&f, Some((34, 50)), None);
    assert!(checksums_ok(&r.peer.take_sent()[0]));
    // CSO beyond the frame: sent untouched.
    r.xmit_legacy(&f[..200], Some((34, 250)), None);
    assert_eq!(r.peer.take_sent()[0][..], f[..200]);
    assert_eq!(r.tx_done(), 3);
}

/// TCP payload of the 64 KiB TSO sends below, and their MSS.
const TSO_PAYLOAD: usize = 65536 - 54;
const TSO_MSS: u16 = 1448;

/// One 64 KiB TSO send as e1000_tso prepares it: the frame, and what reached the peer.
fn xmit_tso_64k_on(r: &mut Rig, vlan: Option<u16>) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut f = tcp4(PEER, TSO_PAYLOAD);
    tso_prep(&mut f);
    r.xmit_tso(&f, 14, 34, 54, TSO_MSS, vlan);
    (f, r.peer.take_sent())
}

#[test]
fn xmit_tso_64k() {
    let mut r = opened();
    let (payload, mss) = (TSO_PAYLOAD, TSO_MSS);
    let (f, sent) = xmit_tso_64k_on(&mut r, None);
    assert_eq!(sent.len(), payload.div_ceil(mss as usize));
    let mut data = vec![];
    for (i, s) in sent.iter().enumerate() {
        assert!(checksums_ok(s), "segment {i} checksums");
        let seq = u32::from_be_bytes(s[38..42].try_into().unwrap());
        assert_eq!(seq, 1000 + (i * mss as usize) as u32);
        assert!(s.len() - 54 <= mss as usize);
        data.extend_from_slice(&s[54..]);
    }
    assert_eq!(data, f[54..]);
    assert_eq!(r.tx_done(), 1);
    assert_eq!(r.r(TSCTC), 1);
    assert_eq!(r.r(GPTC), sent.len() as u32);
}

/// TSO sends cut with an MSS of 16 bytes (about 4 000 wire frames each): a TDT write sends
/// until [`TX_SENDS_PER_WALK`] frames went out, finishes the frame it is on, and leaves the
/// rest (TDH at the next frame) to the I/O thread's next turns.
#[test]
fn tso_sends_cut_small_leave_the_rest_to_the_io_thread() {
    let mut r = opened();
    let mss = 16u16;
    let mut f = tcp4(PEER, TSO_PAYLOAD);
    tso_prep(&mut f);
    let segs = TSO_PAYLOAD.div_ceil(mss as usize);
    assert!(segs as u64 > crate::net::port::TX_SENDS_PER_WALK);
    for _ in 0..3 {
        r.queue_tso(&f, 14, 34, 54, mss, None);
    }
    // The doorbell's walk sends the first frame and stops there; the I/O thread's turn that
    // the walk asked for sends the second one.
    let tail = r.tx_next() as u32;
    r.w_only(TDT, tail);
    assert_eq!(r.tx_done(), 1);
    assert_ne!(r.r(TDH), r.r(TDT), "the rest waits");
    r.dev.run_kicks();
    assert_eq!(r.peer.take_sent().len(), 2 * segs, "two frames, whole");
    assert_eq!(r.tx_done(), 1);
    r.dev.run_kicks();
    let last = r.peer.take_sent();
    assert_eq!(last.len(), segs);
    assert!(checksums_ok(&last[segs - 1]));
    assert_eq!(r.tx_done(), 1);
    assert_eq!(r.r(TDH), r.r(TDT));
    assert_eq!(r.r(TSCTC), 3);
    r.dev.run_kicks();
    assert!(r.peer.take_sent().is_empty());
}

#[test]
fn tso_goes_whole_to_a_tap_with_a_vnet_header() {
    let mut r = opened_with(VNET_TAP);
    let (payload, mss) = (TSO_PAYLOAD, TSO_MSS);
    let (f, sent) = xmit_tso_64k_on(&mut r, None);
    assert_eq!(sent.len(), 1, "one frame for the host kernel to segment");
    let (h, g) = peer_finishes(&sent[0]);
    assert_eq!(
        h,
        VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 54,
            gso_size: mss,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
    );
    // The IP length and checksum e1000_tso left zero are filled in; with the checksum the
    // peer adds, the frame verifies as one large TCP segment.
    assert_eq!(u16::from_be_bytes([g[16], g[17]]) as usize, g.len() - 14);
    assert!(checksums_ok(&g));
    assert_eq!(g[54..], f[54..]);
    assert_eq!(r.tx_done(), 1);
    assert_eq!(r.r(TSCTC), 1);
    // Counted as the wire frames the peer makes of it.
    let n = payload.div_ceil(mss as usize) as u32;
    assert_eq!(r.r(GPTC), n);
    let wire = (n as usize - 1) * (54 + mss as usize + 4) + 54 + payload % mss as usize + 4;
    assert_eq!(r.r(GOTCL) as usize, wire);

    // A tag to insert moves the offsets: the model segments, each frame with an empty header.
    let ctrl = r.r(CTRL);
    r.w(CTRL, ctrl | CTRL_VME);
    let (_, sent) = xmit_tso_64k_on(&mut r, Some(5));
    assert_eq!(sent.len(), n as usize);
    assert!(sent.iter().all(|s| s[..VNET_HDR] == [0; VNET_HDR]));
}

/// Bytes the backend took straight from guest memory since the last call.
fn sent_from_guest(r: &mut Rig) -> usize {
    r.peer.take_sent_from(crate::test_util::host_range(&r.mem))
}

#[test]
fn large_frames_leave_from_guest_memory() {
    let mut r = opened_with(VNET_TAP);
    sent_from_guest(&mut r);
    // A 3000-byte frame, plain and with checksum offload: headers copied, the rest not.
    let mut f = tcp4(PEER, 3000 - 54);
    r.xmit_legacy(&f, None, None);
    assert_eq!(r.peer.take_sent()[0][VNET_HDR..], f[..]);
    assert_eq!(sent_from_guest(&mut r), 3000 - 256);
    let sum = pseudo(&f, 3000 - 34);
    seed(&mut f, sum);
    r.xmit_csum(&f, 34, 50, true);
    let (h, g) = peer_finishes(&r.peer.take_sent()[0]);
    assert_eq!((h.csum_start, h.csum_offset), (34, 16));
    assert!(checksums_ok(&g));
    assert_eq!(sent_from_guest(&mut r), 3000 - 256);
    // The 64 KiB TSO send: only its headers are copied.
    let (f, sent) = xmit_tso_64k_on(&mut r, None);
    assert_eq!(sent[0][VNET_HDR + 256..], f[256..]);
    assert_eq!(sent_from_guest(&mut r), f.len() - 256);
    // A full-size frame is copied whole: cheaper than describing it.
    let f = tcp4(PEER, 1460);
    r.xmit_legacy(&f, None, None);
    assert_eq!(r.peer.take_sent()[0][VNET_HDR..], f[..]);
    assert_eq!(sent_from_guest(&mut r), 0);
    assert_eq!(r.tx_done(), 4);
}

#[test]
fn a_copied_frame_and_its_header_reach_the_tap_in_one_piece() {
    let mut r = opened_with(VNET_TAP);
    // Plain, and with the checksum left to the peer: the header went in front of the copy.
    let mut f = tcp4(PEER, 1460);
    r.xmit_legacy(&f, None, None);
    assert_eq!(r.peer.take_sent()[0][VNET_HDR..], f[..]);
    assert_eq!(r.peer.last_frame_runs(), 1);
    let sum = pseudo(&f, 1480);
    seed(&mut f, sum);
    r.xmit_csum(&f, 34, 50, true);
    let (h, g) = peer_finishes(&r.peer.take_sent()[0]);
    assert_eq!((h.csum_start, h.csum_offset), (34, 16));
    assert!(checksums_ok(&g));
    assert_eq!(r.peer.last_frame_runs(), 1);
    // A TSO send: the header and the copied headers, then the payload from guest memory.
    let (f, sent) = xmit_tso_64k_on(&mut r, None);
    assert_eq!(sent[0][VNET_HDR + 256..], f[256..]);
    assert_eq!(r.peer.last_frame_runs(), 2);
    assert_eq!(r.tx_done(), 3);
}

#[test]
fn checksum_offload_goes_to_a_tap_with_a_vnet_header() {
    let mut r = opened_with(VNET_TAP);
    let mut f = tcp4(PEER, 300);
    let sum = pseudo(&f, 320);
    seed(&mut f, sum);
    r.xmit_csum(&f, 34, 50, true);
    let sent = r.peer.take_sent();
    let (h, g) = peer_finishes(&sent[0]);
    assert_eq!((h.flags, h.gso_type), (VIRTIO_NET_HDR_F_NEEDS_CSUM, 0));
    assert_eq!((h.csum_start, h.csum_offset), (34, 16));
    assert_eq!(
        sent[0][VNET_HDR + 50..VNET_HDR + 52],
        f[50..52],
        "left to the peer"
    );
    assert!(checksums_ok(&g));
    // The legacy descriptor's CSS/CSO the same way.
    r.xmit_legacy(&f, Some((34, 50)), None);
    let (h, g) = peer_finishes(&r.peer.take_sent()[0]);
    assert_eq!((h.csum_start, h.csum_offset), (34, 16));
    assert!(checksums_ok(&g));
}

#[test]
fn vlan_insert_and_strip() {
    let mut r = opened();
    let ctrl = r.r(CTRL);
    r.w(CTRL, ctrl | CTRL_VME);
    let f = eth(PEER, 0x0800, 100);
    r.xmit_legacy(&f, None, Some(0x2005));
    let s = &r.peer.take_sent()[0];
    assert_eq!(&s[12..16], &[0x81, 0x00, 0x20, 0x05]);
    assert_eq!(&s[16..], &f[12..]);
    // TSO with a tag: every segment tagged, checksums still right.
    let mut t = tcp4(PEER, 4000);
    tso_prep(&mut t);
    r.xmit_tso(&t, 14, 34, 54, 1000, Some(7));
    let segs = r.peer.take_sent();
    assert_eq!(segs.len(), 4);
    for s in &segs {
        assert_eq!(&s[12..16], &[0x81, 0x00, 0x00, 0x07]);
        assert!(checksums_ok(s));
    }
    // Receive: the tag is stripped into the descriptor.
    let mut tagged = MAC.to_vec();
    tagged.extend_from_slice(&PEER);
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x64, 0x08, 0x06]);
    tagged.extend_from_slice(&[1; 46]);
    r.inject(&[&tagged]);
    let got = r.rx_poll();
    assert_eq!(got[0].special, 100);
    assert_ne!(got[0].status & RXD_STAT_VP, 0);
    assert_eq!(&got[0].data[12..14], &[0x08, 0x06]);
    assert_eq!(got[0].data.len(), 60);
    // VLAN filtering: VID 100 not in VFTA is dropped; once set, accepted.
    let rctl = r.r(RCTL);
    r.w(RCTL, rctl | RCTL_VFE);
    r.inject(&[&tagged]);
    assert!(r.rx_poll().is_empty());
    r.w(VFTA + 4 * (100 >> 5), 1 << (100 & 31));
    r.inject(&[&tagged]);
    assert_eq!(r.rx_poll().len(), 1);
    // Without VME the tag stays in the frame.
    r.w(CTRL, ctrl);
    r.inject(&[&tagged]);
    let got = r.rx_poll();
    assert_eq!(got[0].status & RXD_STAT_VP, 0);
    assert_eq!(got[0].data, tagged);
}

#[test]
fn receive_filters() {
    let mut r = opened();
    let other = [0x52, 0x54, 0, 1, 2, 3];
    let mcast = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
    let bcast = [0xff; 6];
    let frames = |d| vec![eth(d, 0x0800, 100)];
    r.inject(&frames(MAC));
    let got = r.rx_poll();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, frames(MAC)[0]);
    assert_eq!(
        got[0].status & (RXD_STAT_DD | RXD_STAT_EOP),
        RXD_STAT_DD | RXD_STAT_EOP
    );
    r.inject(&frames(other));
    assert!(r.rx_poll().is_empty(), "another MAC is filtered");
    r.inject(&frames(bcast));
    assert_eq!(r.rx_poll().len(), 1, "broadcast with BAM");
    r.inject(&frames(mcast));
    assert!(r.rx_poll().is_empty(), "multicast not in the MTA");
    let h = mta_hash(mcast);
    r.w(MTA + 4 * (h as usize >> 5), 1 << (h & 31));
    r.inject(&frames(mcast));
    assert_eq!(r.rx_poll().len(), 1, "multicast via the MTA hash");
    // A second exact address in RAR 3.
    r.w(RAL0 + 24, u32::from_le_bytes([0x52, 0x54, 0, 1]));
    r.w(RAH0 + 24, 0x0302 | RAH_AV);
    r.inject(&frames(other));
    assert_eq!(r.rx_poll().len(), 1, "RAR 3");
    r.w(RAH0 + 24, 0);
    // Broadcast without BAM is dropped; promiscuous takes everything.
    r.w(RCTL, RCTL_EN);
    r.inject(&frames(bcast));
    assert!(r.rx_poll().is_empty());
    r.w(RCTL, RCTL_EN | RCTL_UPE | RCTL_MPE);
    r.inject(&[
        frames(other)[0].clone(),
        eth([0x33, 0x33, 0, 0, 0, 1], 0x86dd, 60),
    ]);
    assert_eq!(r.rx_poll().len(), 2);
    assert_eq!(r.r(BPRC), 1);
    assert_eq!(r.r(MPRC), 2);
    assert_eq!(r.r(GPRC), 6);
    assert_eq!(r.r(TPR), 9);
}

#[test]
fn receive_long_frame_over_descriptors() {
    let mut r = opened();
    let big = eth(MAC, 0x0800, 5000);
    r.inject(&[&big]);
    assert!(r.rx_poll().is_empty(), "too long without LPE");
    assert_eq!(r.r(ROC), 1);
    r.w(RCTL, RCTL_EN | RCTL_BAM | RCTL_LPE);
    r.inject(&[&big]);
    let got = r.rx_poll();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].descs, 3, "5014 + FCS over 2048-byte buffers");
    assert_eq!(got[0].data, big);
    // The FCS is the CRC-32 of the frame (residue check).
    let mut all = big.clone();
    all.extend_from_slice(&got[0].fcs.unwrap());
    assert_eq!(super::rx::crc32_of(&all), 0x2144_df1c);
    // 1024-byte buffers: the same frame needs five.
    r.w(RCTL, RCTL_EN | RCTL_LPE | 1 << RCTL_BSIZE_SHIFT);
    r.inject(&[&big]);
    let got = r.rx_poll();
    assert_eq!(got[0].descs, 5);
    // SECRC: no FCS in the buffers.
    r.w(RCTL, RCTL_EN | RCTL_LPE | RCTL_SECRC);
    r.inject(&[&big]);
    let got = r.rx_poll();
    assert_eq!(got[0].data, big);
    assert_eq!(got[0].fcs, None);
}

#[test]
fn receive_checksum_reporting() {
    let mut r = opened();
    let good = tcp4(MAC, 200);
    let mut bad_tcp = good.clone();
    bad_tcp[100] ^= 0xff;
    let mut bad_ip = good.clone();
    bad_ip[22] ^= 1; // TTL
    r.inject(&[good.clone(), bad_tcp, bad_ip, eth(MAC, 0x0806, 28)]);
    let got = r.rx_poll();
    let both = RXD_STAT_IPCS | RXD_STAT_TCPCS;
    assert_eq!((got[0].status & both, got[0].errors), (both, 0));
    assert_eq!((got[1].status & both, got[1].errors), (both, RXD_ERR_TCPE));
    assert_eq!(got[2].errors & RXD_ERR_IPE, RXD_ERR_IPE);
    assert_eq!(
        got[3].status & (both | RXD_STAT_IXSM),
        0,
        "not IP: nothing checked"
    );
    r.w(RXCSUM, 0);
    r.inject(&[good]);
    let got = r.rx_poll();
    assert_eq!(got[0].status & (both | RXD_STAT_IXSM), RXD_STAT_IXSM);
}

/// Full-size frames, whose transport sum is taken in the FCS's pass (on CPUs with the wide
/// kernel): a byte flipped in the segment's first partial block, in a whole block, in the
/// last byte, or the two bytes of a word swapped (a sum that paired bytes wrongly would miss
/// it) is reported, a good frame is not, and the FCS still checks.
#[test]
fn full_size_checksums_are_verified_in_the_fcs_pass() {
    let mut r = opened();
    let both = RXD_STAT_IPCS | RXD_STAT_TCPCS;
    for payload in [1460, 1461, 700] {
        let good = tcp4(MAC, payload);
        let mut frames = vec![good.clone()];
        for at in [40, 54, 700, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            frames.push(bad);
        }
        let mut swapped = good.clone();
        swapped.swap(100, 101);
        frames.push(swapped);
        r.inject(&frames);
        let got = r.rx_poll();
        assert_eq!(got.len(), frames.len());
        assert_eq!(
            (got[0].status & both, got[0].errors),
            (both, 0),
            "{payload}"
        );
        let mut all = good.clone();
        all.extend_from_slice(&got[0].fcs.unwrap());
        assert_eq!(super::rx::crc32_of(&all), 0x2144_df1c);
        for (i, g) in got.iter().enumerate().skip(1) {
            assert_eq!(
                g.errors & RXD_ERR_TCPE,
                RXD_ERR_TCPE,
                "{payload}: frame {i}"
            );
            assert_eq!(g.data, frames[i]);
        }
    }
}

#[test]
fn interrupt_cause_and_mask() {
    let mut r = opened();
    r.w(ICS, ICR_RXT0);
    assert!(r.irq());
    assert_eq!(r.r(IMS), IMS_ENABLE_MASK);
    assert_eq!(r.r(ICR), ICR_RXT0);
    assert!(!r.irq());
    assert_eq!(r.r(ICR), 0, "read to clear");
    // A cause that is masked does not assert, and asserts once unmasked.
    r.w(ICS, ICR_MDAC);
    assert!(!r.irq());
    r.w(IMS, ICR_MDAC);
    assert!(r.irq());
    r.w(IMC, ICR_MDAC);
    assert!(!r.irq(), "IMC masks the line");
    assert_eq!(r.r(ICR), ICR_MDAC);
    // PCI INTx disable keeps the line low but the status bit still shows it.
    r.dev.config_mut().write(
        crate::pci::PCI_COMMAND,
        &(0x7 | PCI_COMMAND_INTX_DISABLE).to_le_bytes(),
    );
    r.dev.config_written(crate::pci::PCI_COMMAND, 2);
    r.w(ICS, ICR_RXT0);
    assert!(!r.irq());
    assert_ne!(
        r.dev.config().get16(crate::pci::PCI_STATUS) & crate::pci::PCI_STATUS_INTERRUPT,
        0
    );
    r.dev
        .config_mut()
        .write(crate::pci::PCI_COMMAND, &0x7u16.to_le_bytes());
    r.dev.config_written(crate::pci::PCI_COMMAND, 2);
    assert!(r.irq());
    let _ = r.r(ICR);
    assert_eq!(
        r.dev.config().get16(crate::pci::PCI_STATUS) & crate::pci::PCI_STATUS_INTERRUPT,
        0
    );
}

#[test]
fn itr_spaces_interrupts() {
    let mut r = opened();
    // 20 ms between interrupts.
    r.w(ITR, 20_000_000 / 256);
    // The LSC of open was the last interrupt; let its interval pass.
    std::thread::sleep(Duration::from_millis(25));
    let before = r.dev.stats().interrupts;
    r.w(ICS, ICR_RXT0);
    assert!(r.irq());
    let _ = r.r(ICR);
    r.w(ICS, ICR_TXDW);
    assert!(!r.irq(), "held back by ITR");
    r.dev.handle(NetEvent::Timer);
    assert!(!r.irq(), "an early wakeup does not deliver it");
    std::thread::sleep(Duration::from_millis(25));
    r.dev.handle(NetEvent::Timer);
    assert!(r.irq(), "delivered when the interval is over");
    assert_eq!(r.r(ICR), ICR_TXDW);
    assert_eq!(r.dev.stats().interrupts - before, 2);
    // ITR 0: no throttling.
    r.w(ITR, 0);
    for _ in 0..3 {
        r.w(ICS, ICR_RXT0);
        assert!(r.irq());
        let _ = r.r(ICR);
    }
}

/// Ticks of 1.024 us for `ms` milliseconds.
fn ms_ticks(ms: u64) -> u32 {
    (ms * 1_000_000 / 1024) as u32
}

#[test]
fn tx_interrupt_delay_tidv_tadv_and_ide() {
    let mut r = opened();
    let _ = r.r(ICR);
    let f = eth(PEER, 0x0800, 100);
    // Without IDE, TXDW comes with the write-back whatever TIDV says.
    r.tx_ide = false;
    r.w(TIDV, ms_ticks(60));
    r.w(TADV, 0);
    r.xmit_legacy(&f, None, None);
    assert!(r.irq());
    assert_ne!(r.r(ICR) & ICR_TXDW, 0);

    // With IDE: the descriptor is done at once, TXDW waits for TIDV.
    r.tx_ide = true;
    let t0 = Instant::now();
    r.xmit_legacy(&f, None, None);
    assert_eq!(r.tx_done(), 2);
    assert!(!r.irq(), "TXDW held back by TIDV");
    assert_eq!(r.r(ICR) & ICR_TXDW, 0);
    // Another frame 40 ms later restarts the packet timer: not due at t0 + 60 ms.
    std::thread::sleep(Duration::from_millis(40));
    let t1 = Instant::now();
    r.xmit_legacy(&f, None, None);
    std::thread::sleep(Duration::from_millis(25));
    r.dev.handle(NetEvent::Timer);
    if t1.elapsed() < Duration::from_millis(55) {
        assert!(
            !r.irq(),
            "TIDV restarts with each frame ({:?} after the first)",
            t0.elapsed()
        );
    }
    assert!(r.run_timer());
    assert!(r.irq(), "TXDW once TIDV ran out");
    assert!(t1.elapsed() >= Duration::from_millis(60));
    assert_ne!(r.r(ICR) & ICR_TXDW, 0);

    // TADV bounds the wait from the first frame whatever TIDV does.
    r.w(TADV, ms_ticks(20));
    let t0 = Instant::now();
    r.xmit_legacy(&f, None, None);
    assert!(!r.irq());
    assert!(r.run_timer());
    assert!(r.irq(), "TXDW when TADV ran out");
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(20), "{waited:?}");
    let _ = r.r(ICR);

    // FPD in a TIDV write flushes a waiting TXDW.
    r.w(TADV, 0);
    r.xmit_legacy(&f, None, None);
    assert!(!r.irq());
    r.w(TIDV, ms_ticks(60) | DELAY_FPD);
    assert!(r.irq(), "FPD raises the delayed TXDW now");
    assert_ne!(r.r(ICR) & ICR_TXDW, 0);
    assert_eq!(r.r(TIDV), ms_ticks(60), "FPD is not stored");
}

#[test]
fn rx_interrupt_delay_rdtr_radv() {
    let mut r = opened();
    let _ = r.r(ICR);
    let f = eth(MAC, 0x0800, 100);
    // RDTR 0 (Linux's default): RXT0 with the frame.
    r.inject(std::slice::from_ref(&f));
    assert!(r.irq());
    assert_ne!(r.r(ICR) & ICR_RXT0, 0);
    assert_eq!(r.rx_poll().len(), 1);

    // RDTR set: the frame is in memory at once, RXT0 waits.
    r.w(RDTR, ms_ticks(20));
    r.w(RADV, 0);
    let t0 = Instant::now();
    r.inject(std::slice::from_ref(&f));
    assert_eq!(r.rx_poll().len(), 1);
    assert!(!r.irq(), "RXT0 held back by RDTR");
    assert!(r.run_timer());
    assert!(r.irq());
    assert!(t0.elapsed() >= Duration::from_millis(20));
    assert_ne!(r.r(ICR) & ICR_RXT0, 0);

    // RADV caps the delay a stream of frames could otherwise stretch.
    r.w(RDTR, ms_ticks(60));
    r.w(RADV, ms_ticks(20));
    let t0 = Instant::now();
    r.inject(std::slice::from_ref(&f));
    assert!(!r.irq());
    assert!(r.run_timer());
    assert!(r.irq(), "RXT0 when RADV ran out");
    assert!(t0.elapsed() >= Duration::from_millis(20));
    let _ = r.r(ICR);

    // FPD flushes.
    r.w(RADV, 0);
    r.inject(std::slice::from_ref(&f));
    assert!(!r.irq());
    r.w(RDTR, ms_ticks(60) | DELAY_FPD);
    assert!(r.irq());
    assert_ne!(r.r(ICR) & ICR_RXT0, 0);

    // A reset forgets a waiting cause.
    r.inject(std::slice::from_ref(&f));
    assert!(!r.irq());
    r.w(CTRL, CTRL_RST);
    std::thread::sleep(Duration::from_millis(70));
    r.dev.handle(NetEvent::Timer);
    assert_eq!(r.r(ICR), 0, "nothing left over from before the reset");
}

#[test]
fn statistics_read_to_clear() {
    let mut r = opened();
    r.inject(&[eth(MAC, 0x0800, 100), eth([0xff; 6], 0x0806, 28)]);
    assert_eq!(r.rx_poll().len(), 2);
    r.xmit_legacy(&eth(PEER, 0x0800, 1000), None, None);
    assert_eq!(r.r(GPRC), 2);
    assert_eq!(r.r(GPRC), 0);
    assert_eq!(r.r(PRC64), 1);
    assert_eq!(r.r(PRC64 + 4), 1, "PRC127");
    assert_eq!(r.r(GORCL), 118 + 64);
    assert_eq!(r.r(GORCH), 0);
    assert_eq!(r.r(GORCL), 0, "the high half clears the pair");
    assert_eq!(r.r(TORL), 118 + 64);
    assert_eq!(r.r(PTC64 + 16), 1, "PTC1023");
    assert_eq!(r.r(GOTCL), 1018);
    let _ = r.r(GOTCH);
    assert_eq!(r.r(GOTCL), 0);
    // Every counter register reads sanely (ethtool -S walks them) and clears.
    for off in (STATS_START..STATS_END).step_by(4) {
        let _ = r.r(off);
    }
    for off in (STATS_START..STATS_END).step_by(4) {
        assert_eq!(r.r(off), 0, "{off:#x}");
    }
    r.w(GPRC, 5);
    assert_eq!(r.r(GPRC), 0, "counters are read-only");
}

#[test]
fn rx_flow_control() {
    let mut r = rig();
    r.rx_count = 8;
    r.probe();
    r.open();
    let frames: Vec<_> = (0..10).map(|i| eth(MAC, 0x0800, 100 + i)).collect();
    let interest = r.inject(&frames);
    assert!(!interest.readable, "ring full: stop reading the backend");
    assert_eq!(r.peer.pending(), 2, "7 delivered, 1 waiting in the model");
    assert_eq!(r.r(RNBC), 1);
    let all = ICR_RXO | ICR_RXT0 | ICR_RXDMT0;
    assert_eq!(
        r.r(ICR) & all,
        all,
        "overrun, frames, ring below its threshold"
    );
    let got = r.rx_poll(); // writes RDT
    assert_eq!(got.len(), 7);
    assert!(
        r.dev.port.rx_kick_fd(0).unwrap().read().is_ok(),
        "RDT on a stalled ring kicks the I/O thread"
    );
    let interest = r.rx_kick();
    assert!(interest.readable);
    let got = r.rx_poll();
    assert_eq!(got.len(), 3);
    for (g, f) in got.iter().zip(&frames[7..]) {
        assert_eq!(&g.data, f);
    }
    assert_eq!(r.dev.stats().rx_frames, 10);
}

/// A frame the device copied out waits in the port while the backend is full, its
/// descriptor done (as QEMU's e1000 leaves a packet in its net queue); frames behind it keep
/// their descriptors until the backend drains, and then all go, in order.
#[test]
fn tx_would_block_then_resumes() {
    let mut r = opened();
    r.ctl.budget.store(0, Ordering::SeqCst);
    let f = eth(PEER, 0x0800, 200);
    r.xmit_legacy(&f, None, None);
    assert!(r.peer.take_sent().is_empty());
    assert_eq!(r.tx_done(), 1, "reported sent, waiting in the port");
    let g = eth(PEER, 0x0800, 300);
    r.xmit_legacy(&g, None, None);
    assert_eq!(r.r(TDH), 1, "descriptors kept behind a full backend");
    assert_eq!(r.tx_done(), 0);
    let i = r.dev.handle(NetEvent::TxKick);
    assert!(i.writable, "asks to hear when the backend drains");
    assert!(
        r.dev.port.tx_kick_fd(0).unwrap().read().is_err(),
        "a retry that blocks again does not re-kick"
    );
    let i = r.dev.handle(NetEvent::Backend);
    assert!(i.writable, "still full");
    r.ctl.budget.store(usize::MAX, Ordering::SeqCst);
    let i = r.dev.handle(NetEvent::Backend);
    assert!(!i.writable);
    assert_eq!(r.peer.take_sent(), vec![f, g]);
    assert_eq!(r.tx_done(), 1);
    // A TSO frame blocked half-way resumes without repeating segments.
    let mut t = tcp4(PEER, 10_000);
    tso_prep(&mut t);
    r.ctl.budget.store(3, Ordering::SeqCst);
    r.xmit_tso(&t, 14, 34, 54, 1448, None);
    assert_eq!(r.peer.take_sent().len(), 3);
    r.ctl.budget.store(usize::MAX, Ordering::SeqCst);
    r.dev.handle(NetEvent::Backend);
    let rest = r.peer.take_sent();
    assert_eq!(rest.len(), 4);
    let seq = u32::from_be_bytes(rest[0][38..42].try_into().unwrap());
    assert_eq!(seq, 1000 + 3 * 1448);
    assert_eq!(r.tx_done(), 1);
}

/// Doorbells coalesce: each TDT write's frame waits in the port, the first write asks the
/// I/O thread for a turn, and that turn hands all of them to the backend in one batch.
#[test]
fn tx_doorbells_rung_before_the_io_thread_wakes_go_in_one_batch() {
    let mut r = opened();
    let frames: Vec<Vec<u8>> = (0..10).map(|i| eth(PEER, 0x0800, 100 + i)).collect();
    let kick = r.dev.port.tx_kick_fd(0).unwrap().try_clone().unwrap();
    for f in &frames {
        r.queue_legacy(f, None, None);
        let tail = r.tx_next() as u32;
        r.w_only(TDT, tail);
    }
    assert!(r.peer.take_sent().is_empty(), "nothing sent on the vCPU");
    assert_eq!(r.tx_done(), 10, "each reported sent");
    assert_eq!(kick.read().unwrap(), 1, "one kick for the I/O thread");
    let _ = kick.write(1);
    r.dev.run_flush_kicks();
    assert_eq!(r.peer.take_sent(), frames);
    assert_eq!(r.ctl.batches.load(Ordering::SeqCst), 1);
}

/// Copied frames go to the backend together, at the end of the walk: one batch for all of
/// them. With the backend full, the port holds a bounded number of them (their descriptors
/// done); the rest keep their descriptors until it drains.
#[test]
fn tx_copies_go_together_and_wait_in_the_port_within_a_bound() {
    let mut r = opened();
    let frames: Vec<Vec<u8>> = (0..10).map(|i| eth(PEER, 0x0800, 100 + i)).collect();
    for f in &frames {
        r.queue_legacy(f, None, None);
    }
    r.kick_tx();
    assert_eq!(r.peer.take_sent(), frames);
    assert_eq!(
        r.ctl.batches.load(Ordering::SeqCst),
        1,
        "one batch for the walk"
    );
    assert_eq!(r.tx_done(), 10);

    r.ctl.budget.store(0, Ordering::SeqCst);
    let frames: Vec<Vec<u8>> = (0..70).map(|i| eth(PEER, 0x0800, 100 + i)).collect();
    for f in &frames {
        r.queue_legacy(f, None, None);
    }
    r.kick_tx();
    assert!(r.peer.take_sent().is_empty());
    assert_eq!(r.tx_done(), 64, "the port holds 64");
    r.ctl.budget.store(usize::MAX, Ordering::SeqCst);
    r.dev.handle(NetEvent::Backend);
    assert_eq!(r.peer.take_sent(), frames, "all of them, in order");
    assert_eq!(r.tx_done(), 6);
    assert_eq!(r.dev.stats().tx_frames, 80);
}

/// The device sends and receives again after e1000_reset (reset_hw, init_hw, open).
fn recovers(r: &mut Rig) {
    r.reset_hw();
    r.init_hw(MacAddr(MAC));
    r.open();
    let f = eth(PEER, 0x0800, 64);
    r.xmit_legacy(&f, None, None);
    assert_eq!(r.peer.take_sent(), vec![f], "TX works after reset");
    let g = eth(MAC, 0x0800, 64);
    r.inject(&[&g]);
    assert_eq!(r.rx_poll()[0].data, g, "RX works after reset");
}

#[test]
fn hostile_ring_addresses() {
    let mut r = opened();
    r.w(TDBAL, 0xfff0_0000);
    r.w(TDBAH, 0x10);
    r.xmit_legacy(&eth(PEER, 0x0800, 64), None, None);
    assert!(r.peer.take_sent().is_empty());
    assert!(r.dev.tx_error);
    recovers(&mut r);
    r.w(RDBAL, 0xfff0_0000);
    let i = r.inject(&[eth(MAC, 0x0800, 64)]);
    assert!(!i.readable && r.dev.rx_error);
    recovers(&mut r);
    // Bases at the very top of the address space.
    r.w(TDBAH, !0);
    r.w(TDBAL, !0);
    r.xmit_legacy(&eth(PEER, 0x0800, 64), None, None);
    assert!(r.dev.tx_error);
    r.w(RDBAH, !0);
    r.w(RDBAL, !0);
    r.inject(&[eth(MAC, 0x0800, 64)]);
    assert!(r.dev.rx_error);
    recovers(&mut r);
}

#[test]
fn hostile_head_tail_and_zero_rings() {
    let mut r = opened();
    r.w(TDT, 5000);
    assert!(r.dev.tx_error, "TDT beyond TDLEN");
    recovers(&mut r);
    r.w(TDLEN, 0);
    let head = r.r(TDH);
    r.w(TDT, head + 1);
    assert!(r.dev.tx_error, "zero-length TX ring");
    recovers(&mut r);
    r.w(TDLEN, 100);
    assert_eq!(r.r(TDLEN), 0, "ring lengths are multiples of 128");
    recovers(&mut r);
    r.w(RDLEN, 0);
    r.inject(&[eth(MAC, 0x0800, 64)]);
    assert!(r.dev.rx_error, "zero-length RX ring with RDH != RDT");
    recovers(&mut r);
    r.w(RDH, 300);
    r.inject(&[eth(MAC, 0x0800, 64)]);
    assert!(r.dev.rx_error, "RDH beyond RDLEN");
    recovers(&mut r);
}

#[test]
fn hostile_descriptor_chains() {
    let mut r = opened();
    // A ring full of context descriptors: consumed, nothing sent, no hang.
    for _ in 0..RING_SIZE - 1 {
        r.put_tx_desc(Driver::context_desc(
            14, 24, 33, 34, 50, 0, TXD_CMD_RS, 0, 54, 1448,
        ));
    }
    r.kick_tx();
    assert_eq!(r.r(TDH), r.r(TDT));
    assert!(r.peer.take_sent().is_empty());
    recovers(&mut r);
    // Data descriptors without EOP, 16 KiB each: past the largest frame the ring stops.
    for i in 0..RING_SIZE - 1 {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&(TX_BUFS + (i % 4) as u64 * 16384).to_le_bytes());
        d[8..10].copy_from_slice(&16384u16.to_le_bytes());
        r.put_tx_desc(d);
    }
    r.kick_tx();
    assert!(r.dev.tx_error);
    assert!(r.peer.take_sent().is_empty());
    recovers(&mut r);
    // An incomplete frame (no EOP yet) waits without error, and goes when completed.
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&TX_BUFS.to_le_bytes());
    d[8..10].copy_from_slice(&100u16.to_le_bytes());
    let head = r.r(TDH);
    r.put_tx_desc(d);
    r.kick_tx();
    assert_eq!(r.r(TDH), head);
    assert!(!r.dev.tx_error);
    d[11] = TXD_CMD_EOP | TXD_CMD_RS;
    r.put_tx_desc(d);
    r.kick_tx();
    assert_eq!(r.peer.take_sent()[0].len(), 200);
    // A buffer outside guest memory.
    d[..8].copy_from_slice(&(MEM_SIZE as u64 - 10).to_le_bytes());
    r.put_tx_desc(d);
    r.kick_tx();
    assert!(r.dev.tx_error);
    recovers(&mut r);
    // An RX buffer outside guest memory.
    let mut rd = [0u8; 16];
    rd[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let head = r.r(RDH) as u64;
    r.mem
        .write_slice(&rd, GuestAddress(RX_RING + 16 * head))
        .unwrap();
    r.inject(&[eth(MAC, 0x0800, 64)]);
    assert!(r.dev.rx_error);
    recovers(&mut r);
}

/// Context descriptors in the middle of a frame count as the frame's descriptors: a frame
/// spread over more than a walk takes stops the ring. (They did not count: the walk ran out
/// of budget without a frame sent, asked the I/O thread for another, which walked the same
/// descriptors again, for ever.)
#[test]
fn a_frame_padded_with_context_descriptors_stops_the_ring() {
    let mut r = opened();
    r.configure_tx(512);
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&TX_BUFS.to_le_bytes());
    d[8..10].copy_from_slice(&60u16.to_le_bytes());
    r.put_tx_desc(d); // data, no EOP
    for _ in 0..299 {
        r.put_tx_desc(Driver::context_desc(
            14, 24, 33, 34, 50, 0, TXD_CMD_RS, 0, 54, 1448,
        ));
    }
    r.kick_tx();
    for _ in 0..4 {
        r.dev.run_kicks();
    }
    assert!(r.dev.tx_error, "the ring is stopped");
    assert!(r.peer.take_sent().is_empty());
    // Nothing asks for another walk: the I/O thread sleeps.
    assert!(
        r.dev.port.tx_kick_fd(0).unwrap().read().is_err(),
        "no kick left"
    );
    recovers(&mut r);
}

#[test]
fn hostile_tso_context() {
    let mut r = opened();
    let t = tcp4(PEER, 500);
    // HDRLEN beyond the data.
    r.xmit_tso(&t[..100], 14, 34, 200, 1448, None);
    assert!(r.peer.take_sent().is_empty());
    assert_eq!(r.tx_done(), 1, "dropped, descriptors completed");
    assert_eq!(r.r(TSCTFC), 1);
    // TCP header offset before the end of the IP header; MSS 0.
    r.xmit_tso(&t, 14, 20, 54, 1448, None);
    r.xmit_tso(&t, 14, 34, 54, 0, None);
    assert!(r.peer.take_sent().is_empty());
    assert_eq!(r.r(TSCTFC), 2);
    assert!(!r.dev.tx_error);
    let f = eth(PEER, 0x0800, 64);
    r.xmit_legacy(&f, None, None);
    assert_eq!(r.peer.take_sent(), vec![f]);
}

#[test]
fn backend_with_vnet_header() {
    // A tap opened with IFF_VNET_HDR: the model adds an empty header going out and skips
    // the header coming in.
    let caps = Capabilities {
        vnet_hdr: true,
        offloads: net_backends::Offloads::ALL,
    };
    let (b, peer) = pair(caps);
    let mut d = Driver::new(Box::new(b));
    d.probe();
    d.open();
    // Offloads someone else turned on for frames to us are turned off: the header that would
    // describe them is stripped.
    assert_eq!(peer.rx_offloads(), Some(net_backends::Offloads::default()));
    let f = eth(PEER, 0x0800, 100);
    d.xmit_legacy(&f, None, None);
    let sent = peer.take_sent();
    assert_eq!(&sent[0][..VNET_HDR], &[0; VNET_HDR]);
    assert_eq!(&sent[0][VNET_HDR..], &f[..]);
    let g = eth(MAC, 0x0800, 100);
    let mut with_hdr = vec![0u8; VNET_HDR];
    with_hdr.extend_from_slice(&g);
    peer.inject(&with_hdr);
    d.dev.handle(NetEvent::Backend);
    assert_eq!(d.rx_poll()[0].data, g);
}

// ---- snapshot and restore -----------------------------------------------------------------

impl Rig {
    /// Saves the device and carries on with a new one restored on a copy of guest memory and
    /// a new backend (link up, no send limit), as `migrate` to a file and `-incoming` do.
    fn migrate(&mut self) {
        let (inner, peer) = pair(Capabilities::default());
        let ctl = Arc::new(Ctl {
            link: AtomicBool::new(true),
            budget: AtomicUsize::new(usize::MAX),
            batches: AtomicUsize::new(0),
        });
        let b = TestBackend {
            inner,
            ctl: ctl.clone(),
        };
        self.d.migrate(Box::new(b)).expect("restores");
        self.peer = peer;
        self.ctl = ctl;
    }

    /// Restore of `state` into a new device fails, naming `what`; the old device stays.
    fn refused(&mut self, state: &serde_json::Value, what: &str) {
        let (b, _peer) = pair(Capabilities::default());
        let e = self.d.restore_into_new(Box::new(b), state).unwrap_err();
        assert!(e.0.contains(what), "{what}: {e}");
    }

    /// The state as saved with `edit` applied to the model's part.
    fn edited(&self, edit: impl FnOnce(&mut serde_json::Value)) -> serde_json::Value {
        let mut s = self.dev.save();
        edit(&mut s["model"]);
        s
    }
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

/// One frame each way; both arrive byte for byte and the receive interrupt comes.
fn one_each_way(r: &mut Rig, i: usize) {
    let t = eth(PEER, 0x0800, 46 + (i * 7) % 1400);
    r.xmit_legacy(&t, None, None);
    assert_eq!(r.peer.take_sent(), vec![t], "frame {i} out");
    let g = eth(MAC, 0x0800, 46 + (i * 11) % 1400);
    r.inject(&[&g]);
    assert!(r.irq(), "interrupt for frame {i}");
    let got = r.rx_poll();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, g, "frame {i} in");
    assert_eq!(r.tx_done(), 1);
    let _ = r.r(ICR);
}

#[test]
fn snapshot_mid_stream_continues() {
    let mut r = opened();
    r.tx_ide = false;
    for i in 0..300 {
        one_each_way(&mut r, i);
    }
    // Mid-stream: frames in the ring the driver has not cleaned, a frame sent whose
    // descriptor it has not looked at, the interrupt pending, ring indexes away from zero.
    let frames: Vec<_> = (0..3).map(|i| eth(MAC, 0x0800, 100 + i)).collect();
    r.inject(&frames);
    let t = eth(PEER, 0x0800, 500);
    r.xmit_legacy(&t, None, None);
    assert_eq!(r.peer.take_sent(), vec![t]);
    let regs = [RDH, RDT, TDH, TDT, IMS, RCTL, TCTL, RDLEN, TDLEN].map(|o| r.r(o));
    assert!(r.irq());

    r.migrate();
    assert!(r.irq(), "the asserted line is asserted again");
    assert_eq!(
        [RDH, RDT, TDH, TDT, IMS, RCTL, TCTL, RDLEN, TDLEN].map(|o| r.r(o)),
        regs
    );
    assert_ne!(r.r(STATUS) & STATUS_LU, 0, "link up");
    assert_eq!(
        r.ee_read_eerd(0),
        Some(u16::from_le_bytes([MAC[0], MAC[1]]))
    );
    let got = r.rx_poll();
    assert_eq!(
        got.iter().map(|g| g.data.clone()).collect::<Vec<_>>(),
        frames
    );
    assert_eq!(r.tx_done(), 1);
    let _ = r.r(ICR);
    assert!(!r.irq());
    // Both rings go round again from where they stood.
    for i in 0..300 {
        one_each_way(&mut r, i);
    }
    assert_eq!(r.dev.port.guest_errors(), 0);
}

#[test]
fn pending_transmit_completes_after_restore() {
    let mut r = opened();
    r.tx_ide = false;
    r.ctl.budget.store(0, Ordering::SeqCst);
    let first = eth(PEER, 0x0800, 100);
    r.xmit_legacy(&first, None, None);
    assert_eq!(r.tx_done(), 1, "reported sent, waiting in the port");
    let f = eth(PEER, 0x0800, 200);
    r.xmit_legacy(&f, None, None);
    assert!(r.peer.take_sent().is_empty());
    assert_eq!(r.tx_done(), 0, "the driver waits for it");
    let _ = r.r(ICR);

    r.migrate();
    // The frame reported sent was lost with the old backend, as a wire may lose it.
    assert_eq!(r.peer.take_sent(), vec![f], "sent without a new doorbell");
    assert_eq!(r.tx_done(), 1);
    assert!(r.irq());
    assert_ne!(r.r(ICR) & ICR_TXDW, 0);

    // Two TSO frames of 42 segments with the backend full: the port takes the first one's
    // and 22 of the second's (64 in all), and the second keeps its descriptors; after a
    // restore it goes on from its 23rd segment.
    let mut t = tcp4(PEER, 60_000);
    tso_prep(&mut t);
    r.ctl.budget.store(0, Ordering::SeqCst);
    r.queue_tso(&t, 14, 34, 54, 1448, None);
    r.queue_tso(&t, 14, 34, 54, 1448, None);
    r.kick_tx();
    assert!(r.peer.take_sent().is_empty());
    assert_eq!(r.tx_done(), 1, "the first is reported sent");
    r.migrate();
    let rest = r.peer.take_sent();
    assert_eq!(rest.len(), 42 - 22);
    let seq = u32::from_be_bytes(rest[0][38..42].try_into().unwrap());
    assert_eq!(seq, 1000 + 22 * 1448);
    assert_eq!(r.tx_done(), 1);
}

#[test]
fn delay_timers_and_itr_survive_restore() {
    let mut r = opened();
    let _ = r.r(ICR);
    // TXDW held back by TIDV: delivered by the restored device's timer.
    r.tx_ide = true;
    r.w(TIDV, ms_ticks(30));
    r.w(TADV, 0);
    r.xmit_legacy(&eth(PEER, 0x0800, 100), None, None);
    assert!(!r.irq());
    r.migrate();
    assert!(!r.irq(), "still held back");
    assert!(r.run_timer(), "the restored timer fires");
    assert!(r.irq());
    assert_eq!(r.r(ICR) & ICR_TXDW, ICR_TXDW);

    // An assertion ITR holds back is delivered after restore when the interval is over.
    r.w(ITR, 20_000_000 / 256);
    std::thread::sleep(Duration::from_millis(25));
    r.w(ICS, ICR_RXT0);
    assert!(r.irq());
    let _ = r.r(ICR);
    r.w(ICS, ICR_TXDW);
    assert!(!r.irq(), "held back by ITR");
    r.migrate();
    assert!(!r.irq(), "still held back");
    assert!(r.run_timer());
    assert!(r.irq(), "delivered when the interval is over");
}

#[test]
fn never_ran_device_restores_and_then_works() {
    let mut r = rig();
    let saved = timeless(r.dev.save());
    r.migrate();
    assert_eq!(timeless(r.dev.save()), saved, "the same state again");
    r.probe();
    r.open();
    let _ = r.r(ICR);
    one_each_way(&mut r, 0);
}

#[test]
fn restored_state_saves_the_same() {
    let mut r = opened();
    for i in 0..10 {
        one_each_way(&mut r, i);
    }
    r.inject(&[eth(MAC, 0x0800, 100)]);
    let saved = timeless(r.dev.save());
    r.migrate();
    assert_eq!(timeless(r.dev.save()), saved);
}

#[test]
fn hostile_states_are_refused() {
    let mut r = opened();
    let bad = r.edited(|m| m["regs"][TDH / 4] = 0x1_0000.into());
    r.refused(&bad, "TDH");
    let bad = r.edited(|m| m["regs"][RDT / 4] = 0xdead_0000u32.into());
    r.refused(&bad, "RDT");
    let bad = r.edited(|m| m["regs"][RDLEN / 4] = 0x10.into());
    r.refused(&bad, "RDLEN");
    let bad = r.edited(|m| m["regs"][ICR / 4] = 0xffff_ffffu32.into());
    r.refused(&bad, "ICR");
    let bad = r.edited(|m| {
        m["regs"].as_array_mut().unwrap().truncate(100);
    });
    r.refused(&bad, "registers");
    let bad = r.edited(|m| {
        m["eeprom"]["words"].as_array_mut().unwrap().pop();
    });
    r.refused(&bad, "EEPROM");
    let bad = r.edited(|m| m["eeprom"]["read_addr"] = 64.into());
    r.refused(&bad, "EEPROM");
    let bad = r.edited(|m| m["phy"]["regs"] = serde_json::json!([0, 1, 2]));
    r.refused(&bad, "e1000");
    let bad = r.edited(|m| m["ctx"]["mss"] = 70_000.into());
    r.refused(&bad, "e1000");
    let bad = r.edited(|m| m["tx_segs_sent"] = u64::MAX.into());
    r.refused(&bad, "TSO");
    let bad = r.edited(|m| m["line"] = 1.into());
    r.refused(&bad, "e1000");
    let bad = r.edited(|m| m["surprise"] = true.into());
    r.refused(&bad, "unknown field");
    // Another device's snapshot.
    let (b, _p) = pair(Capabilities::default());
    let rtl = crate::rtl8139::driver::Driver::new(Box::new(b), true);
    r.refused(&rtl.dev.save(), "config space");
    // Nothing of that touched the running device.
    one_each_way(&mut r, 1);
}
