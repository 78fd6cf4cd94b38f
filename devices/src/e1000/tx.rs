//! Transmit: legacy, context and data descriptors, checksum insertion, TCP segmentation (or
//! both handed to a peer that takes them: a tap with a virtio-net header) and VLAN tag
//! insertion. Runs when the guest writes TDT (or TCTL) on the vCPU thread, and from
//! the I/O thread when the backend takes frames again or a walk was cut short.

use super::desc::{self, ContextDesc, DataDesc, LegacyTxDesc, TX_STATUS_OFFSET};
use super::rx::{MIN_FRAME, ZEROS};
use super::*;
use crate::net::guest_iov::{self, Piece, Ring};
use crate::net::offload::{
    csum_hdr, insert_checksum, prepare_gso, prepare_gso_head, segment_tcp_from, Layers,
    IPPROTO_TCP, IPPROTO_UDP,
};
use crate::net::port::TX_SENDS_PER_WALK;
use crate::net::Sent;
use net_backends::vnet::{VnetHdr, VIRTIO_NET_HDR_GSO_NONE, VNET_HDR_LEN};
use std::io::IoSlice;

/// Bytes of a frame copied out of guest memory first, to be read (and changed) by the
/// offloads: the headers of any frame the context can describe (HDRLEN is one byte). The
/// rest is taken from where it lies, unless an offload must change it.
const TX_HEAD: usize = 256;
/// Frames up to this long are copied into the port's outbox (from the copy of their headers
/// and from guest memory): below it one copy costs less than describing the pieces of guest
/// memory to the kernel (measured with scripts/bench-net). Longer ones go to the backend
/// from guest memory.
const TX_COPY_MAX: usize = 2048;

/// What the descriptors of one frame asked for: the first one's type and options, the last
/// one's command and VLAN tag.
struct FrameCmd {
    legacy: bool,
    tse: bool,
    popts: u8,
    cso: usize,
    css: usize,
    eop_cmd: u8,
    special: u16,
}

/// Whether a frame left (or was dropped), or the backend is full.
enum Tx {
    Done,
    Blocked,
}

impl TxContext {
    fn from_desc(d: &ContextDesc) -> TxContext {
        TxContext {
            ipcss: d.ipcss as usize,
            ipcso: d.ipcso as usize,
            ipcse: d.ipcse as usize,
            tucss: d.tucss as usize,
            tucso: d.tucso as usize,
            tucse: d.tucse as usize,
            tucmd: d.tucmd(),
            hdrlen: d.hdrlen as usize,
            mss: d.mss as usize,
        }
    }
}

/// The end (exclusive) of a checksum range whose inclusive end is `cse`, 0 meaning the end
/// of the frame.
fn cs_end(cse: usize, len: usize) -> usize {
    if cse == 0 {
        len
    } else {
        cse + 1
    }
}

/// Why the ring stops for a frame longer than a walk takes.
const TOO_SPREAD: &str = "TX frame spread over more descriptors than the device walks at once";

