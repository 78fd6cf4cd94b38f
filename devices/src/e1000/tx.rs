//! Transmit: legacy, context and data descriptors, checksum insertion, TCP segmentation and
//! VLAN tag insertion. Runs when the guest writes TDT (or TCTL), and again from the I/O
//! thread after the backend pushed back.

use super::rx::{MIN_FRAME, ZEROS};
use super::*;
use crate::net::offload::{insert_checksum, segment_tcp, Layers, IPPROTO_TCP, IPPROTO_UDP};
use net_backends::vnet::VNET_HDR_LEN;
use std::io::IoSlice;
use vm_memory::Bytes;

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
enum Sent {
    Done,
    Blocked,
}

fn le16(d: &[u8; 16], at: usize) -> u16 {
    u16::from_le_bytes([d[at], d[at + 1]])
}

impl TxContext {
    fn parse(d: &[u8; 16]) -> TxContext {
        TxContext {
            ipcss: d[0] as usize,
            ipcso: d[1] as usize,
            ipcse: le16(d, 2) as usize,
            tucss: d[4] as usize,
            tucso: d[5] as usize,
            tucse: le16(d, 6) as usize,
            tucmd: d[11],
            hdrlen: d[13] as usize,
            mss: le16(d, 14) as usize,
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

impl E1000 {
    /// TX from the vCPU thread: when the backend pushes back, the I/O thread takes over
    /// (its TxKick retries and then waits for the backend to turn writable).
    pub(super) fn tx_doorbell(&mut self) {
        let was_blocked = self.tx_blocked;
        self.process_tx();
        if self.tx_blocked && !was_blocked {
            let _ = self.tx_kick.write(1);
        }
    }

    pub(super) fn process_tx(&mut self) {
        if self.tx_error || self.tx_blocked || self.reg(TCTL) & TCTL_EN == 0 {
            return;
        }
        let (head, tail) = (self.reg(TDH) as usize, self.reg(TDT) as usize);
        if head == tail {
            return;
        }
        let n = (self.reg(TDLEN) / DESC_LEN as u32) as usize;
        if n == 0 || head >= n || tail >= n {
            return self.ring_error(true, "TX ring head/tail outside a ring of TDLEN bytes");
        }
        let Some(base) = self.ring_base(TDBAL, TDBAH, n) else {
            return self.ring_error(true, "TX descriptor ring outside guest memory");
        };
        let desc_addr = |i: usize| GuestAddress(base + i as u64 * DESC_LEN);
        // Descriptors from `start` on belong to a frame not sent yet; TDH stays there.
        let mut start = head;
        let mut cur = head;
        let mut first: Option<FrameCmd> = None;
        // Descriptors written back that want TXDW at once, and ones that allow a delay (IDE).
        let (mut wrote_back, mut wrote_back_ide) = (false, false);
        self.tx_buf.clear();
        self.tx_rs.clear();
        // Every descriptor is looked at once at most: the loop is bounded by the ring.
        for _ in 0..n {
            if cur == tail {
                break;
            }
            let idx = cur;
            cur = (cur + 1) % n;
            let mut d = [0u8; 16];
            if self.mem.read_slice(&mut d, desc_addr(idx)).is_err() {
                return self.ring_error(true, "TX descriptor ring outside guest memory");
            }
            let cmd = d[11];
            let dext = cmd & TXD_CMD_DEXT != 0;
            if dext && d[10] >> 4 == TXD_DTYP_CONTEXT {
                self.ctx = TxContext::parse(&d);
                if cmd & TXD_CMD_RS != 0 && self.write_dd(desc_addr(idx)) {
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
            let addr = u64::from_le_bytes(d[..8].try_into().unwrap());
            let len = if dext {
                u32::from_le_bytes([d[8], d[9], d[10] & 0xf, 0]) as usize
            } else {
                le16(&d, 8) as usize
            };
            let f = first.get_or_insert(FrameCmd {
                legacy: !dext,
                tse: dext && cmd & TXD_CMD_TSE != 0,
                popts: if dext { d[13] } else { 0 },
                cso: d[10] as usize,
                css: d[13] as usize,
                eop_cmd: 0,
                special: 0,
            });
            if cmd & TXD_CMD_EOP != 0 {
                f.eop_cmd = cmd;
                f.special = le16(&d, 14);
            }
            let at = self.tx_buf.len();
            if at + len > MAX_FRAME {
                return self.ring_error(true, "TX frame without EOP beyond the largest frame");
            }
            if len > 0 {
                self.tx_buf.resize(at + len, 0);
                if self
                    .mem
                    .read_slice(&mut self.tx_buf[at..], GuestAddress(addr))
                    .is_err()
                {
                    return self.ring_error(true, "TX buffer outside guest memory");
                }
            }
            if cmd & TXD_CMD_RS != 0 {
                self.tx_rs.push((idx as u16, cmd & TXD_CMD_IDE != 0));
            }
            if cmd & TXD_CMD_EOP == 0 {
                continue;
            }
            let f = first.take().expect("set above");
            if let Sent::Blocked = self.transmit(&f) {
                self.tx_blocked = true;
                break;
            }
            self.tx_segs_sent = 0;
            // By index: the list keeps its capacity from frame to frame.
            for k in 0..self.tx_rs.len() {
                let (i, ide) = self.tx_rs[k];
                if self.write_dd(desc_addr(i as usize)) {
                    if ide {
                        wrote_back_ide = true;
                    } else {
                        wrote_back = true;
                    }
                }
            }
            self.tx_rs.clear();
            self.tx_buf.clear();
            start = cur;
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
    fn write_dd(&mut self, desc: GuestAddress) -> bool {
        let ok = self
            .mem
            .write_obj(TXD_STAT_DD, GuestAddress(desc.0 + 12))
            .is_ok();
        if !ok {
            self.ring_error(true, "TX descriptor ring outside guest memory");
        }
        ok
    }

    fn transmit(&mut self, f: &FrameCmd) -> Sent {
        let mut frame = std::mem::take(&mut self.tx_buf);
        let r = self.transmit_frame(&mut frame, f);
        self.tx_buf = frame;
        r
    }

    fn transmit_frame(&mut self, frame: &mut [u8], f: &FrameCmd) -> Sent {
        if frame.is_empty() {
            return Sent::Done; // only null descriptors: nothing goes on the wire
        }
        let vlan =
            (f.eop_cmd & TXD_CMD_VLE != 0 && self.reg(CTRL) & CTRL_VME != 0).then_some(f.special);
        let c = self.ctx;
        if f.tse && c.tucmd & TXD_CMD_TSE != 0 {
            return self.transmit_tso(frame, &c, vlan);
        }
        let len = frame.len();
        if f.legacy {
            if f.eop_cmd & TXD_CMD_IC != 0 {
                insert_checksum(frame, f.css, f.cso, len);
            }
        } else {
            if f.popts & TXD_POPTS_IXSM != 0 {
                insert_checksum(frame, c.ipcss, c.ipcso, cs_end(c.ipcse, len));
            }
            if f.popts & TXD_POPTS_TXSM != 0 {
                insert_checksum(frame, c.tucss, c.tucso, cs_end(c.tucse, len));
            }
        }
        match self.send(frame, vlan) {
            Ok(()) => Sent::Done,
            Err(_) => Sent::Blocked,
        }
    }

    /// TCP segmentation with the offsets the context gave; a context that does not describe
    /// a TCP header inside the frame drops the frame (TSCTFC).
    fn transmit_tso(&mut self, frame: &[u8], c: &TxContext, vlan: Option<u16>) -> Sent {
        let ipv4 = c.tucmd & TXD_TUCMD_IP != 0;
        let at = Layers {
            l3: c.ipcss,
            ipv4,
            l4: c.tucss,
            proto: if c.tucmd & TXD_TUCMD_TCP != 0 {
                IPPROTO_TCP
            } else {
                IPPROTO_UDP
            },
            hdr_len: c.hdrlen,
            end: frame.len(),
        };
        let sane = at.proto == IPPROTO_TCP && c.mss > 0 && at.fit(frame);
        if !sane {
            self.count(TSCTFC, 1);
            if self.errors == 0 {
                log::warn!(
                    "e1000 {}: TSO context does not fit the frame; dropped",
                    self.mac
                );
            }
            self.errors += 1;
            return Sent::Done;
        }
        let mut scratch = std::mem::take(&mut self.tx_scratch);
        let skip = self.tx_segs_sent;
        let mut i = 0;
        let r = segment_tcp(frame, &at, c.mss, &mut scratch, |seg| {
            if i >= skip {
                self.send(seg, vlan)?;
            }
            i += 1;
            Ok::<(), io::Error>(())
        });
        self.tx_scratch = scratch;
        match r {
            Ok(_) => {
                self.count(TSCTC, 1);
                Sent::Done
            }
            Err(_) => {
                self.tx_segs_sent = i;
                Sent::Blocked
            }
        }
    }

    /// Hands one wire frame to the backend, inserting the VLAN tag and padding short frames
    /// (TCTL.PSP). Only WouldBlock is an error; other failures drop the frame.
    fn send(&mut self, frame: &[u8], vlan: Option<u16>) -> io::Result<()> {
        let vnet = [0u8; VNET_HDR_LEN];
        let tag = vlan.map(|tci| {
            let vet = (self.reg(VET) as u16).to_be_bytes();
            let tci = tci.to_be_bytes();
            [vet[0], vet[1], tci[0], tci[1]]
        });
        let tag = tag.filter(|_| frame.len() >= 12);
        let body = frame.len() + if tag.is_some() { 4 } else { 0 };
        let pad = if self.reg(TCTL) & TCTL_PSP != 0 {
            MIN_FRAME.saturating_sub(body)
        } else {
            0
        };
        let mut iov = [IoSlice::new(&[]); 5];
        let mut k = 0;
        if self.backend.capabilities().vnet_hdr {
            iov[k] = IoSlice::new(&vnet);
            k += 1;
        }
        match &tag {
            Some(t) => {
                iov[k] = IoSlice::new(&frame[..12]);
                iov[k + 1] = IoSlice::new(t);
                iov[k + 2] = IoSlice::new(&frame[12..]);
                k += 3;
            }
            None => {
                iov[k] = IoSlice::new(frame);
                k += 1;
            }
        }
        if pad > 0 {
            iov[k] = IoSlice::new(&ZEROS[..pad]);
            k += 1;
        }
        match self.backend.send(&iov[..k]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
            Err(e) => {
                log::debug!("e1000 {}: send failed: {e}", self.mac);
                return Ok(());
            }
        }
        let wire = (body + pad).max(MIN_FRAME) + 4;
        self.count(GPTC, 1);
        self.count(TPT, 1);
        self.count64(GOTCL, wire as u64);
        self.count64(TOTL, wire as u64);
        self.count_size(PTC64, wire);
        if frame.get(..6) == Some(&[0xff; 6]) {
            self.count(BPTC, 1);
        } else if frame.first().is_some_and(|b| b & 1 != 0) {
            self.count(MPTC, 1);
        }
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += body as u64;
        Ok(())
    }
}
