//! Receive: filtering, VLAN stripping, checksum reporting and descriptor write-back.

use super::desc::{RxDesc, RX_WRITEBACK_OFFSET};
use super::*;
use crate::net::fcs::{self, FCS_LEN};
use crate::net::guest_iov::{self, Ring};
use crate::net::offload::{self, Layers};
use std::ops::Range;
use vm_memory::ByteValued;

/// Shortest frame on the wire without its FCS.
pub(super) const MIN_FRAME: usize = 60;
/// Longest frame without RCTL.LPE, FCS included (a VLAN-tagged full-size frame).
const MAX_STD_FRAME: usize = 1522;
/// Longest frame the 82540EM receives with RCTL.LPE.
const MAX_LONG_FRAME: usize = 16384;
pub(super) const ZEROS: [u8; MIN_FRAME] = [0; MIN_FRAME];

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

impl E1000 {
    /// Receive buffer size from RCTL.BSIZE and BSEX.
    fn rx_buf_size(&self) -> usize {
        let rctl = self.reg(RCTL);
        let code = ((rctl >> RCTL_BSIZE_SHIFT) & 3) as usize;
        match (rctl & RCTL_BSEX != 0, code) {
            (true, 1) => 16384,
            (true, 2) => 8192,
            (true, 3) => 4096,
            (_, c) => 2048 >> c,
        }
    }

    /// After a burst that delivered frames: RXT0 (or its delay), and RXDMT0 when at most
    /// 1/2, 1/4 or 1/8 of the ring (RCTL.RDMTS) is left for the device.
    pub(super) fn rx_delivered(&mut self) {
        let mut causes = self.rx_done();
        let n = (self.reg(RDLEN) / DESC_LEN as u32) as usize;
        let (rdh, rdt) = (self.reg(RDH) as usize, self.reg(RDT) as usize);
        let free = (rdt + n - rdh) % n.max(1);
        let rdmts = (self.reg(RCTL) >> RCTL_RDMTS_SHIFT) & 3;
        if free <= n >> (rdmts.min(2) + 1) {
            causes |= ICR_RXDMT0;
        }
        self.raise(causes);
    }

    /// Frames (up to `max`) the descriptors between RDH and RDT hold, at a full-size frame
    /// per descriptor or per as many as it takes (`max` when the receiver drops them).
    pub(super) fn rx_room_for(&self, max: usize) -> usize {
        if self.reg(RCTL) & RCTL_EN == 0 || !self.link_up {
            return max;
        }
        let n = (self.reg(RDLEN) / DESC_LEN as u32) as usize;
        let (rdh, rdt) = (self.reg(RDH) as usize, self.reg(RDT) as usize);
        if n == 0 || rdh >= n || rdt >= n {
            return 1;
        }
        let free = (rdt + n - rdh) % n;
        (free / MAX_STD_FRAME.div_ceil(self.rx_buf_size())).min(max)
    }

    /// Delivers one frame from the backend (offered again after [`Rx::NoRoom`] until placed,
    /// and counted once).
    pub(super) fn receive_frame(&mut self, port: &mut NetPort, frame: &[u8]) -> Rx {
        let r = self.place(port, frame);
        let no_room = r == Rx::NoRoom;
        if no_room && !self.rx_no_buffers {
            self.count(RNBC, 1);
            self.raise(ICR_RXO);
        }
        self.rx_no_buffers = no_room;
        r
    }

