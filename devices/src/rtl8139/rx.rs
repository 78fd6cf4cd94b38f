//! Receive: the address filter, then either the normal-mode ring buffer (RBSTART/CBR/CAPR)
//! or the C+ descriptor ring (RDSAR) with VLAN stripping and checksum reporting.
//!
//! Frames reach the guest as the wire would carry them: padded to 60 bytes and followed by
//! their CRC (both drivers subtract 4 from the length they are given).

use super::desc::{CpDesc, RxHeader};
use super::tx::{next_index, CP_RING_MAX, DESC_EOR, DESC_FS, DESC_LS, DESC_OWN, DESC_SIZE};
use super::*;
use crate::net::fcs;
use crate::net::guest_iov::{self, Ring};
use crate::net::offload::{self, Layers};
use std::ops::Range;
use vm_memory::{ByteValued, GuestAddress};

// Normal-mode packet header status (RSR).
pub const RSR_ROK: u16 = 1 << 0;
pub const RSR_BAR: u16 = 1 << 13;
pub const RSR_PAM: u16 = 1 << 14;
pub const RSR_MAR: u16 = 1 << 15;

// C+ RX descriptor status (opts1).
pub const RX_MAR: u32 = 1 << 26;
pub const RX_PAM: u32 = 1 << 25;
pub const RX_BAR: u32 = 1 << 24;
pub const RX_PID_TCP: u32 = 1 << 16;
pub const RX_PID_UDP: u32 = 2 << 16;
pub const RX_PID_IP: u32 = 3 << 16;
pub const RX_IPF: u32 = 1 << 15;
pub const RX_UDPF: u32 = 1 << 14;
pub const RX_TCPF: u32 = 1 << 13;
pub const RX_LEN_MASK: u32 = 0x1fff;
// C+ RX opts2.
pub const RX_TAVA: u32 = 1 << 16;

const ETH_ZLEN: usize = 60;
/// The longest C+ receive ring, in bytes (how far a walk may go before EOR).
const CP_RING_BYTES: usize = CP_RING_MAX as usize * DESC_SIZE as usize;
/// The longest frame of a 1500-byte MTU with a VLAN tag, FCS not counted.
const ETH_MAX_TAGGED: usize = 1518;
const CRC_LEN: usize = 4;
const ZEROS: [u8; ETH_ZLEN] = [0; ETH_ZLEN];

/// Why the filter let a frame in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Broadcast,
    Multicast,
    /// Our station address, or any unicast address under AAP.
    Physical,
}

/// The multicast hash of the RTL8139 (and most NICs of its time): the top six bits of the
/// big-endian Ethernet CRC of the destination address index MAR0-7.
pub fn multicast_hash_bit(addr: &[u8]) -> usize {
    let mut crc: u32 = !0;
    for &byte in addr {
        let mut b = byte;
        for _ in 0..8 {
            let feedback = (crc >> 31) ^ (b as u32 & 1);
            crc <<= 1;
            b >>= 1;
            if feedback != 0 {
                crc ^= 0x04c1_1db7;
            }
        }
    }
    (crc >> 26) as usize
}

impl Rtl8139 {
    fn rx_enabled(&self) -> bool {
        self.regs[CR] & CR_RE != 0
            && !self.rx_dead
            && (!self.cplus_mode() || self.get16(CPCR) & CPCR_RXON != 0)
    }