impl E1000 {
    /// Walks the ring from TDH towards TDT, at most [`TX_BUDGET`] descriptors.
    pub(super) fn process_tx(&mut self, port: &mut NetPort) {
        if self.tx_error || port.tx_blocked() || self.reg(TCTL) & TCTL_EN == 0 {
            return;
        }
        let (head, tail) = (self.reg(TDH) as usize, self.reg(TDT) as usize);
        if head == tail {
            return;
        }
        let n = (self.reg(TDLEN) / DESC_LEN as u32) as usize;
        if n == 0 || head >= n || tail >= n {
            return self.ring_error(
                port,
                true,
                "TX ring head/tail outside a ring of TDLEN bytes",
            );
        }
        let Some(base) = self.ring_base(TDBAL, TDBAH, n) else {
            return self.ring_error(port, true, "TX descriptor ring outside guest memory");
        };
        // SAFETY: the ring is dropped when this walk returns; `self.mem` outlives it.
        let ring = unsafe { Ring::new(&self.mem, GuestAddress(base), n * DESC_LEN as usize) };
        let desc_addr = |i: usize| GuestAddress(base + i as u64 * DESC_LEN);
        // Descriptors from `start` on belong to a frame not sent yet; TDH stays there.
        let mut start = head;
        let mut cur = head;
        let mut first: Option<FrameCmd> = None;
        // Descriptors written back that want TXDW at once, and ones that allow a delay (IDE).
        let (mut wrote_back, mut wrote_back_ide) = (false, false);
        let mut finished = false;
        // Descriptors of the frame being gathered: one frame may not span more than a walk.
        let mut frame_descs = 0;
        self.tx_pieces.clear();
        self.tx_len = 0;
        self.tx_rs.clear();
        let sends = port.sends();
        // Every descriptor is looked at once at most, and at most TX_BUDGET of them.
        for _ in 0..n.min(TX_BUDGET) {
            if cur == tail {
                finished = true;
                break;
            }
            let idx = cur;
            cur = (cur + 1) % n;
            let Some(d) = ring.read::<DataDesc>(&self.mem, desc_addr(idx)) else {
                return self.ring_error(port, true, "TX descriptor ring outside guest memory");
            };
            let cmd = d.cmd();
            let dext = cmd & TXD_CMD_DEXT != 0;
            let context = dext && d.dtyp() == TXD_DTYP_CONTEXT;
            // Every descriptor of a frame counts, a context one in its middle too: a frame
            // that a walk cannot take whole never goes, and must stop the ring rather than be
            // walked again and again (the next walk would start at the same descriptor).
            if !context || first.is_some() {
                frame_descs += 1;
                if frame_descs >= TX_BUDGET {
                    return self.ring_error(port, true, TOO_SPREAD);
                }
            }
            if context {
                self.ctx = TxContext::from_desc(&desc::view(&d));
                if cmd & TXD_CMD_RS != 0 && self.write_dd(port, &ring, desc_addr(idx)) {
                    if cmd & TXD_CMD_IDE != 0 {
                        wrote_back_ide = true;
                    } else {
                        wrote_back = true;
                    }
                }
                if first.is_none() {
                    start = cur;
                }
                continue;
            }
            let legacy: LegacyTxDesc = desc::view(&d);
            let len = if dext {
                d.dtalen()
            } else {
                legacy.length as usize
            };
            let f = first.get_or_insert(FrameCmd {
                legacy: !dext,
                tse: dext && cmd & TXD_CMD_TSE != 0,
                popts: if dext { d.popts } else { 0 },
                cso: legacy.cso as usize,
                css: legacy.css as usize,
                eop_cmd: 0,
                special: 0,
            });
            if cmd & TXD_CMD_EOP != 0 {
                f.eop_cmd = cmd;
                f.special = d.special;
            }
            if self.tx_len + len > MAX_FRAME {
                return self.ring_error(
                    port,
                    true,
                    "TX frame without EOP beyond the largest frame",
                );
            }
            if len > 0 {
                let addr = GuestAddress(d.buffer_addr);
                if !guest_iov::is_memory(&self.mem, addr, len) {
                    return self.ring_error(port, true, "TX buffer outside guest memory");
                }
                self.tx_pieces.push((addr, len));
                self.tx_len += len;
            }
            if cmd & TXD_CMD_RS != 0 {
                self.tx_rs.push((idx as u16, cmd & TXD_CMD_IDE != 0));
            }
            if cmd & TXD_CMD_EOP == 0 {
                continue;
            }
            let f = first.take().expect("set above");
            if let Tx::Blocked = self.transmit(port, &f) {
                // TDH stays at the frame; the port calls transmit() when the backend drains.
                finished = true;
                break;
            }
            self.tx_segs_sent = 0;
            // By index: the list keeps its capacity from frame to frame.
            for k in 0..self.tx_rs.len() {
                let (i, ide) = self.tx_rs[k];
                if self.write_dd(port, &ring, desc_addr(i as usize)) {
                    if ide {
                        wrote_back_ide = true;
                    } else {
                        wrote_back = true;
                    }
                }
            }
            self.tx_rs.clear();
            self.tx_pieces.clear();
            self.tx_len = 0;
            frame_descs = 0;
            start = cur;
            if port.sends().wrapping_sub(sends) >= TX_SENDS_PER_WALK {
                break; // the rest on the I/O thread's next turn (below)
            }
        }
        if !finished && cur != tail {
            if start == head && first.is_some() {
                // A whole walk and not one frame went: the next walk would do the same.
                return self.ring_error(port, true, TOO_SPREAD);
            }
            // The budget ran out: the rest on the I/O thread's next turn.
            port.kick_tx();
        }
        self.set_reg(TDH, start as u32);
        let mut causes = 0;
        if wrote_back || wrote_back_ide {
            causes |= self.tx_done(!wrote_back);
        }
        if start == tail {
            causes |= ICR_TXQE;
        }
        if causes != 0 {
            self.raise(causes);
        }
    }

