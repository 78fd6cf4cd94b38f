//! Transmit: the four normal-mode slots and the C+ descriptor ring, with the C+ offloads
//! (VLAN tag insertion, IP/TCP/UDP checksums, large send) done here, or the checksum and the
//! large send handed to a peer that takes them (a tap with a virtio-net header).

use super::desc::CpDesc;
use super::*;
use crate::net::guest_iov::{self, Piece, Ring};
use crate::net::port::TX_SENDS_PER_WALK;
use crate::net::tx_stage::TxStage;
use crate::net::{offload, Sent};
use net_backends::vnet::{VnetHdr, VNET_HDR_LEN};
use net_backends::Offloads;
use std::io::IoSlice;
use vm_memory::GuestAddress;

// C+ descriptor opts1 bits shared by both rings.
pub const DESC_OWN: u32 = 1 << 31;
pub const DESC_EOR: u32 = 1 << 30;
pub const DESC_FS: u32 = 1 << 29;
pub const DESC_LS: u32 = 1 << 28;
// C+ TX opts1.
pub const TX_LGSEN: u32 = 1 << 27;
pub const TX_MSS_SHIFT: u32 = 16;
pub const TX_MSS_MASK: u32 = 0x7ff;
pub const TX_IPCS: u32 = 1 << 18;
pub const TX_UDPCS: u32 = 1 << 17;
pub const TX_TCPCS: u32 = 1 << 16;
pub const TX_LEN_MASK: u32 = 0xffff;
// C+ TX opts2.
pub const TX_TAGC: u32 = 1 << 17;
/// C+ descriptors are 16 bytes: opts1, opts2, 64-bit buffer address.
pub const DESC_SIZE: u64 = 16;
/// A ring without EOR wraps after this many descriptors, so a runaway ring stays bounded.
pub const CP_RING_MAX: u16 = 1024;

pub(super) fn next_index(i: u16, opts1: u32) -> u16 {
    if opts1 & DESC_EOR != 0 || i + 1 >= CP_RING_MAX {
        0
    } else {
        i + 1
    }
}

/// Bytes of a C+ frame copied out of guest memory first, for the offloads to read and
/// change: its headers (Ethernet, a tag, IPv4 and TCP with options take at most 138). The
/// rest is taken from where it lies, unless an offload must change it.
const TX_HEAD: usize = 256;
/// Frames up to this long are copied into the port's outbox, from the model's copy of their
/// headers and from guest memory (below it one copy costs less than describing the pieces
/// of guest memory to the kernel); longer ones go to the backend from guest memory.
const TX_COPY_MAX: usize = 2048;
/// Buffers a frame may be sent from where they lie; a frame in more is copied (a tap's
/// `writev` takes 1024 pieces at most; 8139cp uses one per page fragment, 18 at most).
const MAX_PIECES: usize = 32;

/// How [`Rtl8139::send_pieces`] sends a frame: with `hdr` for the peer's offloads, `tag`
/// inserted after the addresses, and `room` the bytes in front of the frame's first piece
/// for the port's header (see [`NetPort::send_frame`]).
struct Out<'r> {
    hdr: Option<VnetHdr>,
    tag: Option<[u8; 4]>,
    room: Option<&'r mut [u8; VNET_HDR_LEN]>,
}

impl Out<'_> {
    /// No offloads and no room, `tag` inserted if any.
    fn plain(tag: Option<[u8; 4]>) -> Out<'static> {
        Out {
            hdr: None,
            tag,
            room: None,
        }
    }
}

impl Rtl8139 {
    fn tx_enabled(&self) -> bool {
        self.regs[CR] & CR_TE != 0
    }

    /// Hands one frame to the port, `tag` inserted after its addresses; when the backend is
    /// full the frame waits in the backlog (the guest already counts it as sent) and
    /// transmit pauses until it drains.
    fn send_frame(&mut self, port: &mut NetPort, frame: &[u8], tag: Option<[u8; 4]>) {
        self.send_pieces(port, Out::plain(tag), frame, &[], 0, frame.len());
    }