    /// Frames (up to `max`) the guest has room for: in C+ mode the descriptors it owns from
    /// the current one on (a frame takes one at least), in normal mode the ring's free bytes
    /// at a full-size frame each; `max` while the receiver is off (frames are dropped).
    pub(super) fn rx_room_for(&self, max: usize) -> usize {
        if !self.rx_enabled() {
            return max;
        }
        if !self.cplus_mode() {
            let len = self.ring_len();
            let read = self.get16(CAPR).wrapping_add(16) as usize % len;
            let write = self.cbr as usize % len;
            let free = if read == write {
                len
            } else {
                (read + len - write) % len
            };
            // A frame takes its header, itself with its CRC, and alignment, and leaves at
            // least a byte free. Counted at the longest frame of an Ethernet MTU, tagged
            // (1518 bytes): a 32 KiB ring takes 21 of them in one burst, where 18 of the
            // longest frame the ring accepts (MAX_NORMAL_FRAME) would fit. Longer frames
            // than that, when they come, wait in the port's stage for the room.
            let need = (4 + ETH_MAX_TAGGED + CRC_LEN + 3) & !3;
            return (free.saturating_sub(1) / need).min(max);
        }
        let base = self.get64(RDSAR);
        // SAFETY: the ring is used with self.mem only and dropped before this returns.
        let ring = unsafe { Ring::new(&self.mem, GuestAddress(base), CP_RING_BYTES) };
        let mut idx = self.cp_rx_index;
        let mut owned = 0;
        while owned < max {
            let at = GuestAddress(base.wrapping_add(idx as u64 * DESC_SIZE));
            match ring.read::<u32>(&self.mem, at) {
                Some(opts1) if u32::from_le(opts1) & DESC_OWN != 0 => {
                    owned += 1;
                    idx = next_index(idx, u32::from_le(opts1));
                }
                _ => break,
            }
            if idx == self.cp_rx_index {
                break; // round the ring (EOR): each descriptor counted once
            }
        }
        owned
    }

    fn ring_len(&self) -> usize {
        8192 << ((self.get32(RCR) >> RCR_RBLEN_SHIFT) & 3)
    }

    /// Normal mode: CBR has caught up with the driver's read pointer (CAPR + 16).
    pub(super) fn rx_ring_empty(&self) -> bool {
        self.get16(CAPR).wrapping_add(16) as usize % self.ring_len()
            == self.cbr as usize % self.ring_len()
    }

    /// One frame from the backend: dropped when the receiver is off or the filter says so,
    /// else into the ring buffer (normal mode) or the descriptor ring (C+).
    pub(super) fn receive_frame(&mut self, port: &mut NetPort, frame: &[u8]) -> Rx {
        if !self.rx_enabled() {
            return Rx::Dropped; // a receiver that is off drops what the wire brings
        }
        let Some(class) = self.filter(frame) else {
            port.stats.rx_dropped += 1;
            return Rx::Dropped;
        };
        let r = if self.cplus_mode() {
            self.cp_receive(port, frame, class)
        } else {
            self.ring_receive(port, frame, class)
        };
        match r {
            Rx::Delivered => {
                self.count_rx(port, frame.len(), class);
                self.rx_poll = false;
            }
            Rx::NoRoom => {
                log::trace!("{}: receive stalled, no room", port.name());
                if self.cplus_mode() {
                    self.rx_poll = true;
                    self.arm_timer();
                } else {
                    // RXOVW, as the chip signals a full ring. The frame is not dropped, but
                    // 8139too needs the cause: its poll reads the ring only while a receive
                    // cause is pending, and it may have acked every ROK already.
                    self.raise(INT_RXOVW_RDU);
                }
            }
            Rx::Dropped => {}
        }
        r
    }

    fn filter(&self, frame: &[u8]) -> Option<Class> {
        let dst: [u8; 6] = frame.get(..6)?.try_into().ok()?;
        let rcr = self.get32(RCR);
        if dst == [0xff; 6] {
            (rcr & RCR_AB != 0).then_some(Class::Broadcast)
        } else if dst[0] & 1 != 0 {
            let bit = multicast_hash_bit(&dst);
            let hit = self.regs[MAR0 + bit / 8] & (1 << (bit % 8)) != 0;
            (rcr & RCR_AM != 0 && hit).then_some(Class::Multicast)
        } else if (dst == self.station_address() && rcr & RCR_APM != 0) || rcr & RCR_AAP != 0 {
            Some(Class::Physical)
        } else {
            None
        }
    }

    fn count_rx(&mut self, port: &mut NetPort, len: usize, class: Class) {
        port.stats.rx_frames += 1;
        port.stats.rx_bytes += len as u64;
        let t = &mut self.tally;
        t.rx_ok = t.rx_ok.wrapping_add(1);
        match class {
            Class::Broadcast => t.rx_ok_brd = t.rx_ok_brd.wrapping_add(1),
            Class::Multicast => t.rx_ok_mul = t.rx_ok_mul.wrapping_add(1),
            Class::Physical => t.rx_ok_phy = t.rx_ok_phy.wrapping_add(1),
        }
    }