    /// Sets DD in a descriptor's status byte; false when the ring is not in memory.
    fn write_dd(&mut self, port: &mut NetPort, ring: &Ring, desc: GuestAddress) -> bool {
        let ok = ring.write(
            &self.mem,
            GuestAddress(desc.0 + TX_STATUS_OFFSET),
            TXD_STAT_DD,
        );
        if !ok {
            self.ring_error(port, true, "TX descriptor ring outside guest memory");
        }
        ok
    }

    /// Sends the gathered frame: its headers copied out and the rest from guest memory where
    /// the offloads asked for change nothing past the headers, else all of it copied out.
    fn transmit(&mut self, port: &mut NetPort, f: &FrameCmd) -> Tx {
        let len = self.tx_len;
        if len == 0 {
            return Tx::Done; // only null descriptors: nothing goes on the wire
        }
        let pieces = std::mem::take(&mut self.tx_pieces);
        let mut frame = std::mem::take(&mut self.tx_buf);
        // Not cleared first: the copy below overwrites every byte, and resizing from the last
        // frame's length zero-fills only what it grows by (not the whole frame each time).
        let head = TX_HEAD.min(len);
        frame.resize(head);
        // The pieces were checked on the walk: the copies cannot fail.
        let mut ok = guest_iov::read_pieces(&self.mem, &pieces, 0, &mut frame);
        let mut r = None;
        if ok {
            let (room, head) = frame.split();
            r = self.transmit_direct(port, room, head, &pieces, f);
        }
        if ok && r.is_none() {
            frame.resize(len);
            ok = guest_iov::read_pieces(&self.mem, &pieces, head, &mut frame[head..]);
        }
        let r = match r {
            Some(r) => r,
            None if ok => {
                let (room, frame) = frame.split();
                self.transmit_frame(port, room, frame, f)
            }
            None => Tx::Done,
        };
        self.tx_buf = frame;
        self.tx_pieces = pieces;
        r
    }

    /// The frame's offloads done in its first [`TX_HEAD`] bytes (`head`), which go out with
    /// the rest of the frame from guest memory; `None`, changing nothing, when an offload
    /// needs more of the frame (a checksum in software, segmentation in software).
    fn transmit_direct(
        &mut self,
        port: &mut NetPort,
        room: &mut [u8; VNET_HDR_LEN],
        head: &mut [u8],
        pieces: &[Piece],
        f: &FrameCmd,
    ) -> Option<Tx> {
        let len = self.tx_len;
        let vlan =
            (f.eop_cmd & TXD_CMD_VLE != 0 && self.reg(CTRL) & CTRL_VME != 0).then_some(f.special);
        let c = self.ctx;
        let peer = port.peer_offloads();
        let tso = f.tse && c.tucmd & TXD_CMD_TSE != 0;
        let hdr = if tso {
            if vlan.is_some() || self.tx_segs_sent != 0 {
                return None;
            }
            Some(prepare_gso_head(
                head,
                len,
                &tso_layers(&c, len),
                c.mss,
                peer,
            )?)
        } else {
            let l4 = if f.legacy {
                (f.eop_cmd & TXD_CMD_IC != 0).then_some((f.css, f.cso, len))
            } else {
                (f.popts & TXD_POPTS_TXSM != 0).then_some((c.tucss, c.tucso, cs_end(c.tucse, len)))
            };
            let hdr = match l4 {
                Some((start, field, end)) => {
                    if end != len || vlan.is_some() || !peer.csum {
                        return None;
                    }
                    Some(csum_hdr(len, start, field)?)
                }
                None => None,
            };
            if !f.legacy && f.popts & TXD_POPTS_IXSM != 0 {
                let end = cs_end(c.ipcse, len);
                if end > head.len() || c.ipcso + 2 > head.len() {
                    return None;
                }
                insert_checksum(head, c.ipcss, c.ipcso, end);
            }
            hdr
        };
        let r = self.send(port, Some(room), head, pieces, vlan, hdr.as_ref());
        if tso && r != Sent::Blocked {
            self.count(TSCTC, 1);
        }
        Some(match r {
            Sent::Blocked => Tx::Blocked,
            _ => Tx::Done,
        })
    }