    /// Sends a frame of `len` bytes (the tag not counted): `head`, then `tail` (guest memory)
    /// after its first `skip` bytes; copied into the port's outbox up to [`TX_COPY_MAX`]
    /// bytes, past it sent from where it lies, and copied into the backlog when the backend
    /// is full.
    fn send_pieces(
        &mut self,
        port: &mut NetPort,
        out: Out<'_>,
        head: &[u8],
        tail: &[Piece],
        skip: usize,
        len: usize,
    ) {
        let wire = out.hdr.map_or(1, |h| offload::gso_frames(&h, len));
        self.tally.tx_ok = self.tally.tx_ok.wrapping_add(wire as u64);
        let mut iov = guest_iov::recycle(std::mem::take(&mut self.tx_iov));
        match &out.tag {
            Some(tag) if head.len() >= 12 => iov.extend([
                IoSlice::new(&head[..12]),
                IoSlice::new(tag),
                IoSlice::new(&head[12..]),
            ]),
            _ => iov.push(IoSlice::new(head)),
        }
        // Checked on the walk: the pieces are guest memory.
        if !guest_iov::push_pieces(&self.mem, tail, skip, &mut iov) {
            self.tx_iov = guest_iov::recycle(iov);
            return;
        }
        let hdr = out.hdr.as_ref();
        let r = if !self.tx_backlog.is_empty() {
            Sent::Blocked
        } else if len <= TX_COPY_MAX {
            // Copied: it goes with the frames around it.
            port.queue_frame(hdr, &iov)
        } else if out.tag.is_some() {
            port.send_frame(hdr, None, &iov)
        } else {
            port.send_frame(hdr, out.room, &iov)
        };
        if r == Sent::Blocked {
            let mut copy = Vec::with_capacity(guest_iov::len(&iov));
            for piece in &iov {
                copy.extend_from_slice(piece);
            }
            self.tx_backlog.push_back((out.hdr, copy));
        }
        self.tx_iov = guest_iov::recycle(iov);
    }

    /// The backend may take frames again: the backlog first, then what waited behind it.
    pub(super) fn flush_tx(&mut self, port: &mut NetPort) {
        while let Some((hdr, f)) = self.tx_backlog.front() {
            if port.send_frame(hdr.as_ref(), None, &[IoSlice::new(f)]) == Sent::Blocked {
                return;
            }
            self.tx_backlog.pop_front();
        }
        // Slots written while the transmitter was off (or the backend full) go out now, if
        // the transmitter is on: each is sent or fails, so the loop ends with the list.
        while self.tx_backlog.is_empty() && self.tx_enabled() {
            let Some(slot) = self.tx_waiting.pop_front() else {
                break;
            };
            self.send_slot(port, slot);
        }
        if self.tx_backlog.is_empty() && self.cplus_mode() {
            self.cp_transmit(port);
        }
    }

    // ---- normal mode ------------------------------------------------------------------

    /// The driver wrote TSDn: a cleared OWN bit hands the slot to the device.
    pub(super) fn tsd_written(&mut self, port: &mut NetPort, slot: usize) {
        if self.tsd[slot] & TSD_OWN != 0 || self.tx_waiting.contains(&slot) {
            return;
        }
        if !self.tx_backlog.is_empty() || port.tx_blocked() || !self.tx_enabled() {
            self.tx_waiting.push_back(slot);
            return;
        }
        self.send_slot(port, slot);
    }

    /// Sends the frame of a slot the driver handed over; the transmitter is on.
    fn send_slot(&mut self, port: &mut NetPort, slot: usize) {
        let size = (self.tsd[slot] & TSD_SIZE) as usize;
        let addr = GuestAddress(self.get32(TSAD0 + 4 * slot) as u64);
        if size > MAX_NORMAL_FRAME {
            self.dma_error(
                port,
                &format!("TX slot {slot} asks for {size} bytes (at most {MAX_NORMAL_FRAME})"),
            );
            self.slot_aborted(slot);
            return;
        }
        if !guest_iov::is_memory(&self.mem, addr, size) {
            self.dma_error(
                port,
                &format!("TX slot {slot} buffer {addr:#x?} is outside guest memory"),
            );
            self.slot_aborted(slot);
            return;
        }
        // Copied from guest memory into the port's outbox (a slot holds no more than
        // TX_COPY_MAX bytes), to go with the frames around it.
        self.send_pieces(port, Out::plain(None), &[], &[(addr, size)], 0, size);
        self.tsd[slot] |= TSD_OWN | TSD_TOK;
        self.raise(INT_TOK);
    }

