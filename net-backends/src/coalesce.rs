//! Segments of one TCP stream that reach a tap in one batch go to it as one GSO frame.
//!
//! A guest whose NIC cannot segment for it (8139too, e1000 or virtio-net with TSO off) sends a
//! bulk TCP stream as a run of full-sized segments, one write each. Where the tap carries a
//! virtio-net header, a run of them that the kernel's own segmentation would cut back into
//! exactly the same frames is written as one: headers of the first segment, every segment's
//! payload behind them, `VIRTIO_NET_HDR_GSO_TCPV4` with the segments' payload size. The host
//! either delivers it whole (as after its own GRO) or cuts it where it has to (a bridge port
//! without TSO), into the frames the guest sent, byte for byte. One write instead of dozens.
//!
//! A segment joins the run before it only when that cut gives it back unchanged: IPv4 without
//! options or fragmentation, TCP with ACK alone (PSH allowed on the run's last segment), the
//! same Ethernet, IP and TCP headers apart from what segmentation rewrites (IP length, ID and
//! checksum; TCP sequence number, flags and checksum), the IP ID one more and the sequence
//! number right after the segment before, every payload of the first one's size but the last,
//! which may be shorter, and checksums the kernel would compute anew already right (a guest's
//! deliberately wrong checksum goes out as it was: its frame does not join). Everything else
//! goes as it came. IPv6 is not merged.

use crate::csum::{fold, ones_sum};
use crate::vnet::*;
use std::io::{self, IoSlice};

const ETH: usize = 14;
/// The IPv4 header without options, and the IPv6 header.
const IP4: usize = 20;
const IP6: usize = 40;
/// A virtio-net header and the Ethernet, IP and TCP headers (with options) after it.
const HEAD: usize = VNET_HDR_LEN + ETH + IP6 + 60;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
/// An IPv4 packet's length, and an IPv6 packet's payload length, are 16 bits.
const MAX_IP_LEN: usize = 65_535;

/// Where the headers lie in a frame (counted from its virtio-net header's start) of IPv4 or
/// of IPv6.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ip {
    V4,
    V6,
}

impl Ip {
    /// From the Ethernet type and the first byte after it (IPv4 without options, IPv6).
    fn of(head: &[u8]) -> Option<Ip> {
        let f = head.get(VNET_HDR_LEN..VNET_HDR_LEN + ETH + 1)?;
        match (f[12], f[13], f[14]) {
            (0x08, 0x00, 0x45) => Some(Ip::V4),
            (0x86, 0xdd, v) if v >> 4 == 6 => Some(Ip::V6),
            _ => None,
        }
    }
    /// The IP header's length.
    fn len(self) -> usize {
        match self {
            Ip::V4 => IP4,
            Ip::V6 => IP6,
        }
    }
    /// Where TCP starts, after the Ethernet and IP headers (not counting the virtio-net one).
    fn l4(self) -> usize {
        ETH + self.len()
    }
    /// Where its protocol (next header) byte is, in the IP header.
    fn proto_at(self) -> usize {
        match self {
            Ip::V4 => 9,
            Ip::V6 => 6,
        }
    }
}

/// A frame that may be part of a run.
#[derive(Clone, Copy)]
struct Segment {
    ip: Ip,
    /// The frame's first bytes: its virtio-net header and its headers up to TCP's end.
    head: [u8; HEAD],
    /// How many of them are headers (virtio-net header included).
    hlen: usize,
    payload: usize,
    seq: u32,
    /// The IPv4 ID (none in IPv6).
    id: u16,
    psh: bool,
    /// Its TCP checksum is left to the peer (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    partial: bool,
    /// The sum of its TCP pseudo-header.
    pseudo: u64,
}