    fn place(&mut self, port: &mut NetPort, frame: &[u8]) -> Rx {
        let rctl = self.reg(RCTL);
        if rctl & RCTL_EN == 0 || !self.link_up {
            port.stats.rx_dropped += 1;
            return Rx::Dropped;
        }
        let wire_len = frame.len().max(MIN_FRAME) + 4;
        if !self.rx_no_buffers {
            self.count(TPR, 1);
            self.count64(TORL, wire_len as u64);
        }
        if frame.len() < 14 {
            self.count(RUC, 1);
            port.stats.rx_dropped += 1;
            return Rx::Dropped;
        }
        if !self.accept(frame) {
            return Rx::Dropped;
        }
        let max = if rctl & RCTL_LPE != 0 {
            MAX_LONG_FRAME
        } else {
            MAX_STD_FRAME
        };
        if wire_len > max {
            self.count(ROC, 1);
            port.stats.rx_dropped += 1;
            return Rx::Dropped;
        }

        let tci = be16(frame, 14).filter(|_| be16(frame, 12) == Some(self.reg(VET) as u16));
        let strip = tci.is_some() && self.reg(CTRL) & CTRL_VME != 0;
        let (head, tail) = if strip {
            (&frame[..12], &frame[16..])
        } else {
            (frame, &[][..])
        };
        let pad = &ZEROS[..MIN_FRAME.saturating_sub(head.len() + tail.len())];
        // The transport segment whose checksum RXCSUM asks to verify is summed in the FCS's
        // pass over the frame, when the frame goes to the guest as it came.
        let at = self.rx_csum_layers(frame);
        let segment = at.as_ref().and_then(|at| self.rx_l4_segment(frame, at));
        let l4_checked = segment.is_some();
        let with_fcs = rctl & RCTL_SECRC == 0;
        let (fcs, l4_sum) = match (with_fcs, strip || !pad.is_empty()) {
            (true, false) => fcs::crc_and_sum(frame, segment),
            (true, true) => (fcs::crc(&[head, tail, pad]), None),
            (false, _) => (0, None),
        };
        let fcs = fcs.to_le_bytes();
        let fcs = &fcs[..if with_fcs { FCS_LEN } else { 0 }];
        let parts = [head, tail, pad, fcs];
        let total: usize = parts.iter().map(|p| p.len()).sum();

        let n = (self.reg(RDLEN) / DESC_LEN as u32) as usize;
        let (rdh, rdt) = (self.reg(RDH) as usize, self.reg(RDT) as usize);
        if rdh == rdt {
            return Rx::NoRoom;
        }
        if n == 0 || rdh >= n || rdt >= n {
            self.ring_error(
                port,
                false,
                "RX ring head/tail outside a ring of RDLEN bytes",
            );
            return Rx::Dropped;
        }
        let bsize = self.rx_buf_size();
        let needed = total.div_ceil(bsize);
        if needed > n - 1 {
            self.count(MPC, 1);
            port.stats.rx_dropped += 1;
            return Rx::Dropped;
        }
        if needed > (rdt + n - rdh) % n {
            return Rx::NoRoom;
        }

        let (mut status, errors) = self.rx_checksum(frame, at.as_ref(), l4_checked, l4_sum);
        let mut special = 0;
        if strip {
            status |= RXD_STAT_VP;
            special = tci.unwrap_or(0);
        }
        let Some(base) = self.ring_base(RDBAL, RDBAH, n) else {
            self.ring_error(port, false, "RX descriptor ring outside guest memory");
            return Rx::Dropped;
        };
        // SAFETY: the ring is dropped when this frame is placed; `self.mem` outlives it.
        let ring = unsafe { Ring::new(&self.mem, GuestAddress(base), n * DESC_LEN as usize) };
        let mut idx = rdh;
        for i in 0..needed {
            let at = GuestAddress(base + idx as u64 * DESC_LEN);
            let from = i * bsize;
            let len = bsize.min(total - from);
            let last = i + 1 == needed;
            let Some(mut d) = ring.read::<RxDesc>(&self.mem, at) else {
                self.ring_error(port, false, "RX descriptor ring outside guest memory");
                return Rx::Dropped;
            };
            if !guest_iov::write_parts(&self.mem, &parts, from, len, GuestAddress(d.buffer_addr)) {
                self.ring_error(port, false, "RX buffer outside guest memory");
                return Rx::Dropped;
            }
            d.length = len as u16;
            d.csum = 0;
            if last {
                d.status = status | RXD_STAT_DD | RXD_STAT_EOP;
                d.errors = errors;
                d.special = special;
            } else {
                d.status = RXD_STAT_DD;
                d.errors = 0;
                d.special = 0;
            }
            // The write-back half only: the buffer address is the driver's.
            let mut wb = [0u8; DESC_LEN as usize - RX_WRITEBACK_OFFSET];
            wb.copy_from_slice(&d.as_slice()[RX_WRITEBACK_OFFSET..]);
            if !ring.write(
                &self.mem,
                GuestAddress(at.0 + RX_WRITEBACK_OFFSET as u64),
                wb,
            ) {
                self.ring_error(port, false, "RX descriptor ring outside guest memory");
                return Rx::Dropped;
            }
            idx = (idx + 1) % n;
        }
        self.set_reg(RDH, idx as u32);

        self.count(GPRC, 1);
        self.count64(GORCL, wire_len as u64);
        self.count_size(PRC64, wire_len, 1);
        if frame[..6] == [0xff; 6] {
            self.count(BPRC, 1);
        } else if frame[0] & 1 != 0 {
            self.count(MPRC, 1);
        }
        port.stats.rx_frames += 1;
        port.stats.rx_bytes += frame.len() as u64;
        Rx::Delivered
    }