    /// A slot's frame could not be sent: the transmit aborts (TABT) with an error interrupt.
    fn slot_aborted(&mut self, slot: usize) {
        self.tally.tx_abt = self.tally.tx_abt.wrapping_add(1);
        self.tally.tx_err = self.tally.tx_err.wrapping_add(1);
        self.tsd[slot] |= TSD_OWN | TSD_TABT;
        self.raise(INT_TER);
    }

    // ---- C+ mode ----------------------------------------------------------------------

    /// TPPoll: sends the frames the driver handed over, in ring order; after
    /// [`TX_SENDS_PER_WALK`] wire frames, at the end of a frame, the I/O thread goes on.
    pub(super) fn cp_transmit(&mut self, port: &mut NetPort) {
        if !self.tx_enabled() || self.get16(CPCR) & CPCR_TXON == 0 || self.tx_dead {
            return;
        }
        let base = self.get64(TNPDS);
        let ring_len = CP_RING_MAX as usize * DESC_SIZE as usize;
        // SAFETY: the ring is dropped when this walk returns; `self.mem` outlives it.
        let ring = unsafe { Ring::new(&self.mem, GuestAddress(base), ring_len) };
        let mut sent = false;
        let sends = port.sends();
        for _ in 0..CP_RING_MAX {
            if !self.tx_backlog.is_empty() || port.tx_blocked() {
                break; // flush_tx resumes here
            }
            let at = GuestAddress(base.wrapping_add(self.cp_tx_index as u64 * DESC_SIZE));
            let Some(CpDesc {
                opts1,
                opts2,
                buffer_addr: buf,
            }) = ring.read::<CpDesc>(&self.mem, at)
            else {
                self.tx_dead = true;
                self.dma_error(port, "TX descriptor ring is outside guest memory");
                break;
            };
            if opts1 & DESC_OWN == 0 {
                break;
            }
            if self.cp_tx_descs.first().is_some_and(|d| d.0 == at)
                || self.cp_tx_descs.len() >= CP_RING_MAX as usize
            {
                // Back at a descriptor of the frame being gathered: the ring is full of a
                // frame without its last descriptor.
                self.tx_dead = true;
                self.dma_error(port, "TX frame without a last descriptor fills the ring");
                self.tx_buf.clear();
                self.cp_tx_pieces.clear();
                self.cp_tx_len = 0;
                self.cp_write_back(port, &ring);
                break;
            }
            if opts1 & DESC_FS != 0 {
                self.tx_buf.clear();
                self.cp_tx_pieces.clear();
                self.cp_tx_len = 0;
                self.cp_tx_opts = (opts1, opts2);
                self.cp_tx_drop = false;
            }
            let len = (opts1 & TX_LEN_MASK) as usize;
            // Whether the frame will be read from this descriptor's buffer once it is whole.
            let mut in_place = false;
            if self.cp_tx_len + len > net_backends::MAX_FRAME {
                if !self.cp_tx_drop {
                    self.dma_error(port, "TX frame is larger than 64 KiB; dropped");
                }
                self.cp_tx_drop = true;
                self.tx_buf.clear();
                self.cp_tx_pieces.clear();
                self.cp_tx_len = 0;
            } else if !self.cp_tx_drop && len > 0 {
                // Read once the frame is whole (where it lies; its headers copied).
                let addr = GuestAddress(buf);
                in_place = true;
                self.cp_tx_pieces.push((addr, len));
                if !guest_iov::is_memory(&self.mem, addr, len) {
                    self.tx_dead = true;
                    self.dma_error(port, "TX buffer is outside guest memory");
                    break;
                }
                self.cp_tx_len += len;
            }
            // Status write-back: the device owns nothing any more; command bits become
            // (zero) status bits. A buffer the frame will be read from comes back once the
            // frame is sent (the guest may reuse it as soon as it is back).
            let status = opts1 & (DESC_EOR | DESC_FS | DESC_LS | TX_LEN_MASK);
            if in_place {
                self.cp_tx_descs.push((at, status));
            } else if !ring.write(&self.mem, at, status.to_le()) {
                self.tx_dead = true;
                self.dma_error(port, "TX descriptor ring is outside guest memory");
                break;
            }
            self.cp_tx_index = next_index(self.cp_tx_index, opts1);
            if opts1 & DESC_LS == 0 {
                continue;
            }
            if !self.cp_tx_drop {
                self.cp_send_offloaded(port);
            }
            self.cp_tx_drop = false;
            self.tx_buf.clear();
            self.cp_tx_pieces.clear();
            self.cp_tx_len = 0;
            sent = true;
            if !self.cp_write_back(port, &ring) {
                break;
            }
            if port.sends().wrapping_sub(sends) >= TX_SENDS_PER_WALK {
                port.kick_tx(); // the rest on the I/O thread's next turn
                break;
            }
        }
        if sent {
            self.raise(INT_TOK);
        }
    }