impl Segment {
    /// The frame in `pieces` as a segment that may join a run; None when it may not.
    fn of(pieces: &[IoSlice<'_>]) -> Option<Segment> {
        let mut head = [0u8; HEAD];
        let mut got = 0;
        let mut len = 0usize;
        for p in pieces {
            if got < HEAD {
                let n = p.len().min(HEAD - got);
                head[got..got + n].copy_from_slice(&p[..n]);
                got += n;
            }
            len += p.len();
        }
        let ip_kind = Ip::of(&head[..got])?;
        let l4 = ip_kind.l4();
        let vnet = VnetHdr::parse(&head)?;
        let partial = match vnet.flags {
            0 => false,
            VIRTIO_NET_HDR_F_NEEDS_CSUM
                if usize::from(vnet.csum_start) == l4 && vnet.csum_offset == 16 =>
            {
                true
            }
            _ => return None,
        };
        // tun refuses a frame whose hdr_len is longer than it, whatever its GSO type: that
        // one alone would be dropped, so it is not to go inside a merged one.
        if vnet.gso_type != VIRTIO_NET_HDR_GSO_NONE
            || got < VNET_HDR_LEN + l4 + 20
            || usize::from(vnet.hdr_len) > len - VNET_HDR_LEN
        {
            return None;
        }
        let f = &head[VNET_HDR_LEN..];
        let ip = &f[ETH..l4];
        if ip[ip_kind.proto_at()] != 6 {
            return None;
        }
        // The IP packet's length, from its header.
        let (ip_len, addrs, id) = match ip_kind {
            Ip::V4 => {
                let frag = u16::from_be_bytes([ip[6], ip[7]]);
                // A field of 0xffff is a right checksum the kernel never writes (it writes
                // 0 for that sum): cut from a merge, the segment would come out changed.
                if frag & 0x3fff != 0 || fold(ones_sum(ip)) != 0xffff || ip[10..12] == [0xff; 2] {
                    return None;
                }
                let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
                (tot, &ip[12..20], u16::from_be_bytes([ip[4], ip[5]]))
            }
            Ip::V6 => (
                IP6 + usize::from(u16::from_be_bytes([ip[4], ip[5]])),
                &ip[8..40],
                0,
            ),
        };
        let tcp = &f[l4..];
        let thl = usize::from(tcp[12] >> 4) * 4;
        let hlen = VNET_HDR_LEN + l4 + thl;
        let flags = tcp[13];
        let ip_hl = ip_kind.len();
        if ETH + ip_len != len - VNET_HDR_LEN
            || thl < 20
            || hlen > got
            || flags & !PSH != ACK
            || ip_len <= ip_hl + thl
        {
            return None;
        }
        let l4_len = ip_len - ip_hl;
        let pseudo = ones_sum(addrs) + 6 + l4_len as u64;
        let check = u16::from_be_bytes([tcp[16], tcp[17]]);
        // What the peer computes from the field is right only if it holds the
        // pseudo-header's sum (0 and 0xffff are one number in ones' complement). A whole
        // checksum is summed only if the frame is to join a run (`Segment::sum_right`).
        if partial && u32::from(check) % 0xffff != u32::from(fold(pseudo)) % 0xffff {
            return None;
        }
        Some(Segment {
            ip: ip_kind,
            pseudo,
            head,
            hlen,
            payload: l4_len - thl,
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            id,
            psh: flags & PSH != 0,
            partial,
        })
    }

    /// Whether the checksum the peer would compute anew is the frame's own (`pieces`): a
    /// pass over the whole segment, so only for one about to join a run.
    fn sum_right(&self, pieces: &[IoSlice<'_>]) -> bool {
        let t = VNET_HDR_LEN + self.ip.l4();
        // 0xffff: see the IPv4 header's checksum in `Segment::of`.
        self.partial
            || (self.head[t + 16..t + 18] != [0xff; 2]
                && fold(self.pseudo + sum_from(pieces, t)) == 0xffff)
    }

    /// Same stream, same headers, apart from what segmentation rewrites.
    fn same_headers(&self, o: &Segment) -> bool {
        const I: usize = VNET_HDR_LEN + ETH;
        let t = VNET_HDR_LEN + self.ip.l4();
        let same = |r: std::ops::Range<usize>| self.head[r.clone()] == o.head[r];
        // Kept: Ethernet; IPv4's version to TOS, flags to protocol, addresses, or IPv6's
        // version to flow label, next header to addresses; TCP's ports, acknowledgement,
        // data offset, window, urgent pointer, options.
        let ip_same = match self.ip {
            Ip::V4 => same(VNET_HDR_LEN..I + 2) && same(I + 6..I + 10) && same(I + 12..t),
            Ip::V6 => same(VNET_HDR_LEN..I + 4) && same(I + 6..t),
        };
        self.ip == o.ip
            && self.hlen == o.hlen
            && self.partial == o.partial
            && ip_same
            && same(t..t + 4)
            && same(t + 8..t + 13)
            && same(t + 14..t + 16)
            && same(t + 18..self.hlen)
    }
}

/// Ones'-complement sum of a frame's bytes from `skip` on, the frame in `pieces` (a piece
/// that starts at an odd place in it is summed byte-swapped, RFC 1071 2(B)).
fn sum_from(pieces: &[IoSlice<'_>], mut skip: usize) -> u64 {
    let mut sum = 0u64;
    let mut odd = false;
    for p in pieces {
        let Some(b) = p.get(skip..) else {
            skip -= p.len();
            continue;
        };
        skip = 0;
        let s = fold(ones_sum(b));
        sum += u64::from(if odd { s.swap_bytes() } else { s });
        odd ^= b.len() % 2 == 1;
    }
    sum
}

/// A quick look at a frame's first piece, without a copy: false where it is no segment that
/// could join a run (or, with no run open, start one); true where [`Segment::of`] is to
/// decide. Most frames that go alone are turned away here.
fn may_join(pieces: &[IoSlice<'_>], run_open: bool) -> bool {
    let Some(p) = pieces
        .first()
        .filter(|p| p.len() > VNET_HDR_LEN + ETH + IP6 + 13)
    else {
        return true;
    };
    let Some(ip) = Ip::of(p) else {
        return false;
    };
    let flags = p[VNET_HDR_LEN + ip.l4() + 13];
    p[1] == VIRTIO_NET_HDR_GSO_NONE
        && p[VNET_HDR_LEN + ETH + ip.proto_at()] == 6
        && flags & !PSH == ACK
        // PSH only ends a run.
        && (run_open || flags & PSH == 0)
}

/// A run of segments being gathered.
struct Run {
    first: Segment,
    /// Of the last segment so far.
    last_seq: u32,
    last_payload: usize,
    last_id: u16,
    last_psh: bool,
    /// Index of the first segment's frame in the batch.
    at: usize,
    count: usize,
    payload: usize,
    /// Pieces the merged frame would be written in (its headers one).
    pieces: usize,
}

/// Pieces one write takes at most (the kernel's UIO_MAXIOV): a run whose frames come in more
/// pieces than that goes as two.
const MAX_PIECES: usize = 1024;

impl Run {
    /// A run of `first`, the frame at `at` in `pieces` pieces.
    fn new(first: Segment, at: usize, pieces: usize) -> Run {
        Run {
            first,
            last_seq: first.seq,
            last_payload: first.payload,
            last_id: first.id,
            last_psh: first.psh,
            at,
            count: 1,
            payload: first.payload,
            pieces: 1 + pieces,
        }
    }

    /// Whether `s`, a frame in `pieces` pieces, may join.
    fn takes(&self, s: &Segment, pieces: usize) -> bool {
        let gso = self.first.payload;
        // The length field that grows: IPv4's total length, IPv6's payload length.
        let counted = match self.first.ip {
            Ip::V4 => self.first.hlen - VNET_HDR_LEN - ETH,
            Ip::V6 => self.first.hlen - VNET_HDR_LEN - ETH - IP6,
        };
        !self.last_psh
            && self.last_payload == gso
            && s.payload <= gso
            && s.seq == self.last_seq.wrapping_add(self.last_payload as u32)
            && (self.first.ip == Ip::V6 || s.id == self.last_id.wrapping_add(1))
            && counted + self.payload + s.payload <= MAX_IP_LEN
            && self.pieces + pieces <= MAX_PIECES
            && self.first.same_headers(s)
    }

    fn add(&mut self, s: &Segment, pieces: usize) {
        self.pieces += pieces;
        self.last_seq = s.seq;
        self.last_payload = s.payload;
        self.last_id = s.id;
        self.last_psh = s.psh;
        self.count += 1;
        self.payload += s.payload;
    }

    /// The headers of the GSO frame the run goes as: the first segment's, made the whole
    /// run's.
    fn head(&self) -> [u8; HEAD] {
        let mut h = self.first.head;
        let hlen = self.first.hlen;
        let ip_kind = self.first.ip;
        let l4 = ip_kind.l4();
        let hdr = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: match ip_kind {
                Ip::V4 => VIRTIO_NET_HDR_GSO_TCPV4,
                Ip::V6 => VIRTIO_NET_HDR_GSO_TCPV6,
            },
            hdr_len: (hlen - VNET_HDR_LEN) as u16,
            gso_size: self.first.payload as u16,
            csum_start: l4 as u16,
            csum_offset: 16,
            num_buffers: 0,
        };
        h[..VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
        let f = &mut h[VNET_HDR_LEN..hlen];
        let l4_len = hlen - VNET_HDR_LEN - l4 + self.payload;
        let (ip, tcp) = f[ETH..].split_at_mut(ip_kind.len());
        let addrs = match ip_kind {
            Ip::V4 => {
                ip[2..4].copy_from_slice(&((IP4 + l4_len) as u16).to_be_bytes());
                ip[10..12].fill(0);
                let ip_sum = !fold(ones_sum(ip));
                ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
                &ip[12..20]
            }
            Ip::V6 => {
                ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                &ip[8..40]
            }
        };
        let pseudo = fold(ones_sum(addrs) + 6 + l4_len as u64);
        tcp[13] = ACK | if self.last_psh { PSH } else { 0 };
        tcp[16..18].copy_from_slice(&pseudo.to_be_bytes());
        h
    }
}

/// What one batch goes as: each frame of it alone, or as part of a merged one.
#[derive(Default)]
pub(crate) struct Coalescer {
    /// Headers of the merged frames, in order.
    heads: Vec<([u8; HEAD], usize)>,
    /// Each frame that goes: the first frame of the batch it stands for and how many
    /// (1: the frame as it came), and which of `heads` is its, if merged.
    plan: Vec<(usize, usize, Option<usize>)>,
    /// The merged batch's pieces and ends (allocations kept), and its results.
    iov: Vec<IoSlice<'static>>,
    ends: Vec<usize>,
    results: Vec<io::Result<()>>,
}

/// An emptied list of pieces with its allocation, free of the borrow its pieces had.
fn recycle<'b>(mut v: Vec<IoSlice<'_>>) -> Vec<IoSlice<'b>> {
    v.clear();
    // Empty: the closure never runs, and collecting in place keeps the allocation.
    v.into_iter().map(|_| unreachable!()).collect()
}

impl Coalescer {
    /// Finds the runs in a batch (frames as [`crate::NetBackend::send_batch`] takes them,
    /// each with its virtio-net header). False when none has two segments: the batch goes as
    /// it is.
    fn plan(&mut self, iov: &[IoSlice<'_>], ends: &[usize]) -> bool {
        self.heads.clear();
        self.plan.clear();
        let mut run: Option<Run> = None;
        let mut merged = false;
        let frame = |i: usize| {
            let start = i.checked_sub(1).map_or(0, |j| ends[j]);
            iov.get(start..ends[i]).unwrap_or(&[])
        };
        for i in 0..ends.len() {
            let pieces = frame(i);
            let mut seg = if may_join(pieces, run.is_some()) {
                Segment::of(pieces)
            } else {
                None
            };
            if let (Some(r), Some(s)) = (&mut run, &seg) {
                if r.takes(s, pieces.len()) {
                    if r.count == 1 && !r.first.sum_right(frame(r.at)) {
                        // The first goes alone; this one may start a run.
                        self.plan.push((r.at, 1, None));
                        run = None;
                    } else if s.sum_right(pieces) {
                        r.add(s, pieces.len());
                        continue;
                    } else {
                        seg = None;
                    }
                }
            }
            if let Some(r) = run.take() {
                merged |= self.close(r);
            }
            match seg {
                // PSH only ends a run (checked here too where `may_join` could not look).
                Some(s) if !s.psh => run = Some(Run::new(s, i, pieces.len())),
                _ => self.plan.push((i, 1, None)),
            }
        }
        if let Some(r) = run.take() {
            merged |= self.close(r);
        }
        merged
    }

    /// Ends a run: a frame of its own if it has more than one segment. True if so.
    fn close(&mut self, r: Run) -> bool {
        if r.count == 1 {
            self.plan.push((r.at, 1, None));
            return false;
        }
        self.heads.push((r.head(), r.first.hlen));
        self.plan.push((r.at, r.count, Some(self.heads.len() - 1)));
        true
    }

    /// Sends the batch through `send` (the backend's own batch send), with the runs in it
    /// merged; one result per frame of the batch goes to `out` as `send_batch` promises
    /// (a merged frame's result is each of its segments').
    pub(crate) fn send(
        &mut self,
        iov: &[IoSlice<'_>],
        ends: &[usize],
        out: &mut Vec<io::Result<()>>,
        mut send: impl FnMut(&[IoSlice<'_>], &[usize], &mut Vec<io::Result<()>>),
    ) {
        if ends.len() < 2 || !self.plan(iov, ends) {
            return send(iov, ends, out);
        }
        let mut v = recycle(std::mem::take(&mut self.iov));
        self.ends.clear();
        let frame = |i: usize| {
            let start = i.checked_sub(1).map_or(0, |j| ends[j]);
            iov.get(start..ends[i]).unwrap_or(&[])
        };
        for &(at, count, head) in &self.plan {
            match head {
                None => v.extend_from_slice(frame(at)),
                Some(h) => {
                    let (bytes, hlen) = &self.heads[h];
                    v.push(IoSlice::new(&bytes[..*hlen]));
                    for i in at..at + count {
                        push_after(&mut v, frame(i), *hlen);
                    }
                }
            }
            self.ends.push(v.len());
        }
        self.results.clear();
        send(&v, &self.ends, &mut self.results);
        self.iov = recycle(v);
        for (r, &(_, count, _)) in self.results.drain(..).zip(&self.plan) {
            match r {
                Ok(()) => out.extend((0..count).map(|_| Ok(()))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    out.push(Err(e));
                    return;
                }
                Err(e) => {
                    out.extend((1..count).map(|_| Err(copy(&e))));
                    out.push(Err(e));
                }
            }
        }
    }
}

/// The error again (io::Error is not Clone).
fn copy(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Pushes the pieces of `frame` from byte `skip` on.
fn push_after<'a>(v: &mut Vec<IoSlice<'a>>, frame: &[IoSlice<'a>], mut skip: usize) {
    for p in frame {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        let mut rest = *p;
        rest.advance(skip);
        v.push(rest);
        skip = 0;
    }
}

/// Frames of TCP streams as a guest sends them, the kernel's segmentation as a reference and
/// the check of a whole batch: for the tests here and in `tap/mod.rs`, and for the fuzzer.
#[cfg(any(test, feature = "test-backends"))]
pub mod check {
    use super::*;

    /// The IPv4 frames' layout.
    const IP: usize = IP4;
    const L4: usize = ETH + IP4;

    /// A frame's IP version, from its Ethernet type, and where its TCP header starts (after
    /// the virtio-net header).
    fn layout(f: &[u8]) -> (Ip, usize) {
        let ip = if f[VNET_HDR_LEN + 12] == 0x86 {
            Ip::V6
        } else {
            Ip::V4
        };
        (ip, ip.l4())
    }

    /// Where the addresses the pseudo-header sums lie, after the virtio-net header.
    fn addrs(ip: Ip) -> std::ops::Range<usize> {
        match ip {
            Ip::V4 => ETH + 12..ETH + 20,
            Ip::V6 => ETH + 8..ETH + 40,
        }
    }

    /// A segment of a stream over IPv6 (fd00::15 port 40000 to fd00::2 port 80): as [`seg`].
    pub fn seg6(seq: u32, payload: usize, flags: u8, partial: bool) -> Vec<u8> {
        let v4 = seg(seq, 0, payload, flags, partial);
        let mut f = v4[..VNET_HDR_LEN + ETH].to_vec();
        if partial {
            f[6] = (ETH + IP6) as u8;
        }
        f[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14].copy_from_slice(&[0x86, 0xdd]);
        let mut ip = [0u8; IP6];
        ip[..4].copy_from_slice(&[0x60, 0x01, 0x23, 0x45]);
        ip[4..6].copy_from_slice(&((32 + payload) as u16).to_be_bytes());
        ip[6] = 6;
        ip[7] = 64;
        ip[8..10].copy_from_slice(&[0xfd, 0]);
        ip[23] = 0x15;
        ip[24..26].copy_from_slice(&[0xfd, 0]);
        ip[39] = 2;
        f.extend_from_slice(&ip);
        f.extend_from_slice(&v4[VNET_HDR_LEN + L4..]);
        finish_tcp(&mut f, partial);
        f
    }

    pub fn stream6(n: usize, seq: u32, mss: usize, partial: bool) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let s = seq.wrapping_add((i * mss) as u32);
                let flags = if i + 1 == n { ACK | PSH } else { ACK };
                seg6(s, mss, flags, partial)
            })
            .collect()
    }

    /// A segment of a stream from 10.0.2.15:40000 to 10.0.2.2:80 as a guest sends it, with
    /// its virtio-net header: the TCP checksum computed (or, `partial`, left to the peer).
    pub fn seg(seq: u32, id: u16, payload: usize, flags: u8, partial: bool) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN + L4 + 32 + payload];
        if partial {
            f[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
            f[6] = L4 as u8;
            f[8] = 16;
        }
        let e = &mut f[VNET_HDR_LEN..];
        e[..6].copy_from_slice(&[0x52, 0x55, 10, 0, 2, 2]);
        e[6..12].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        e[12..14].copy_from_slice(&[0x08, 0x00]);
        let tot = (IP + 32 + payload) as u16;
        e[14..34].copy_from_slice(&[
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2,
        ]);
        e[16..18].copy_from_slice(&tot.to_be_bytes());
        e[18..20].copy_from_slice(&id.to_be_bytes());
        let s = !fold(ones_sum(&e[14..34]));
        e[24..26].copy_from_slice(&s.to_be_bytes());
        let t = &mut e[L4..];
        t[..4].copy_from_slice(&[0x9c, 0x40, 0, 80]);
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&77u32.to_be_bytes());
        t[12] = 0x80;
        t[13] = flags;
        t[14..16].copy_from_slice(&[0x01, 0xf5]);
        // Timestamps, as Linux sends them.
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0x56, 0x78]);
        for (i, b) in t[32..].iter_mut().enumerate() {
            *b = (seq as usize + i) as u8;
        }
        finish_tcp(&mut f, partial);
        f
    }