    /// Sends the frame copied out whole, `room` in front of it.
    fn transmit_frame(
        &mut self,
        port: &mut NetPort,
        room: &mut [u8; VNET_HDR_LEN],
        frame: &mut [u8],
        f: &FrameCmd,
    ) -> Tx {
        let vlan =
            (f.eop_cmd & TXD_CMD_VLE != 0 && self.reg(CTRL) & CTRL_VME != 0).then_some(f.special);
        let c = self.ctx;
        if f.tse && c.tucmd & TXD_CMD_TSE != 0 {
            return self.transmit_tso(port, room, frame, &c, vlan);
        }
        let len = frame.len();
        // The transport checksum: left to a peer that takes it (a tap with a virtio-net
        // header) when it runs to the end of the frame and no tag moves the offsets.
        let mut l4 = None;
        if f.legacy {
            if f.eop_cmd & TXD_CMD_IC != 0 {
                l4 = Some((f.css, f.cso, len));
            }
        } else {
            if f.popts & TXD_POPTS_IXSM != 0 {
                insert_checksum(frame, c.ipcss, c.ipcso, cs_end(c.ipcse, len));
            }
            if f.popts & TXD_POPTS_TXSM != 0 {
                l4 = Some((c.tucss, c.tucso, cs_end(c.tucse, len)));
            }
        }
        let mut hdr = None;
        if let Some((start, field, end)) = l4 {
            if end == len && vlan.is_none() && port.peer_offloads().csum {
                hdr = csum_hdr(len, start, field);
            }
            if hdr.is_none() {
                insert_checksum(frame, start, field, end);
            }
        }
        match self.send(port, Some(room), frame, &[], vlan, hdr.as_ref()) {
            Sent::Blocked => Tx::Blocked,
            _ => Tx::Done,
        }
    }

    /// TCP segmentation with the offsets the context gave; a context that does not describe
    /// a TCP header inside the frame drops the frame (TSCTFC).
    fn transmit_tso(
        &mut self,
        port: &mut NetPort,
        room: &mut [u8; VNET_HDR_LEN],
        frame: &mut [u8],
        c: &TxContext,
        vlan: Option<u16>,
    ) -> Tx {
        let at = tso_layers(c, frame.len());
        if at.proto != IPPROTO_TCP || c.mss == 0 || !at.fit(frame) {
            self.count(TSCTFC, 1);
            port.guest_error(format_args!("TSO context does not fit the frame; dropped"));
            return Tx::Done;
        }
        // One frame for the peer to segment, when it takes that (a tap with a virtio-net
        // header): the host kernel cuts it, or delivers it whole to a local socket.
        let peer = port.peer_offloads();
        if vlan.is_none() && self.tx_segs_sent == 0 {
            if let Some(hdr) = prepare_gso(frame, &at, c.mss, peer) {
                return match self.send(port, Some(room), frame, &[], None, Some(&hdr)) {
                    Sent::Blocked => Tx::Blocked,
                    _ => {
                        self.count(TSCTC, 1);
                        Tx::Done
                    }
                };
            }
        }
        let mut scratch = std::mem::take(&mut self.tx_scratch);
        // Going on where a full backend stopped the send: those segments went already.
        let mut i = self.tx_segs_sent;
        let r = segment_tcp_from(frame, &at, c.mss, i, &mut scratch, |seg| {
            if self.send(port, None, seg, &[], vlan, None) == Sent::Blocked {
                return Err(());
            }
            i += 1;
            Ok(())
        });
        self.tx_scratch = scratch;
        match r {
            Ok(_) => {
                self.count(TSCTC, 1);
                Tx::Done
            }
            Err(()) => {
                self.tx_segs_sent = i;
                Tx::Blocked
            }
        }
    }