    /// Hands the descriptors of the frame just sent back to the driver; false (the engine
    /// stopped) when the ring is not in guest memory.
    fn cp_write_back(&mut self, port: &mut NetPort, ring: &Ring) -> bool {
        let mut ok = true;
        for &(at, status) in &self.cp_tx_descs {
            ok &= ring.write(&self.mem, at, status.to_le());
        }
        self.cp_tx_descs.clear();
        if !ok {
            self.tx_dead = true;
            self.dma_error(port, "TX descriptor ring is outside guest memory");
        }
        ok
    }

    /// Applies the first descriptor's offload requests to the gathered frame and sends it:
    /// a frame whose offloads touch only its headers goes out from guest memory (into the
    /// outbox or to the backend), its first bytes copied; any other is copied out whole.
    fn cp_send_offloaded(&mut self, port: &mut NetPort) {
        let len = self.cp_tx_len;
        let pieces = std::mem::take(&mut self.cp_tx_pieces);
        let mut frame = std::mem::take(&mut self.tx_buf);
        if pieces.is_empty() {
            self.cp_send_copied(port, &mut frame);
        } else {
            // Enough copied for the headers; the rest of the pieces after `skip` bytes.
            let copied = frame.len();
            let head = copied.max(TX_HEAD.min(len));
            frame.resize(head);
            let skip = head - copied;
            // The pieces were checked on the walk: the copies cannot fail.
            let ok = guest_iov::read_pieces(&self.mem, &pieces, 0, &mut frame[copied..]);
            let direct = ok
                && pieces.len() <= MAX_PIECES
                && self.cp_send_direct(port, &mut frame, &pieces, skip, len);
            if ok && !direct {
                frame.resize(len);
                if guest_iov::read_pieces(&self.mem, &pieces, skip, &mut frame[head..]) {
                    self.cp_send_copied(port, &mut frame);
                }
            }
        }
        frame.clear();
        self.tx_buf = frame;
        self.cp_tx_pieces = pieces;
    }