    /// What the wire adds to `frame`: the padding up to the shortest frame, and the CRC
    /// over frame and padding.
    fn wire_tail(frame: &[u8]) -> (&'static [u8], [u8; CRC_LEN]) {
        let (pad, crc, _) = Self::wire_tail_summed(frame, None);
        (pad, crc)
    }

    /// [`Self::wire_tail`], and the sum of `frame[segment]` (as `offload::ones_sum` gives
    /// it) taken in the same pass over the frame.
    fn wire_tail_summed(
        frame: &[u8],
        segment: Option<Range<usize>>,
    ) -> (&'static [u8], [u8; CRC_LEN], Option<u64>) {
        let pad = &ZEROS[..ETH_ZLEN.saturating_sub(frame.len())];
        if pad.is_empty() {
            let (crc, sum) = fcs::crc_and_sum(frame, segment);
            return (pad, crc.to_le_bytes(), sum);
        }
        let sum = segment.and_then(|r| frame.get(r)).map(offload::ones_sum);
        (pad, fcs::crc(&[frame, pad]).to_le_bytes(), sum)
    }

    // ---- normal mode: the ring buffer -------------------------------------------------

    fn ring_receive(&mut self, port: &mut NetPort, frame: &[u8], class: Class) -> Rx {
        if frame.len() > MAX_NORMAL_FRAME {
            port.stats.rx_dropped += 1;
            return Rx::Dropped;
        }
        let len = self.ring_len();
        let (pad, crc) = Self::wire_tail(frame);
        let wire_len = frame.len() + pad.len() + CRC_LEN;
        let header = RxHeader {
            status: RSR_ROK
                | match class {
                    Class::Broadcast => RSR_BAR,
                    Class::Multicast => RSR_MAR,
                    Class::Physical => RSR_PAM,
                },
            length: wire_len as u16,
        };
        let need = (4 + wire_len + 3) & !3;
        let read = self.get16(CAPR).wrapping_add(16) as usize % len;
        let write = self.cbr as usize % len;
        let free = if read == write {
            len
        } else {
            (read + len - write) % len
        };
        if need >= free {
            return Rx::NoRoom;
        }
        let base = self.get32(RBSTART) as u64;
        // WRAP set: the frame runs on past the end into the driver's slack (not for the
        // 64 KiB ring, which always wraps).
        let linear = self.get32(RCR) & RCR_WRAP != 0 && len < 65536;
        // Header, frame, padding and CRC, each written where it goes in the ring.
        let parts = [header.as_slice(), frame, pad, &crc];
        let total = 4 + wire_len;
        let first = if linear {
            total
        } else {
            total.min(len - write)
        };
        let ok = guest_iov::write_parts(
            &self.mem,
            &parts,
            0,
            first,
            GuestAddress(base + write as u64),
        ) && guest_iov::write_parts(
            &self.mem,
            &parts,
            first,
            total - first,
            GuestAddress(base),
        );
        if ok {
            self.cbr = ((write + need) % len) as u16;
            // The line follows once for the burst (rx_burst_done).
            self.isr |= INT_ROK;
            Rx::Delivered
        } else {
            self.rx_dead = true;
            self.dma_error(port, "RX ring buffer is outside guest memory");
            Rx::Dropped
        }
    }

    // ---- C+ mode: the descriptor ring -------------------------------------------------

    fn cp_receive(&mut self, port: &mut NetPort, frame: &[u8], class: Class) -> Rx {
        let mut opts2 = 0;
        let cpcr = self.get16(CPCR);
        let mut untagged = std::mem::take(&mut self.rx_scratch);
        let body = if cpcr & CPCR_RXVLAN != 0 && frame.len() >= 18 && frame[12..14] == [0x81, 0x00]
        {
            let tci = u16::from_be_bytes([frame[14], frame[15]]);
            opts2 = RX_TAVA | tci.swap_bytes() as u32;
            untagged.clear();
            untagged.extend_from_slice(&frame[..12]);
            untagged.extend_from_slice(&frame[16..]);
            &untagged[..]
        } else {
            frame
        };
        let mut status = match class {
            Class::Broadcast => RX_BAR,
            Class::Multicast => RX_MAR,
            Class::Physical => RX_PAM,
        };
        // The transport segment's sum for the checksum status is taken in the CRC's pass.
        let at = (cpcr & CPCR_RXCHKSUM != 0)
            .then(|| offload::parse(body).filter(|a| a.ipv4))
            .flatten();
        let segment = at.as_ref().and_then(|a| offload::l4_summed_range(body, a));
        let (pad, crc, l4_sum) = Self::wire_tail_summed(body, segment);
        if cpcr & CPCR_RXCHKSUM != 0 {
            status |= checksum_status(body, at.as_ref(), l4_sum);
        }
        let r = self.cp_place(port, &[body, pad, &crc], status, opts2);
        self.rx_scratch = untagged;
        r
    }