    /// Fills in the TCP checksum of a frame (with its virtio-net header): the pseudo-header's
    /// sum if `partial`, else the whole.
    pub fn finish_tcp(f: &mut [u8], partial: bool) {
        let (ip, l4) = layout(f);
        let e = &mut f[VNET_HDR_LEN..];
        let len = e.len() - l4;
        let pseudo = ones_sum(&e[addrs(ip)]) + 6 + len as u64;
        e[l4 + 16..l4 + 18].fill(0);
        let sum = if partial {
            fold(pseudo)
        } else {
            !fold(pseudo + ones_sum(&e[l4..]))
        };
        e[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
    }

    pub fn gather(pieces: &[IoSlice]) -> Vec<u8> {
        pieces.iter().flat_map(|p| p.iter().copied()).collect()
    }

    /// The kernel's TCP segmentation of a GSO frame, as `tcp_gso_segment` and
    /// `inet_gso_segment` (`ipv6_gso_segment`) do it: wire frames with their checksums, each
    /// behind a zero virtio-net header. A frame that is not GSO comes back with its checksum
    /// filled in.
    pub fn cut(f: &[u8]) -> Vec<Vec<u8>> {
        let hdr = VnetHdr::parse(f).unwrap();
        let (ip, l4) = layout(f);
        let whole = |mut g: Vec<u8>| {
            let partial = g[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
            g[..VNET_HDR_LEN].fill(0);
            if partial {
                // The pseudo-header's sum is in the field: add the rest to it.
                let e = &mut g[VNET_HDR_LEN..];
                let sum = !fold(ones_sum(&e[l4..]));
                e[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
            }
            g
        };
        if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE {
            return vec![whole(f.to_vec())];
        }
        let hl = VNET_HDR_LEN + usize::from(hdr.hdr_len);
        let (head, data) = f.split_at(hl);
        let chunks: Vec<&[u8]> = data.chunks(usize::from(hdr.gso_size)).collect();
        let t = VNET_HDR_LEN + l4;
        let id0 = u16::from_be_bytes([head[30], head[31]]);
        let seq0 = u32::from_be_bytes(head[t + 4..t + 8].try_into().unwrap());
        let mut segs = Vec::new();
        for (k, c) in chunks.iter().enumerate() {
            let mut g = head.to_vec();
            g.extend_from_slice(c);
            g[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
            let e = &mut g[VNET_HDR_LEN..];
            if ip == Ip::V4 {
                let tot = (e.len() - ETH) as u16;
                e[16..18].copy_from_slice(&tot.to_be_bytes());
                e[18..20].copy_from_slice(&id0.wrapping_add(k as u16).to_be_bytes());
                e[24..26].fill(0);
                let s = !fold(ones_sum(&e[14..34]));
                e[24..26].copy_from_slice(&s.to_be_bytes());
            } else {
                let pl = (e.len() - ETH - IP6) as u16;
                e[18..20].copy_from_slice(&pl.to_be_bytes());
            }
            let seq = seq0.wrapping_add((k * usize::from(hdr.gso_size)) as u32);
            e[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            if k + 1 < chunks.len() {
                e[l4 + 13] &= !(PSH | 0x01);
            }
            // The pseudo-header sum for this segment's length, then the rest.
            let len = e.len() - l4;
            let pseudo = fold(ones_sum(&e[addrs(ip)]) + 6 + len as u64);
            e[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
            segs.push(whole(g));
        }
        segs
    }

    pub fn stream(n: usize, seq: u32, id: u16, mss: usize, partial: bool) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let s = seq.wrapping_add((i * mss) as u32);
                let flags = if i + 1 == n { ACK | PSH } else { ACK };
                seg(s, id.wrapping_add(i as u16), mss, flags, partial)
            })
            .collect()
    }

    /// The batch in `iov`/`ends` through a `Coalescer` to a backend that takes every frame:
    /// what went to it, each frame gathered, and the answers the batch got.
    pub fn through(iov: &[IoSlice<'_>], ends: &[usize]) -> (Vec<Vec<u8>>, Vec<io::Result<()>>) {
        let mut went = Vec::new();
        let mut out = Vec::new();
        Coalescer::default().send(iov, ends, &mut out, |iov, ends, out| {
            let mut start = 0;
            for &end in ends {
                went.push(gather(&iov[start..end]));
                start = end;
                out.push(Ok(()));
            }
        });
        (went, out)
    }

    /// `frames` as one batch through a `Coalescer`, frame `i` in pieces cut where
    /// `splits[i]` says (places past its end ignored): every frame must be answered, and what
    /// went must be the frames that came, each either as it came or, merged, cut by [`cut`]
    /// back into exactly the frames it stands for. Returns how many merged frames went.
    pub fn batch(frames: &[Vec<u8>], splits: &[Vec<usize>]) -> Result<usize, String> {
        let mut iov = Vec::new();
        let mut ends = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let mut at = 0;
            let mut places: Vec<usize> = splits.get(i).cloned().unwrap_or_default();
            places.sort_unstable();
            for p in places {
                if p > at && p < f.len() {
                    iov.push(IoSlice::new(&f[at..p]));
                    at = p;
                }
            }
            iov.push(IoSlice::new(&f[at..]));
            ends.push(iov.len());
        }
        let (went, out) = through(&iov, &ends);
        if out.len() != frames.len() || out.iter().any(|r| r.is_err()) {
            return Err(format!("{} answers for {} frames", out.len(), frames.len()));
        }
        let (mut next, mut merged) = (0, 0);
        for g in &went {
            if frames.get(next) == Some(g) {
                next += 1;
                continue;
            }
            merged += 1;
            let segs = cut(g);
            if segs.len() < 2 {
                return Err(format!("frame {next} went changed, not merged"));
            }
            for s in segs {
                match frames.get(next) {
                    Some(f) if cut(f) == vec![s] => next += 1,
                    _ => return Err(format!("frame {next} came back changed from a merge")),
                }
            }
        }
        if next != frames.len() {
            return Err(format!("{next} of {} frames went", frames.len()));
        }
        Ok(merged)
    }
}

#[cfg(test)]
mod tests {
    use super::check::*;
    use super::*;

    const L4: usize = ETH + IP4;

    /// What the batch goes to the backend as, each frame gathered.
    fn sent(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let iov: Vec<IoSlice> = frames.iter().map(|f| IoSlice::new(f)).collect();
        let ends: Vec<usize> = (1..=frames.len()).collect();
        let (got, out) = through(&iov, &ends);
        assert_eq!(out.len(), frames.len(), "one result per frame");
        got
    }

    /// Sends `frames` merged, cuts what went as the kernel would, and checks it is the
    /// frames as they came (checksums filled in); returns how many frames went.
    fn round_trip(frames: &[Vec<u8>]) -> usize {
        let went = sent(frames);
        let back: Vec<Vec<u8>> = went.iter().flat_map(|f| cut(f)).collect();
        let want: Vec<Vec<u8>> = frames.iter().flat_map(|f| cut(f)).collect();
        assert_eq!(back.len(), want.len(), "segments");
        for (i, (b, w)) in back.iter().zip(&want).enumerate() {
            assert!(b == w, "segment {i} differs");
        }
        went.len()
    }

    #[test]
    fn a_run_of_segments_goes_as_one_frame_and_cuts_back_into_them() {
        assert_eq!(round_trip(&stream(20, 1000, 7, 1448, false)), 1);
        assert_eq!(round_trip(&stream(20, 1000, 7, 1448, true)), 1);
        // Sequence number and IP ID wrapping inside the run.
        assert_eq!(
            round_trip(&stream(8, u32::MAX - 3000, 65533, 1448, false)),
            1
        );
        // A short last segment; an odd segment size.
        let mut s = stream(5, 1, 1, 999, false);
        s.push(seg(1 + 5 * 999, 6, 17, ACK | PSH, false));
        s[4] = seg(1 + 4 * 999, 5, 999, ACK, false);
        assert_eq!(round_trip(&s), 1);
        // IPv6, and an IPv6 stream after an IPv4 one of the same ports: two frames.
        assert_eq!(round_trip(&stream6(20, 1000, 1448, false)), 1);
        assert_eq!(round_trip(&stream6(20, 1000, 1448, true)), 1);
        let mut both = stream(5, 1, 1, 700, false);
        both[4] = seg(1 + 4 * 700, 5, 700, ACK, false);
        both.extend(stream6(5, 1 + 5 * 700, 700, false));
        assert_eq!(round_trip(&both), 2);
        // A lone frame goes as it is.
        assert!(sent(&stream(1, 1, 1, 100, false)) == stream(1, 1, 1, 100, false));
    }

    #[test]
    fn runs_break_where_segmentation_would_not_give_the_frames_back() {
        let base = stream(6, 5000, 100, 1000, false);
        let with = |i: usize, f: Vec<u8>| {
            let mut s = base.clone();
            s[i] = f;
            s
        };
        // A gap in the sequence; an IP ID out of step; PSH before the end; a short segment
        // before the end; another flag.
        // (The segments after the odd one do not follow it either: three frames.)
        assert_eq!(
            round_trip(&with(3, seg(5000 + 3001, 103, 1000, ACK, false))),
            3
        );
        assert_eq!(
            round_trip(&with(3, seg(5000 + 3000, 200, 1000, ACK, false))),
            3
        );
        assert_eq!(
            round_trip(&with(2, seg(5000 + 2000, 102, 1000, ACK | PSH, false))),
            2
        );
        assert_eq!(
            round_trip(&with(2, seg(5000 + 2000, 102, 999, ACK, false))),
            2
        );
        assert_eq!(
            round_trip(&with(3, seg(5000 + 3000, 103, 1000, ACK | 0x01, false))),
            3
        );
        assert_eq!(
            round_trip(&with(0, seg(5000, 100, 1000, ACK | 0x80, false))),
            2
        );
        // A longer one after the first.
        let mut s = base.clone();
        s.insert(0, seg(4500, 99, 500, ACK, false));
        assert_eq!(round_trip(&s), 2);
        // Checksums the peer would have made anew: a wrong TCP or IP checksum, a wrong
        // pseudo-header sum left for the peer. These frames go as they came.
        let mut bad = base[2].clone();
        bad[VNET_HDR_LEN + L4 + 40] ^= 1;
        assert_eq!(round_trip(&with(2, bad.clone())), 3);
        let mut bad_first = base[0].clone();
        bad_first[VNET_HDR_LEN + L4 + 40] ^= 1;
        assert_eq!(round_trip(&with(0, bad_first)), 2);
        let mut bad_ip = base[2].clone();
        bad_ip[VNET_HDR_LEN + 24] ^= 1;
        assert!(sent(&with(2, bad_ip.clone()))[1] == bad_ip);
        let mut p = stream(6, 5000, 100, 1000, true);
        p[2][VNET_HDR_LEN + L4 + 16] ^= 0x10;
        assert_eq!(sent(&p).len(), 3);
        // Partial and whole checksums do not mix.
        let mut m = stream(6, 5000, 100, 1000, false);
        m[3] = stream(6, 5000, 100, 1000, true).swap_remove(3);
        assert_eq!(round_trip(&m), 3);
        // Another header: a TTL, a port, an ACK number, a timestamp.
        for at in [
            VNET_HDR_LEN + 22,
            VNET_HDR_LEN + L4 + 1,
            VNET_HDR_LEN + L4 + 9,
            VNET_HDR_LEN + L4 + 28,
        ] {
            let mut f = base[3].clone();
            f[at] ^= 1;
            let partial = false;
            // Keep its checksums right: only the header differs.
            let e = &mut f[VNET_HDR_LEN..];
            e[24..26].fill(0);
            let s = !fold(ones_sum(&e[14..34]));
            e[24..26].copy_from_slice(&s.to_be_bytes());
            finish_tcp(&mut f, partial);
            assert_eq!(round_trip(&with(3, f)), 3, "header byte {at}");
        }
        // No more than an IPv4 packet holds: 50 segments of 1448 go as two; IPv6's payload
        // length counts no IP header.
        assert_eq!(round_trip(&stream(50, 9, 9, 1448, false)), 2);
        assert_eq!(round_trip(&stream6(50, 9, 1448, false)), 2);
        // IPv6: the flow label, the hop limit, an address differ.
        let base6 = stream6(6, 5000, 1000, false);
        for at in [
            VNET_HDR_LEN + ETH + 3,
            VNET_HDR_LEN + ETH + 7,
            VNET_HDR_LEN + ETH + 39,
        ] {
            let mut s = base6.clone();
            s[3][at] ^= 1;
            finish_tcp(&mut s[3], false);
            assert_eq!(round_trip(&s), 3, "IPv6 header byte {at}");
        }
        // An IPv6 extension header (hop-by-hop, 0) before TCP: not merged.
        let mut s = base6.clone();
        for f in &mut s {
            f[VNET_HDR_LEN + ETH + 6] = 0;
        }
        assert_eq!(sent(&s).len(), 6);
    }

    #[test]
    fn frames_that_are_not_ipv4_tcp_segments_go_as_they_came() {
        let s = stream(4, 1, 1, 500, false);
        let mut odd = Vec::new();
        // IP options, a fragment, UDP, a frame with padding behind the packet, a GSO frame,
        // an ARP, a runt, an empty frame.
        let mut f = s[1].clone();
        f[VNET_HDR_LEN + 14] = 0x46;
        odd.push(f);
        let mut f = s[1].clone();
        f[VNET_HDR_LEN + 20] = 0x20;
        odd.push(f);
        let mut f = s[1].clone();
        f[VNET_HDR_LEN + 23] = 17;
        odd.push(f);
        let mut f = s[1].clone();
        f.extend_from_slice(&[0; 4]);
        odd.push(f);
        let mut f = s[1].clone();
        f[1] = VIRTIO_NET_HDR_GSO_TCPV4;
        odd.push(f);
        let mut f = s[1].clone();
        f[VNET_HDR_LEN + 12] = 0x08;
        f[VNET_HDR_LEN + 13] = 0x06;
        odd.push(f);
        odd.push(s[1][..40].to_vec());
        odd.push(Vec::new());
        for f in odd {
            let batch = vec![s[0].clone(), f.clone(), s[1].clone(), f, s[2].clone()];
            assert!(sent(&batch) == batch);
        }
    }

    /// A frame in many pieces, split anywhere (odd places too), merges as the same frame
    /// in one piece does.
    #[test]
    fn pieces_anywhere() {
        let s = stream(4, 1, 1, 1001, false);
        let whole = sent(&s);
        assert_eq!(whole.len(), 1);
        for cut_at in [1, 5, 12, 13, 47, 60, 61, 99, 500, 1000] {
            let mut iov = Vec::new();
            let mut ends = Vec::new();
            for f in &s {
                let (a, b) = f.split_at(cut_at.min(f.len()));
                iov.push(IoSlice::new(a));
                iov.push(IoSlice::new(b));
                ends.push(iov.len());
            }
            assert!(through(&iov, &ends).0 == whole, "split at {cut_at}");
        }
    }

    /// Random batches: streams with random bytes changed, cut into random pieces, among
    /// random frames. Every frame is answered; every frame that went merged comes back, cut
    /// as the kernel cuts, exactly as it was sent; every other one went as it came.
    #[test]
    fn random_batches() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n.max(1) as u64) as usize
        };
        let mut merged_runs = 0;
        for _ in 0..1000 {
            let mut frames = Vec::new();
            while frames.len() < 64 {
                match rnd(4) {
                    0 => {
                        let len = rnd(200);
                        frames.push((0..len).map(|_| rnd(256) as u8).collect());
                    }
                    k => {
                        let n = 1 + rnd(12);
                        let mss = 1 + rnd(1500);
                        let (seq, partial) = (rnd(usize::MAX) as u32, rnd(2) == 0);
                        let mut s = if k == 3 {
                            stream6(n, seq, mss, partial)
                        } else {
                            stream(n, seq, rnd(65536) as u16, mss, partial)
                        };
                        for _ in 0..rnd(3) {
                            let f = rnd(s.len());
                            let at = rnd(VNET_HDR_LEN + ETH + IP6 + 40).min(s[f].len() - 1);
                            s[f][at] ^= 1 << rnd(8);
                        }
                        frames.extend(s);
                    }
                }
            }
            frames.truncate(64);
            let splits: Vec<Vec<usize>> = frames
                .iter()
                .map(|f| (0..rnd(4)).map(|_| rnd(f.len())).collect())
                .collect();
            merged_runs += batch(&frames, &splits).unwrap();
        }
        assert!(merged_runs > 300, "only {merged_runs} runs merged");
    }

