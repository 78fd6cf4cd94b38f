//! What NICs without a virtio-net header do in "hardware": Internet checksums (RFC 1071) and
//! TCP segmentation. e1000 and the RTL8139C+ both hand the device one large frame plus a few
//! offsets; the model cuts it into wire-sized frames here, so every backend sees only frames
//! it could have seen from a real NIC.
//!
//! When the backend carries a virtio-net header (a tap with IFF_VNET_HDR), the work goes to the
//! peer instead, as QEMU's models do: [`prepare_gso`] and [`prepare_csum`] get the one large
//! frame ready and describe it in a header, and the host kernel checksums or segments it (or
//! delivers it whole to a local socket, where no wire frame is ever made).
//!
//! Everything indexes the frame with checked offsets: a guest that lies about header lengths
//! gets its frame sent as it is (or dropped), never a read outside it.

use net_backends::vnet::{
    VnetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};
use net_backends::Offloads;

pub use net_backends::csum::{fold, ones_sum};

/// The Internet checksum of `data`: what goes into a header's checksum field.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(ones_sum(data))
}

/// Sums `frame[start..end]` (including whatever the checksum field already holds, which is
/// how drivers pass a pseudo-header sum) and stores the result at `field`. `end` is exclusive
/// and clamped to the frame. Returns false, changing nothing, when the offsets do not fit.
pub fn insert_checksum(frame: &mut [u8], start: usize, field: usize, end: usize) -> bool {
    let end = end.min(frame.len());
    if start >= end || field.checked_add(2).is_none_or(|f| f > frame.len()) {
        return false;
    }
    let c = checksum(&frame[start..end]);
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Where the layers of a frame start, as a device finds them (or a driver tells it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layers {
    /// Offset of the IP header.
    pub l3: usize,
    pub ipv4: bool,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    /// Bytes of headers up to and including the TCP/UDP header.
    pub hdr_len: usize,
    /// End of the IP datagram (the frame may carry Ethernet padding after it).
    pub end: usize,
}

impl Layers {
    /// Whether these offsets describe headers inside `frame` that the functions below may
    /// index: an IP header of at least its minimum size before the transport header, a TCP
    /// header of at least 20 bytes (UDP: 8) before `hdr_len`, and `hdr_len <= end <= the
    /// frame's length`. [`parse`] only returns layers that fit; layers a driver describes
    /// (e1000's context descriptor) are checked with this before use.
    pub fn fit(&self, frame: &[u8]) -> bool {
        self.fits(frame, frame.len())
    }

    /// [`Layers::fit`] for a frame of `len` bytes of which `head` holds the first ones: the
    /// headers must be in `head`.
    pub fn fits(&self, head: &[u8], len: usize) -> bool {
        let ip_min = if self.ipv4 { 20 } else { 40 };
        let l4_min = match self.proto {
            IPPROTO_TCP => 20,
            IPPROTO_UDP => 8,
            _ => return false,
        };
        self.l3.checked_add(ip_min).is_some_and(|e| e <= self.l4)
            && self
                .l4
                .checked_add(l4_min)
                .is_some_and(|e| e <= self.hdr_len)
            && self.hdr_len <= self.end
            && self.end <= len
            && self.hdr_len <= head.len()
            && head.len() <= len
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Parses Ethernet (with at most one 802.1Q tag), IPv4 or IPv6 (no extension headers), and
/// TCP or UDP. `None` for anything else or anything that does not fit in the frame.
pub fn parse(frame: &[u8]) -> Option<Layers> {
    parse_head(frame, frame.len())
}

/// [`parse`] for a frame of `len` bytes of which `frame` holds the first ones: `None` also
/// when the headers go on past them.
pub fn parse_head(frame: &[u8], len: usize) -> Option<Layers> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = be16(frame, 12)?;
    if ethertype == ETH_P_8021Q {
        ethertype = be16(frame, 16)?;
        l3 += 4;
    }
    let (ipv4, proto, l4, end) = match ethertype {
        ETH_P_IP => {
            let vihl = *frame.get(l3)?;
            let ihl = (vihl & 0xf) as usize * 4;
            let total = be16(frame, l3 + 2)? as usize;
            let frag = be16(frame, l3 + 6)? & 0x3fff;
            if vihl >> 4 != 4 || ihl < 20 || total < ihl || l3 + total > len || frag != 0 {
                return None;
            }
            (true, *frame.get(l3 + 9)?, l3 + ihl, l3 + total)
        }
        ETH_P_IPV6 => {
            let payload = be16(frame, l3 + 4)? as usize;
            let end = l3 + 40 + payload;
            if frame.get(l3)? >> 4 != 6 || end > len {
                return None;
            }
            (false, *frame.get(l3 + 6)?, l3 + 40, end)
        }
        _ => return None,
    };
    let l4_len = match proto {
        // The data offset counts 32-bit words; fewer than 5 is not a TCP header.
        IPPROTO_TCP => (*frame.get(l4 + 12)? >> 4) as usize * 4,
        IPPROTO_UDP => 8,
        _ => return None,
    };
    let at = Layers {
        l3,
        ipv4,
        l4,
        proto,
        hdr_len: l4 + l4_len,
        end,
    };
    at.fits(frame, len).then_some(at)
}

/// Sum of the TCP/UDP pseudo-header for a transport segment of `l4_len` bytes.
fn pseudo_sum(frame: &[u8], at: &Layers, l4_len: usize) -> u64 {
    let addrs = if at.ipv4 {
        &frame[at.l3 + 12..at.l3 + 20]
    } else {
        &frame[at.l3 + 8..at.l3 + 40]
    };
    ones_sum(addrs) + at.proto as u64 + l4_len as u64
}

/// Fills the IPv4 header checksum (a no-op for IPv6, or for layers that do not fit).
pub fn fill_ipv4_checksum(frame: &mut [u8], at: &Layers) {
    let len = frame.len();
    fill_ipv4_checksum_head(frame, len, at);
}

/// [`fill_ipv4_checksum`] in the headers of a frame of `len` bytes that `frame` begins.
pub fn fill_ipv4_checksum_head(frame: &mut [u8], len: usize, at: &Layers) {
    if at.ipv4 && at.fits(frame, len) {
        frame[at.l3 + 10..at.l3 + 12].fill(0);
        let c = checksum(&frame[at.l3..at.l4]);
        frame[at.l3 + 10..at.l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
}

/// Computes the TCP/UDP checksum from scratch (pseudo-header included), ignoring whatever
/// partial sum the driver left in the field.
pub fn fill_l4_checksum(frame: &mut [u8], at: &Layers) {
    if !at.fit(frame) {
        return;
    }
    let field = l4_field(at);
    frame[field..field + 2].fill(0);
    let l4_len = at.end - at.l4;
    let mut c = !fold(pseudo_sum(frame, at, l4_len) + ones_sum(&frame[at.l4..at.end]));
    if at.proto == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
}

/// Whether a received IPv4 header's checksum verifies (true for IPv6, which has none; false
/// for layers that do not fit the frame).
pub fn ipv4_header_ok(frame: &[u8], at: &Layers) -> bool {
    at.fit(frame) && (!at.ipv4 || fold(ones_sum(&frame[at.l3..at.l4])) == 0xffff)
}

/// The transport segment whose sum verifies its checksum: none for a UDP datagram over IPv4
/// sent without one (a zero checksum), which [`l4_summed_ok`] passes unsummed.
pub fn l4_summed_range(frame: &[u8], at: &Layers) -> Option<std::ops::Range<usize>> {
    let unchecked =
        at.proto == IPPROTO_UDP && at.ipv4 && frame.get(at.l4 + 6..at.l4 + 8) == Some(&[0, 0][..]);
    (!unchecked).then_some(at.l4..at.end)
}

/// Whether a received TCP/UDP checksum verifies, pseudo-header included. A zero UDP checksum
/// over IPv4 means "none" and passes.
pub fn l4_checksum_ok(frame: &[u8], at: &Layers) -> bool {
    l4_summed_ok(frame, at, None)
}

/// [`l4_checksum_ok`] with the sum of the segment (`frame[at.l4..at.end]`, as [`ones_sum`]
/// gives it) already taken, when `sum` holds it.
pub fn l4_summed_ok(frame: &[u8], at: &Layers, sum: Option<u64>) -> bool {
    if !at.fit(frame) {
        return false;
    }
    let Some(segment) = l4_summed_range(frame, at) else {
        return true;
    };
    let sum = sum.unwrap_or_else(|| ones_sum(&frame[segment]));
    fold(pseudo_sum(frame, at, at.end - at.l4) + sum) == 0xffff
}

/// Where the host kernel accepts a checksum to start at the earliest (an IPv4 header's length).
const MIN_CSUM_START: usize = 20;
/// A `gso_size` the kernel reserves for itself (GSO_BY_FRAGS) and refuses from a tap.
const GSO_BY_FRAGS: u16 = 0xffff;

/// Where the checksum field of the transport header at `at` is.
fn l4_field(at: &Layers) -> usize {
    at.l4 + if at.proto == IPPROTO_TCP { 16 } else { 6 }
}

/// The virtio-net header that asks the peer to checksum `frame[start..]` into the two bytes
/// at `field`, or None when the offsets cannot say that (the field outside the frame or
/// before `start`, offsets over 16 bits) or the host kernel would refuse them (a sum starting
/// within an IPv4 header's length of the frame's start: it takes `start` for the transport
/// header). The sum covers whatever the field holds, as [`insert_checksum`] does.
pub fn csum_hdr(frame_len: usize, start: usize, field: usize) -> Option<VnetHdr> {
    if start < MIN_CSUM_START || start > field || field.checked_add(2)? > frame_len {
        return None;
    }
    Some(VnetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        csum_start: u16::try_from(start).ok()?,
        csum_offset: u16::try_from(field - start).ok()?,
        ..VnetHdr::default()
    })
}

/// Gets a TCP or UDP frame ready for the peer to fill in its transport checksum: the field
/// seeded with the pseudo-header sum (what [`fill_l4_checksum`] would add), and the header
/// that asks for the rest. None, changing nothing, when the datagram does not end where the
/// frame does (the peer sums to the end) or the layers do not fit.
pub fn prepare_csum(frame: &mut [u8], at: &Layers) -> Option<VnetHdr> {
    let len = frame.len();
    prepare_csum_head(frame, len, at)
}

/// [`prepare_csum`] for a frame of `len` bytes of which `frame` holds the first ones, the
/// headers at least: only they are read and changed.
pub fn prepare_csum_head(frame: &mut [u8], len: usize, at: &Layers) -> Option<VnetHdr> {
    if !at.fits(frame, len) || at.end != len {
        return None;
    }
    let hdr = csum_hdr(len, at.l4, l4_field(at))?;
    seed_l4_checksum(frame, at);
    Some(hdr)
}

/// The pseudo-header sum over the transport segment, folded, not complemented, in the
/// checksum field: where the peer's sum starts (`at` fits the frame `frame` begins).
fn seed_l4_checksum(frame: &mut [u8], at: &Layers) {
    let seed = fold(pseudo_sum(frame, at, at.end - at.l4));
    let field = l4_field(at);
    frame[field..field + 2].copy_from_slice(&seed.to_be_bytes());
}

/// Whether `at` (which fits `frame`) is where the frame's own headers say its layers are:
/// IPv4 or IPv6 right after an untagged Ethernet header, the transport header right after the
/// IP header (IPv6: no extension headers), `hdr_len` ending where the TCP data offset says.
fn own_headers(frame: &[u8], at: &Layers) -> bool {
    let (ethertype, version, ip_len) = if at.ipv4 {
        (ETH_P_IP, 4, (frame[at.l3] & 0xf) as usize * 4)
    } else {
        (ETH_P_IPV6, 6, 40)
    };
    at.l3 == ETH_HLEN
        && be16(frame, 12) == Some(ethertype)
        && frame[at.l3] >> 4 == version
        && at.l4 == at.l3 + ip_len
        && (at.ipv4 || frame[at.l3 + 6] == IPPROTO_TCP)
        && at.hdr_len == at.l4 + (frame[at.l4 + 12] >> 4) as usize * 4
}

/// Gets a large TCP frame ready for the peer to segment (the host kernel's GSO, which cuts it
/// as TSO hardware would, or hands it whole to a local socket): the IP length set to the
/// whole datagram and the IPv4 header checksum filled (drivers may leave both zero for the
/// hardware), the TCP checksum seeded with the pseudo-header sum over the whole segment (what
/// the kernel's segmentation adjusts per segment), and the header that asks for it.
///
/// None, changing nothing, when the peer cannot be asked: not TCP at `at`, layers that do not
/// fit or end before the frame does, layers that are not the frame's own headers (the kernel
/// finds them from the Ethernet type, the IP header length and the TCP data offset, where a
/// driver's offsets could say otherwise), an IP length over 65535, an MSS of zero or one the
/// kernel refuses, or an offload `peer` does not take (IPv4 or IPv6 segmentation; ECN when
/// CWR is set).
pub fn prepare_gso(frame: &mut [u8], at: &Layers, mss: usize, peer: Offloads) -> Option<VnetHdr> {
    let len = frame.len();
    prepare_gso_head(frame, len, at, mss, peer)
}

/// [`prepare_gso`] for a frame of `len` bytes of which `frame` holds the first ones, the
/// headers at least: only they are read and changed, so the payload may stay where it is.
pub fn prepare_gso_head(
    frame: &mut [u8],
    len: usize,
    at: &Layers,
    mss: usize,
    peer: Offloads,
) -> Option<VnetHdr> {
    if at.proto != IPPROTO_TCP || !at.fits(frame, len) || at.end != len || !own_headers(frame, at) {
        return None;
    }
    let gso_size = u16::try_from(mss)
        .ok()
        .filter(|&m| m > 0 && m != GSO_BY_FRAGS)?;
    let (len_field, ip_len) = if at.ipv4 {
        (at.l3 + 2, at.end - at.l3)
    } else {
        (at.l3 + 4, at.end - (at.l3 + 40))
    };
    let ip_len = u16::try_from(ip_len).ok()?;
    let mut gso_type = if at.ipv4 {
        peer.tso4.then_some(VIRTIO_NET_HDR_GSO_TCPV4)?
    } else {
        peer.tso6.then_some(VIRTIO_NET_HDR_GSO_TCPV6)?
    };
    if frame[at.l4 + 13] & TCP_CWR != 0 {
        gso_type |= peer.tso_ecn.then_some(VIRTIO_NET_HDR_GSO_ECN)?;
    }
    let hdr = VnetHdr {
        gso_type,
        hdr_len: u16::try_from(at.hdr_len).ok()?,
        gso_size,
        ..csum_hdr(len, at.l4, l4_field(at))?
    };
    frame[len_field..len_field + 2].copy_from_slice(&ip_len.to_be_bytes());
    fill_ipv4_checksum_head(frame, len, at);
    seed_l4_checksum(frame, at);
    Some(hdr)
}

/// How many wire frames the peer makes of a `frame_len`-byte frame sent with `hdr`: one
/// without segmentation, else one per `gso_size` bytes of payload after `hdr_len` (at least
/// one).
pub fn gso_frames(hdr: &VnetHdr, frame_len: usize) -> usize {
    if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE || hdr.gso_size == 0 {
        return 1;
    }
    let payload = frame_len.saturating_sub(hdr.hdr_len as usize);
    payload.div_ceil(hdr.gso_size as usize).max(1)
}

/// Cuts a TCP frame whose payload exceeds `mss` into frames of at most `mss` payload bytes,
/// as TCP segmentation offload hardware does: headers copied, IP length and (IPv4)
/// identification advanced, sequence numbers advanced, FIN/PSH only on the last segment and
/// CWR only on the first, all checksums computed. Each segment is built in `scratch` and
/// handed to `emit`; the first error from `emit` stops the loop and is returned.
///
/// Returns `Ok(false)` without emitting anything when the frame is not TCP at `at`, or `mss`
/// is zero.
pub fn segment_tcp<E>(
    frame: &[u8],
    at: &Layers,
    mss: usize,
    scratch: &mut Vec<u8>,
    emit: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<bool, E> {
    segment_tcp_from(frame, at, mss, 0, scratch, emit)
}

/// [`segment_tcp`] from segment `first` (counting from 0) on: the ones before it are not
/// built (a send that the backend stopped part way goes on where it stopped, without
/// building again what went).
pub fn segment_tcp_from<E>(
    frame: &[u8],
    at: &Layers,
    mss: usize,
    first: usize,
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<bool, E> {
    if at.proto != IPPROTO_TCP || mss == 0 || !at.fit(frame) {
        return Ok(false);
    }
    let payload = &frame[at.hdr_len..at.end];
    let seq0 = u32::from_be_bytes(frame[at.l4 + 4..at.l4 + 8].try_into().unwrap());
    let id0 = u16::from_be_bytes([frame[at.l3 + 4], frame[at.l3 + 5]]);
    let flags0 = frame[at.l4 + 13];
    let n = payload.len().div_ceil(mss).max(1);
    for (i, chunk) in payload
        .chunks(mss)
        .chain(payload.is_empty().then_some(&[][..]))
        .enumerate()
        .skip(first)
    {
        scratch.clear();
        scratch.extend_from_slice(&frame[..at.hdr_len]);
        scratch.extend_from_slice(chunk);
        let seg = Layers {
            end: scratch.len(),
            ..*at
        };
        let ip_len = seg.end - at.l3;
        if at.ipv4 {
            scratch[at.l3 + 2..at.l3 + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
            let id = id0.wrapping_add(i as u16);
            scratch[at.l3 + 4..at.l3 + 6].copy_from_slice(&id.to_be_bytes());
        } else {
            scratch[at.l3 + 4..at.l3 + 6].copy_from_slice(&((ip_len - 40) as u16).to_be_bytes());
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        scratch[at.l4 + 4..at.l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i + 1 < n {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        scratch[at.l4 + 13] = flags;
        fill_ipv4_checksum(scratch, &seg);
        fill_l4_checksum(scratch, &seg);
        emit(scratch)?;
    }
    Ok(true)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use net_backends::vnet::VNET_HDR_LEN;

    /// What a peer does with a frame that came with a virtio-net header asking for a checksum:
    /// the sum from csum_start to the end, stored at csum_start + csum_offset. The header, and
    /// the frame as it then is.
    pub(crate) fn peer_finishes(sent: &[u8]) -> (VnetHdr, Vec<u8>) {
        let h = VnetHdr::parse(sent).expect("a header");
        let mut f = sent[VNET_HDR_LEN..].to_vec();
        if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            let start = h.csum_start as usize;
            let field = start + h.csum_offset as usize;
            let c = checksum(&f[start..]);
            f[field..field + 2].copy_from_slice(&c.to_be_bytes());
        }
        (h, f)
    }

    /// An Ethernet + IPv4 + TCP frame with `payload` bytes of data.
    pub(crate) fn tcp4_frame(payload: usize, vlan: bool) -> Vec<u8> {
        let mut f = vec![
            0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x52, 0x54, 0, 0x12, 0x34, 0x57,
        ];
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        }
        f.extend_from_slice(&[0x08, 0x00]);
        let l3 = f.len();
        let total = (20 + 20 + payload) as u16;
        f.extend_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
        f[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[10, 0, 2, 15, 10, 0, 2, 2]);
        f.extend_from_slice(&[0x9c, 0x40, 0x00, 0x50]); // ports
        f.extend_from_slice(&1000u32.to_be_bytes()); // seq
        f.extend_from_slice(&7u32.to_be_bytes()); // ack
        f.extend_from_slice(&[0x50, TCP_PSH | TCP_FIN | 0x10, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend((0..payload).map(|i| (i * 7) as u8));
        f
    }

    /// A UDP datagram over IPv4 from 52:54:00:12:34:57 to `dst` with `payload` bytes and
    /// its checksums filled in.
    pub(crate) fn udp4_frame(dst: [u8; 6], payload: usize) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x57, 0x08, 0x00]);
        let total = (28 + payload) as u16;
        f.extend_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, IPPROTO_UDP, 0, 0]);
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[10, 0, 2, 15, 10, 0, 2, 2, 0x9c, 0x40, 0x00, 0x35]);
        f.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend((0..payload).map(|i| (i * 5 + 1) as u8));
        let at = parse(&f).unwrap();
        fill_ipv4_checksum(&mut f, &at);
        fill_l4_checksum(&mut f, &at);
        f
    }

    /// Verifies both checksums of an IPv4/TCP frame the way a receiver does.
    fn checksums_ok(f: &[u8]) -> bool {
        let at = parse(f).expect("parses");
        ipv4_header_ok(f, &at) && l4_checksum_ok(f, &at)
    }

    /// The plain definition: one big-endian word at a time.
    fn ones_sum_by_words(data: &[u8]) -> u16 {
        let mut sum = 0u64;
        for w in data.chunks(2) {
            sum += (w[0] as u64) << 8 | w.get(1).copied().unwrap_or(0) as u64;
        }
        fold(sum)
    }

    #[test]
    fn wide_sum_matches_the_definition() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..2048 + 8)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for len in (0..40).chain([1499, 1500, 1514, 2047]) {
            for start in 0..9 {
                let d = &data[start..start + len];
                assert_eq!(
                    fold(ones_sum(d)),
                    ones_sum_by_words(d),
                    "len {len} at {start}"
                );
            }
        }
        let ones = [0xffu8; 1501];
        assert_eq!(fold(ones_sum(&ones)), ones_sum_by_words(&ones));
        assert_eq!(fold(ones_sum(&[0; 64])), 0);
    }

    /// Headers cut short anywhere: no layers, never a read past the head; whole, the same
    /// layers as the whole frame gives.
    #[test]
    fn parse_head_stops_where_the_head_does() {
        let mut v6 = tcp6_frame(3000);
        v6[18..20].copy_from_slice(&(20u16 + 3000).to_be_bytes());
        for f in [tcp4_frame(3000, false), tcp4_frame(3000, true), v6] {
            let whole = parse(&f).unwrap();
            for cut in 0..=whole.hdr_len {
                let at = parse_head(&f[..cut], f.len());
                assert_eq!(at.is_some(), cut == whole.hdr_len, "cut at {cut}");
            }
            assert_eq!(parse_head(&f[..256], f.len()), Some(whole));
            let (mut a, mut b) = (f.clone(), f[..256].to_vec());
            let ha = prepare_gso(&mut a, &whole, 1448, Offloads::ALL);
            let hb = prepare_gso_head(&mut b, f.len(), &whole, 1448, Offloads::ALL);
            assert_eq!(
                (ha, &a[..256]),
                (hb, &b[..]),
                "the same header, the same changes"
            );
        }
    }

    #[test]
    fn rfc1071_example() {
        // The worked example of RFC 1071, section 3.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(ones_sum(&data)), 0xddf2);
        assert_eq!(checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn parses_and_refuses() {
        let f = tcp4_frame(100, false);
        let at = parse(&f).unwrap();
        assert_eq!((at.l3, at.l4, at.hdr_len, at.end), (14, 34, 54, 154));
        let v = parse(&tcp4_frame(10, true)).unwrap();
        assert_eq!((v.l3, v.l4), (18, 38));
        // IHL claiming a 60-byte header in a frame that ends first.
        let mut short = tcp4_frame(0, false);
        short[14] = 0x4f;
        assert_eq!(parse(&short), None);
        // Total length beyond the frame.
        let mut long = tcp4_frame(4, false);
        long[16] = 0xff;
        assert_eq!(parse(&long), None);
        // Truncated anywhere: never a panic.
        for n in 0..f.len() {
            let _ = parse(&f[..n]);
        }
    }

    /// Found by nicvm-fuzz (offload target): a TCP data offset of 2-4 words passed the
    /// parser, and checksum filling and segmentation then indexed past the frame. Minimal case:
    /// a frame whose TCP header claims 8 bytes, then fill or segment.
    #[test]
    fn short_tcp_header_is_not_tcp() {
        for doff in 0..5u8 {
            let mut f = tcp4_frame(4, false);
            f[34 + 12] = doff << 4;
            f.truncate(34 + doff as usize * 4 + 4);
            let total = (f.len() - 14) as u16;
            f[16..18].copy_from_slice(&total.to_be_bytes());
            assert_eq!(parse(&f), None, "data offset {doff}");
        }
    }

    /// Layers a driver made up (e1000 context descriptors) never make these index outside
    /// the frame, whatever they say.
    #[test]
    fn layers_that_do_not_fit_change_nothing() {
        let f = tcp4_frame(100, false);
        let good = parse(&f).unwrap();
        let lies = [
            Layers { l4: 20, ..good },
            Layers {
                hdr_len: good.l4 + 8,
                ..good
            },
            Layers {
                end: f.len() + 1,
                ..good
            },
            Layers {
                l3: usize::MAX - 4,
                ..good
            },
            Layers {
                l4: usize::MAX - 10,
                ..good
            },
            Layers { proto: 1, ..good },
            Layers {
                ipv4: false,
                ..good
            },
        ];
        let mut scratch = vec![];
        for at in lies {
            assert!(!at.fit(&f), "{at:?}");
            let mut g = f.clone();
            fill_ipv4_checksum(&mut g, &at);
            fill_l4_checksum(&mut g, &at);
            assert_eq!(g, f, "{at:?}");
            assert!(!ipv4_header_ok(&f, &at) && !l4_checksum_ok(&f, &at));
            let r: Result<bool, ()> = segment_tcp(&f, &at, 8, &mut scratch, |_| panic!("emitted"));
            assert_eq!(r, Ok(false));
        }
    }

    #[test]
    fn l4_checksum_from_scratch() {
        let mut f = tcp4_frame(333, false);
        let at = parse(&f).unwrap();
        fill_ipv4_checksum(&mut f, &at);
        fill_l4_checksum(&mut f, &at);
        assert!(checksums_ok(&f));
        f[100] ^= 1;
        assert!(!checksums_ok(&f));
    }

    #[test]
    fn insert_checksum_includes_the_seeded_field() {
        let mut f = tcp4_frame(50, false);
        let at = parse(&f).unwrap();
        fill_ipv4_checksum(&mut f, &at);
        // Seed the field with the pseudo-header sum, as a driver does for CHECKSUM_PARTIAL.
        let seed = fold(pseudo_sum(&f, &at, at.end - at.l4));
        f[at.l4 + 16..at.l4 + 18].copy_from_slice(&seed.to_be_bytes());
        assert!(insert_checksum(&mut f, at.l4, at.l4 + 16, usize::MAX));
        assert!(checksums_ok(&f));
        let n = f.len();
        assert!(!insert_checksum(&mut f, 10, n - 1, usize::MAX));
        assert!(!insert_checksum(&mut f, 60, 0, 50));
    }

    /// Ethernet + IPv6 + TCP with `payload` data bytes, headers as a driver leaves them for
    /// TSO (payload length zero).
    fn tcp6_frame(payload: usize) -> Vec<u8> {
        let mut f = tcp4_frame(0, false)[..12].to_vec();
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 0, IPPROTO_TCP, 64]);
        f.extend((0..32).map(|i| 0xfd - i as u8));
        f.extend_from_slice(&[0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 2, 0x50, 0x10]);
        f.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        f.extend((0..payload).map(|i| (i * 11) as u8));
        f
    }

    #[test]
    fn gso_frames_are_prepared_as_the_kernel_takes_them() {
        // e1000_tso leaves the IPv4 length and checksum zero and seeds TCP without the length.
        let mut f = tcp4_frame(60_000, false);
        f[16..18].fill(0);
        f[24..26].fill(0);
        f[50..52].fill(0x5a);
        let at = Layers {
            end: f.len(),
            ..parse(&tcp4_frame(60_000, false)).unwrap()
        };
        let h = prepare_gso(&mut f, &at, 1448, Offloads::ALL).unwrap();
        assert_eq!(
            (h.flags, h.gso_type),
            (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4)
        );
        assert_eq!(
            (h.hdr_len, h.gso_size, h.csum_start, h.csum_offset),
            (54, 1448, 34, 16)
        );
        assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, f.len() - 14);
        // The seed is the pseudo-header over the whole segment: what the peer sums on to a
        // valid checksum (local delivery), and what its segmentation adjusts per segment.
        let mut sent = h.to_bytes().to_vec();
        sent.extend_from_slice(&f);
        assert!(checksums_ok(&peer_finishes(&sent).1));

        // IPv6: the payload length, no header checksum.
        let mut f6 = tcp6_frame(9000);
        let at6 = parse(&{
            let mut g = f6.clone();
            g[18..20].copy_from_slice(&((f6.len() - 54) as u16).to_be_bytes());
            g
        })
        .unwrap();
        let h6 = prepare_gso(&mut f6, &at6, 1440, Offloads::ALL).unwrap();
        assert_eq!(h6.gso_type, VIRTIO_NET_HDR_GSO_TCPV6);
        assert_eq!((h6.hdr_len, h6.csum_start), (74, 54));
        assert_eq!(u16::from_be_bytes([f6[18], f6[19]]) as usize, f6.len() - 54);
        let mut sent = h6.to_bytes().to_vec();
        sent.extend_from_slice(&f6);
        let g6 = peer_finishes(&sent).1;
        assert!(l4_checksum_ok(&g6, &parse(&g6).unwrap()));
    }

    #[test]
    fn gso_is_not_asked_for_what_the_peer_cannot_take() {
        let f = tcp4_frame(10_000, false);
        let at = parse(&f).unwrap();
        let no_tso4 = Offloads {
            tso4: false,
            ..Offloads::ALL
        };
        let mut cwr = f.clone();
        cwr[at.l4 + 13] |= TCP_CWR;
        let no_ecn = Offloads {
            tso_ecn: false,
            ..Offloads::ALL
        };
        let udp = Layers {
            proto: IPPROTO_UDP,
            ..at
        };
        let short = Layers { end: 100, ..at };
        let long_hdr = Layers {
            hdr_len: at.hdr_len + 4,
            ..at
        };
        let tagged = tcp4_frame(10_000, true);
        let tagged_at = parse(&tagged).unwrap();
        for (frame, at, mss, peer, what) in [
            (&f, at, 0, Offloads::ALL, "MSS 0"),
            (&f, at, 65_536, Offloads::ALL, "MSS over 16 bits"),
            (&f, at, 1448, no_tso4, "no IPv4 segmentation"),
            (&cwr, at, 1448, no_ecn, "CWR without ECN"),
            (&f, udp, 1448, Offloads::ALL, "UDP"),
            (
                &f,
                short,
                1448,
                Offloads::ALL,
                "a datagram shorter than the frame",
            ),
            (&f, at, 1448, Offloads::default(), "nothing at all"),
            (&f, at, 0xffff, Offloads::ALL, "MSS GSO_BY_FRAGS"),
            (
                &f,
                long_hdr,
                1448,
                Offloads::ALL,
                "hdr_len past the TCP header",
            ),
            (&tagged, tagged_at, 1448, Offloads::ALL, "a tagged frame"),
        ] {
            let mut g = frame.clone();
            assert_eq!(prepare_gso(&mut g, &at, mss, peer), None, "{what}");
            assert_eq!(&g, frame, "{what}: unchanged");
        }
        let mut cwr_ok = cwr.clone();
        let h = prepare_gso(&mut cwr_ok, &at, 1448, Offloads::ALL).unwrap();
        assert_eq!(
            h.gso_type,
            VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN
        );
        // An IPv4 datagram over 65535 bytes cannot be described to the peer.
        let mut big = tcp4_frame(65_535 - 40, false);
        big.extend_from_slice(&[0; 10]);
        let at_big = Layers {
            end: big.len(),
            ..parse(&tcp4_frame(100, false)).unwrap()
        };
        assert_eq!(
            prepare_gso(&mut big.clone(), &at_big, 1448, Offloads::ALL),
            None
        );
        // The checksum alone: seeded, the peer finishes it.
        let mut c = tcp4_frame(500, false);
        let at_c = parse(&c).unwrap();
        fill_ipv4_checksum(&mut c, &at_c);
        let h = prepare_csum(&mut c, &at_c).unwrap();
        let mut sent = h.to_bytes().to_vec();
        sent.extend_from_slice(&c);
        assert!(checksums_ok(&peer_finishes(&sent).1));
        assert_eq!(csum_hdr(100, 50, 99), None, "field past the end");
        assert_eq!(csum_hdr(100, 60, 50), None, "field before the start");
        assert_eq!(csum_hdr(100, 10, 16), None, "a start the kernel refuses");
    }

    #[test]
    fn segments_like_hardware() {
        let f = tcp4_frame(4000, true);
        let at = parse(&f).unwrap();
        let mut out = vec![];
        let mut scratch = vec![];
        let r: Result<bool, ()> = segment_tcp(&f, &at, 1448, &mut scratch, |s| {
            out.push(s.to_vec());
            Ok(())
        });
        assert_eq!(r, Ok(true));
        assert_eq!(out.len(), 3);
        let mut data = vec![];
        for (i, s) in out.iter().enumerate() {
            assert!(checksums_ok(s), "segment {i} checksums");
            let sat = parse(s).unwrap();
            let seq = u32::from_be_bytes(s[sat.l4 + 4..sat.l4 + 8].try_into().unwrap());
            assert_eq!(seq, 1000 + (i as u32) * 1448);
            assert_eq!(
                u16::from_be_bytes([s[sat.l3 + 4], s[sat.l3 + 5]]),
                0x1234 + i as u16
            );
            let last = i == 2;
            assert_eq!(s[sat.l4 + 13] & (TCP_FIN | TCP_PSH) != 0, last);
            data.extend_from_slice(&s[sat.hdr_len..]);
        }
        assert_eq!(out[0].len(), 18 + 40 + 1448);
        assert_eq!(data, f[at.hdr_len..]);
        // From a later segment: the same segments, those before it not built.
        for first in 0..4 {
            let mut from = vec![];
            let r: Result<bool, ()> = segment_tcp_from(&f, &at, 1448, first, &mut scratch, |s| {
                from.push(s.to_vec());
                Ok(())
            });
            assert_eq!(r, Ok(true));
            assert_eq!(from, out[first.min(3)..], "from {first}");
        }
        // A header-only frame still goes out, once.
        let empty = tcp4_frame(0, false);
        let mut n = 0;
        let _: Result<bool, ()> =
            segment_tcp(&empty, &parse(&empty).unwrap(), 1448, &mut scratch, |s| {
                assert!(checksums_ok(s));
                n += 1;
                Ok(())
            });
        assert_eq!(n, 1);
    }
}