    /// Hands one wire frame to the port — `head`, then what of `tail` (guest memory) lies past
    /// `head.len()` bytes — inserting the VLAN tag and padding short frames (TCTL.PSP), and
    /// counts it: with `offload`, in the header the peer takes it with (see
    /// [`NetPort::send_frame`]), counted as the wire frames the peer makes of it. `room`: the
    /// bytes in front of `head`, for the port's header.
    fn send(
        &mut self,
        port: &mut NetPort,
        room: Option<&mut [u8; VNET_HDR_LEN]>,
        head: &[u8],
        tail: &[Piece],
        vlan: Option<u16>,
        offload: Option<&VnetHdr>,
    ) -> Sent {
        let tag = vlan.map(|tci| {
            let vet = (self.reg(VET) as u16).to_be_bytes();
            let tci = tci.to_be_bytes();
            [vet[0], vet[1], tci[0], tci[1]]
        });
        let tag = tag.filter(|_| head.len() >= 12);
        let mut iov = guest_iov::recycle(std::mem::take(&mut self.tx_iov));
        match &tag {
            Some(t) => iov.extend([
                IoSlice::new(&head[..12]),
                IoSlice::new(t),
                IoSlice::new(&head[12..]),
            ]),
            None => iov.push(IoSlice::new(head)),
        }
        // Checked on the walk: the pieces are guest memory.
        let whole = guest_iov::push_pieces(&self.mem, tail, head.len(), &mut iov);
        let len = guest_iov::len(&iov);
        let pad = if self.reg(TCTL) & TCTL_PSP != 0 {
            MIN_FRAME.saturating_sub(len)
        } else {
            0
        };
        if pad > 0 {
            iov.push(IoSlice::new(&ZEROS[..pad]));
        }
        let r = if !whole {
            Sent::Lost
        } else if len <= TX_COPY_MAX {
            // Copied: it goes with the frames around it.
            port.queue_frame(offload, &iov)
        } else {
            port.send_frame(offload, room, &iov)
        };
        self.tx_iov = guest_iov::recycle(iov);
        if r != Sent::Sent {
            return r;
        }
        let frame_len = len - if tag.is_some() { 4 } else { 0 };
        match offload.filter(|h| h.gso_type != VIRTIO_NET_HDR_GSO_NONE) {
            Some(h) => {
                let (hdr_len, mss) = (h.hdr_len as usize, h.gso_size as usize);
                let payload = frame_len.saturating_sub(hdr_len);
                let wire = |data: usize| (hdr_len + data).max(MIN_FRAME) + 4;
                let full = payload.checked_div(mss).unwrap_or(0);
                let rest = payload - full * mss;
                self.count_wire(head, wire(mss), full as u64);
                if rest != 0 || full == 0 {
                    self.count_wire(head, wire(rest), 1);
                }
            }
            None => self.count_wire(head, (len + pad).max(MIN_FRAME) + 4, 1),
        }
        Sent::Sent
    }

    /// Counts `n` frames of `wire` bytes (FCS included) sent with `frame`'s destination.
    fn count_wire(&mut self, frame: &[u8], wire: usize, n: u64) {
        self.count(GPTC, n);
        self.count(TPT, n);
        self.count64(GOTCL, wire as u64 * n);
        self.count64(TOTL, wire as u64 * n);
        self.count_size(PTC64, wire, n);
        if frame.get(..6) == Some(&[0xff; 6]) {
            self.count(BPTC, n);
        } else if frame.first().is_some_and(|b| b & 1 != 0) {
            self.count(MPTC, n);
        }
    }
}

/// The layers a TSO context describes in a frame of `len` bytes.
fn tso_layers(c: &TxContext, len: usize) -> Layers {
    Layers {
        l3: c.ipcss,
        ipv4: c.tucmd & TXD_TUCMD_IP != 0,
        l4: c.tucss,
        proto: if c.tucmd & TXD_TUCMD_TCP != 0 {
            IPPROTO_TCP
        } else {
            IPPROTO_UDP
        },
        hdr_len: c.hdrlen,
        end: len,
    }
}