    /// What the kernel would refuse or write otherwise stays out of a run: a header that
    /// says more header than there is frame; an IPv4 header checksum of 0xffff (right, but
    /// the kernel writes 0 for it). And a run goes in no more pieces than one write takes.
    #[test]
    fn what_the_kernel_refuses_or_rewrites_stays_out() {
        let base = stream(6, 5000, 100, 1000, false);
        let mut s = base.clone();
        s[3][2..4].copy_from_slice(&60_000u16.to_le_bytes());
        assert_eq!(round_trip(&s), 3);
        // An IP ID whose header checksum is 0x0000 at the head of a run: with 0xffff in the
        // field instead, that segment goes alone.
        let id = (0..=u16::MAX)
            .find(|&id| {
                let f = seg(1, id, 10, ACK, false);
                f[VNET_HDR_LEN + 24..VNET_HDR_LEN + 26] == [0, 0]
            })
            .unwrap();
        let mut s = stream(4, 1, id, 10, false);
        assert_eq!(round_trip(&s), 1);
        s[0][VNET_HDR_LEN + 24..VNET_HDR_LEN + 26].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(round_trip(&s), 2);
        // 30 segments in 100 pieces each: no write of more than 1024 pieces.
        let s = stream(30, 1, 1, 1000, false);
        let mut iov = Vec::new();
        let mut ends = Vec::new();
        for f in &s {
            iov.extend(f.chunks(f.len().div_ceil(100)).map(IoSlice::new));
            ends.push(iov.len());
        }
        let mut writes = Vec::new();
        let mut out = Vec::new();
        Coalescer::default().send(&iov, &ends, &mut out, |_, ends, out| {
            let mut start = 0;
            for &end in ends {
                writes.push(end - start);
                start = end;
                out.push(Ok(()));
            }
        });
        assert_eq!(out.len(), 30);
        assert!(
            writes.len() >= 3 && writes.iter().all(|&n| n <= MAX_PIECES),
            "{writes:?}"
        );
    }