    /// Writes the frame as the wire carries it (`parts`: frame, padding, CRC) over as many
    /// descriptors as it needs, all or nothing.
    fn cp_place(&mut self, port: &mut NetPort, parts: &[&[u8]], status: u32, opts2: u32) -> Rx {
        let wire_len: usize = parts.iter().map(|p| p.len()).sum();
        let base = self.get64(RDSAR);
        // SAFETY: the ring is dropped when this frame is placed; `self.mem` outlives it.
        let ring = unsafe { Ring::new(&self.mem, GuestAddress(base), CP_RING_BYTES) };
        let mut descs = std::mem::take(&mut self.rx_descs);
        descs.clear();
        let mut idx = self.cp_rx_index;
        let mut room = 0usize;
        let mut r = Rx::Delivered;
        while room < wire_len {
            let at = GuestAddress(base.wrapping_add(idx as u64 * DESC_SIZE));
            let Some(CpDesc {
                opts1,
                buffer_addr: buf,
                ..
            }) = ring.read::<CpDesc>(&self.mem, at)
            else {
                self.rx_dead = true;
                self.dma_error(port, "RX descriptor ring is outside guest memory");
                r = Rx::Dropped;
                break;
            };
            if opts1 & DESC_OWN == 0 {
                if descs.is_empty() {
                    self.raise(INT_RXOVW_RDU);
                }
                r = Rx::NoRoom;
                break;
            }
            let size = (opts1 & RX_LEN_MASK) as usize;
            if size == 0 || descs.len() >= CP_RING_MAX as usize {
                self.rx_dead = true;
                self.dma_error(
                    port,
                    "RX descriptors cannot hold a frame (zero-sized buffers)",
                );
                r = Rx::Dropped;
                break;
            }
            descs.push((at, opts1, buf, size));
            room += size;
            idx = next_index(idx, opts1);
        }
        if room >= wire_len && !self.rx_dead {
            let last = descs.len() - 1;
            let mut off = 0;
            for (i, &(at, opts1, buf, size)) in descs.iter().enumerate() {
                let n = size.min(wire_len - off);
                let mut st = opts1 & DESC_EOR | status;
                if i == 0 {
                    st |= DESC_FS;
                }
                st |= if i == last {
                    DESC_LS | wire_len as u32 & RX_LEN_MASK
                } else {
                    n as u32
                };
                let ok = guest_iov::write_parts(&self.mem, parts, off, n, GuestAddress(buf))
                    && ring.write(&self.mem, GuestAddress(at.0.wrapping_add(4)), opts2.to_le())
                    && ring.write(&self.mem, at, st.to_le());
                if !ok {
                    self.rx_dead = true;
                    self.dma_error(port, "RX buffer is outside guest memory");
                    r = Rx::Dropped;
                    break;
                }
                off += n;
            }
            if !self.rx_dead {
                self.cp_rx_index = idx;
                self.isr |= INT_ROK; // the line: at the burst's end
            }
        }
        self.rx_descs = descs;
        r
    }
}

/// The C+ receive checksum status: protocol ID and failure bits for IPv4 frames (`at` the
/// frame's layers when it is one, `l4_sum` its transport segment's sum when already taken).
fn checksum_status(frame: &[u8], at: Option<&Layers>, l4_sum: Option<u64>) -> u32 {
    let Some(at) = at else {
        return 0;
    };
    let mut st = if offload::ipv4_header_ok(frame, at) {
        0
    } else {
        RX_IPF
    };
    let l4_ok = offload::l4_summed_ok(frame, at, l4_sum);
    st |= match at.proto {
        offload::IPPROTO_TCP => RX_PID_TCP | if l4_ok { 0 } else { RX_TCPF },
        offload::IPPROTO_UDP => RX_PID_UDP | if l4_ok { 0 } else { RX_UDPF },
        _ => RX_PID_IP,
    };
    st
}