    /// The address filters and the VLAN filter.
    fn accept(&self, frame: &[u8]) -> bool {
        let rctl = self.reg(RCTL);
        if rctl & RCTL_VFE != 0 && be16(frame, 12) == Some(self.reg(VET) as u16) {
            let vid = be16(frame, 14).unwrap_or(0) as usize & 0xfff;
            if self.reg(VFTA + 4 * (vid >> 5)) & (1 << (vid & 31)) == 0 {
                return false;
            }
        }
        let dst: [u8; 6] = frame[..6].try_into().unwrap();
        let mcast = dst[0] & 1 != 0;
        if (dst == [0xff; 6] && rctl & RCTL_BAM != 0)
            || (mcast && rctl & RCTL_MPE != 0)
            || (!mcast && rctl & RCTL_UPE != 0)
        {
            return true;
        }
        let low = u32::from_le_bytes(dst[..4].try_into().unwrap());
        let high = u16::from_le_bytes([dst[4], dst[5]]) as u32;
        let exact = (0..16).any(|i| {
            let rah = self.reg(RAH0 + 8 * i);
            rah & RAH_AV != 0
                && rah & RAH_ASEL == 0
                && rah & 0xffff == high
                && self.reg(RAL0 + 8 * i) == low
        });
        if exact || !mcast {
            return exact;
        }
        // The 12-bit hash: address bits 47:36, 46:35, 45:34 or 43:32 per RCTL.MO.
        let top = u16::from_le_bytes([dst[4], dst[5]]) as u32;
        let hash = match (rctl >> RCTL_MO_SHIFT) & 3 {
            0 => top >> 4,
            1 => top >> 3,
            2 => top >> 2,
            _ => top,
        } & 0xfff;
        self.reg(MTA + 4 * (hash as usize >> 5)) & (1 << (hash & 31)) != 0
    }

    /// The layers of an IPv4 frame, when RXCSUM asks for its checksums to be verified.
    fn rx_csum_layers(&self, frame: &[u8]) -> Option<Layers> {
        if self.reg(RXCSUM) & (RXCSUM_IPOFL | RXCSUM_TUOFL) == 0 {
            return None;
        }
        offload::parse(frame).filter(|a| a.ipv4)
    }

    /// Where the transport checksum RXCSUM.TUOFL asks to verify is summed: none for a UDP
    /// datagram sent without one (a zero checksum means none was computed).
    fn rx_l4_segment(&self, frame: &[u8], at: &Layers) -> Option<Range<usize>> {
        if self.reg(RXCSUM) & RXCSUM_TUOFL == 0 {
            return None;
        }
        offload::l4_summed_range(frame, at)
    }

    /// Status and error bits for RXCSUM: IPv4 header and TCP/UDP checksums verified (`at`
    /// from [`Self::rx_csum_layers`]; `l4_checked` whether [`Self::rx_l4_segment`] gave a
    /// segment, `l4_sum` its sum, when already taken).
    fn rx_checksum(
        &self,
        frame: &[u8],
        at: Option<&Layers>,
        l4_checked: bool,
        l4_sum: Option<u64>,
    ) -> (u8, u8) {
        let rxcsum = self.reg(RXCSUM);
        if rxcsum & (RXCSUM_IPOFL | RXCSUM_TUOFL) == 0 {
            return (RXD_STAT_IXSM, 0);
        }
        let Some(at) = at else {
            return (0, 0);
        };
        let (mut status, mut errors) = (0, 0);
        if rxcsum & RXCSUM_IPOFL != 0 {
            status |= RXD_STAT_IPCS;
            if !offload::ipv4_header_ok(frame, at) {
                errors |= RXD_ERR_IPE;
            }
        }
        if l4_checked {
            status |= RXD_STAT_TCPCS;
            if !offload::l4_summed_ok(frame, at, l4_sum) {
                errors |= RXD_ERR_TCPE;
            }
        }
        (status, errors)
    }
}

/// CRC-32 of `data`; over a frame followed by its FCS it is the 802.3 residue 0x2144DF1C.
#[cfg(test)]
pub(super) fn crc32_of(data: &[u8]) -> u32 {
    fcs::crc(&[data])
}