    /// A merged frame's answer is each of its segments': sent, refused (WouldBlock: it and
    /// the rest not sent) or failed.
    #[test]
    fn results_fan_out() {
        let mut s = stream(3, 1, 1, 500, false);
        s.push(seg(9999, 50, 10, ACK, false));
        s.extend(stream(2, 100_000, 60, 700, false));
        let iov: Vec<IoSlice> = s.iter().map(|f| IoSlice::new(f)).collect();
        let ends: Vec<usize> = (1..=s.len()).collect();
        for (answers, want) in [
            (vec!["ok", "ok", "ok"], vec!["ok"; 6]),
            (vec!["ok", "block"], vec!["ok", "ok", "ok", "block"]),
            (vec!["block"], vec!["block"]),
            (
                vec!["err", "ok", "err"],
                vec!["err", "err", "err", "ok", "err", "err"],
            ),
        ] {
            let mut out = Vec::new();
            Coalescer::default().send(&iov, &ends, &mut out, |_, ends, out| {
                assert_eq!(ends.len(), 3);
                for a in &answers {
                    out.push(match *a {
                        "ok" => Ok(()),
                        "block" => Err(io::ErrorKind::WouldBlock.into()),
                        _ => Err(io::Error::from_raw_os_error(libc::EIO)),
                    });
                }
            });
            let got: Vec<&str> = out
                .iter()
                .map(|r| match r {
                    Ok(()) => "ok",
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => "block",
                    Err(e) => {
                        assert_eq!(e.raw_os_error(), Some(libc::EIO));
                        "err"
                    }
                })
                .collect();
            assert_eq!(got, want);
        }
    }
}