    /// The offloads done in `head`, the frame's first bytes (its headers at least), and the
    /// frame sent with the rest from `pieces` after `skip` bytes; false, with `head` as good as
    /// it was, when an offload needs more of the frame (a checksum or segmentation in
    /// software).
    fn cp_send_direct(
        &mut self,
        port: &mut NetPort,
        head: &mut TxStage,
        pieces: &[Piece],
        skip: usize,
        len: usize,
    ) -> bool {
        let (room, head) = head.split();
        let tag = self.tx_tag();
        // A checksum or a large send the peer cannot take needs the whole frame.
        let peer = self.tx_peer(port);
        let (opts1, _) = self.cp_tx_opts;
        // Without an offload the frame goes as the guest wrote it: its headers need no parse.
        let layers = (opts1 & (TX_LGSEN | TX_TCPCS | TX_UDPCS | TX_IPCS) != 0)
            .then(|| offload::parse_head(head, len))
            .flatten()
            .filter(|a| a.ipv4);
        let mut hdr = None;
        if opts1 & TX_LGSEN != 0 {
            let mss = ((opts1 >> TX_MSS_SHIFT) & TX_MSS_MASK) as usize;
            let Some(at) = layers else {
                return false;
            };
            match offload::prepare_gso_head(head, len, &at, mss, peer) {
                Some(h) => hdr = Some(h),
                None => return false,
            }
        } else if let Some(at) = layers {
            let tcp = at.proto == offload::IPPROTO_TCP && opts1 & TX_TCPCS != 0;
            let udp = at.proto == offload::IPPROTO_UDP && opts1 & TX_UDPCS != 0;
            if tcp || udp {
                if !peer.csum {
                    return false;
                }
                hdr = offload::prepare_csum_head(head, len, &at);
                if hdr.is_none() {
                    return false;
                }
            }
            if opts1 & TX_IPCS != 0 {
                // Recomputed from scratch: the same result if the frame is copied after all.
                offload::fill_ipv4_checksum_head(head, len, &at);
            }
        }
        let out = Out {
            hdr,
            tag,
            room: Some(room),
        };
        self.send_pieces(port, out, head, pieces, skip, len);
        true
    }

    /// The offloads a peer takes for this frame: those of a tap with a virtio-net header,
    /// unless a tag inserted here moves the offsets.
    fn tx_peer(&self, port: &NetPort) -> Offloads {
        match self.tx_tag() {
            None => port.peer_offloads(),
            Some(_) => Offloads::default(),
        }
    }

    /// The VLAN tag the frame's first descriptor asks to insert, as it goes on the wire.
    fn tx_tag(&self) -> Option<[u8; 4]> {
        let (_, opts2) = self.cp_tx_opts;
        // The tag sits byte-swapped in the descriptor, as the driver put it.
        let tci = (opts2 as u16).swap_bytes().to_be_bytes();
        (opts2 & TX_TAGC != 0).then_some([0x81, 0x00, tci[0], tci[1]])
    }

    /// [`Self::cp_send_offloaded`] on a frame copied out whole.
    fn cp_send_copied(&mut self, port: &mut NetPort, frame: &mut TxStage) {
        let (opts1, _) = self.cp_tx_opts;
        // The tag goes in as the frame (or each of its segments) leaves.
        let tag = self.tx_tag();
        let layers = offload::parse(frame);
        // A peer that takes offloads checksums and segments the frame itself.
        let peer = self.tx_peer(port);
        let mut hdr = None;
        let mut segmented = false;
        if opts1 & TX_LGSEN != 0 {
            let mss = ((opts1 >> TX_MSS_SHIFT) & TX_MSS_MASK) as usize;
            if let Some(at) = layers.filter(|a| a.ipv4) {
                hdr = offload::prepare_gso(frame, &at, mss, peer);
            }
            if let Some(at) = layers.filter(|a| a.ipv4 && hdr.is_none()) {
                let mut scratch = std::mem::take(&mut self.tx_scratch);
                let r: Result<bool, ()> =
                    offload::segment_tcp(frame, &at, mss, &mut scratch, |s| {
                        self.send_frame(port, s, tag);
                        Ok(())
                    });
                segmented = r == Ok(true);
                self.tx_scratch = scratch;
            }
        } else if let Some(at) = layers.filter(|a| a.ipv4) {
            if opts1 & TX_IPCS != 0 {
                offload::fill_ipv4_checksum(frame, &at);
            }
            let tcp = at.proto == offload::IPPROTO_TCP && opts1 & TX_TCPCS != 0;
            let udp = at.proto == offload::IPPROTO_UDP && opts1 & TX_UDPCS != 0;
            if tcp || udp {
                if peer.csum {
                    hdr = offload::prepare_csum(frame, &at);
                }
                if hdr.is_none() {
                    offload::fill_l4_checksum(frame, &at);
                }
            }
        }
        if !segmented {
            let (room, frame) = frame.split();
            let len = frame.len();
            let out = Out {
                hdr,
                tag,
                room: Some(room),
            };
            self.send_pieces(port, out, frame, &[], 0, len);
        }
    }
}
