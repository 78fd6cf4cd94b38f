//! A guest's repeated handshake segments, made harmless before libslirp sees them.
//!
//! libslirp (4.7) reads the MSS option of every SYN segment it is given, also on a
//! connection that is long established, and re-sizes the connection's buffers on it
//! (`tcp_mss` -> `sbreserve`), which empties them: whatever the host had sent that the
//! guest had not yet acknowledged, and whatever the guest had sent that the host had not
//! yet taken, is gone, and the stream goes on past the hole as if nothing happened. A guest
//! sends its SYN or SYN-ACK again whenever the other side's answer is late, which on a
//! loaded host or an emulated CPU is common.
//!
//! So the first SYN (or SYN-ACK) of a connection goes through as it is, and a repeat of it
//! (same addresses, ports, flags and sequence number) goes through without its MSS option:
//! the four bytes become NOPs and the TCP checksum is updated incrementally (a checksum
//! that was wrong stays wrong). libslirp still answers the repeat as TCP asks.

use crate::csum::{fold, ones_sum};
use std::collections::{HashSet, VecDeque};

/// How many handshakes are remembered (the oldest is forgotten first). A guest repeats a
/// handshake segment within a minute or so; this many connections opened in that time is
/// far more than a test guest makes, and the cost of forgetting is only the old behaviour.
const REMEMBERED: usize = 1024;

const TCP: u8 = 6;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
const OPT_EOL: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;

/// Source and destination address (IPv4 as the low four bytes), ports, flags, sequence.
type Key = ([u8; 16], [u8; 16], [u8; 4], u8, u32);

#[derive(Default)]
pub struct HandshakeGuard {
    seen: HashSet<Key>,
    order: VecDeque<Key>,
}

impl HandshakeGuard {
    /// Looks at one frame from the guest; a repeated SYN loses its MSS option. Returns
    /// whether the frame was changed.
    pub fn check(&mut self, frame: &mut [u8]) -> bool {
        let Some((src, dst, tcp)) = tcp_segment(frame) else {
            return false;
        };
        if tcp.len() < 20 || tcp[13] & (SYN | RST) != SYN {
            return false;
        }
        let key = (
            src,
            dst,
            [tcp[0], tcp[1], tcp[2], tcp[3]],
            tcp[13] & (SYN | ACK),
            u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        );
        if self.seen.insert(key) {
            if self.order.len() == REMEMBERED {
                if let Some(old) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            }
            self.order.push_back(key);
            return false;
        }
        strip_mss(tcp)
    }
}

/// The addresses and the TCP header and payload of an unfragmented (or first-fragment)
/// IPv4 or IPv6 TCP frame.
fn tcp_segment(frame: &mut [u8]) -> Option<([u8; 16], [u8; 16], &mut [u8])> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get_mut(14..)?;
    let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
    match ethertype {
        0x0800 => {
            let ihl = usize::from(*ip.first()? & 0x0f) * 4;
            if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl || ip[9] != TCP {
                return None;
            }
            // Only the first fragment carries the TCP header.
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            src[12..].copy_from_slice(&ip[12..16]);
            dst[12..].copy_from_slice(&ip[16..20]);
            Some((src, dst, ip.get_mut(ihl..total.clamp(ihl, ip.len()))?))
        }
        0x86dd => {
            if ip.len() < 40 || ip[0] >> 4 != 6 || ip[6] != TCP {
                return None;
            }
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            src.copy_from_slice(&ip[8..24]);
            dst.copy_from_slice(&ip[24..40]);
            let end = (40 + payload).min(ip.len());
            Some((src, dst, ip.get_mut(40..end)?))
        }
        _ => None,
    }
}

/// Turns the MSS option of this TCP header into NOPs; whether there was one.
fn strip_mss(tcp: &mut [u8]) -> bool {
    let doff = usize::from(tcp[12] >> 4) * 4;
    if doff < 20 || doff > tcp.len() {
        return false;
    }
    let mut at = 20;
    while at < doff {
        match tcp[at] {
            OPT_EOL => return false,
            OPT_NOP => at += 1,
            kind => {
                let len = usize::from(*tcp.get(at + 1).unwrap_or(&0));
                if len < 2 || at + len > doff {
                    return false;
                }
                if kind == OPT_MSS && len == 4 {
                    rewrite(tcp, at, &[OPT_NOP; 4]);
                    return true;
                }
                at += len;
            }
        }
    }
    false
}

/// Replaces `new.len()` bytes at `at` (past the checksum field) and updates the TCP
/// checksum by the difference (RFC 1624: HC' = ~(~HC + ~m + m')).
fn rewrite(tcp: &mut [u8], at: usize, new: &[u8]) {
    let start = at & !1;
    let end = (at + new.len() + 1) & !1;
    let old = fold(ones_sum(&tcp[start..end.min(tcp.len())]));
    tcp[at..at + new.len()].copy_from_slice(new);
    let now = fold(ones_sum(&tcp[start..end.min(tcp.len())]));
    let hc = u16::from_be_bytes([tcp[16], tcp[17]]);
    let c = !fold(u64::from(!hc) + u64::from(!old) + u64::from(now));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 (or IPv6) TCP frame with these flags, sequence number and options, with a
    /// right checksum.
    fn segment(v6: bool, flags: u8, seq: u32, options: &[u8]) -> Vec<u8> {
        let mut t = vec![0xa0, 0x00, 0x13, 0x89];
        t.extend_from_slice(&seq.to_be_bytes());
        t.extend_from_slice(&[0; 4]);
        t.push((((20 + options.len()) / 4) << 4) as u8);
        t.push(flags);
        t.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        t.extend_from_slice(options);
        t.extend_from_slice(b"xyz");
        // fec0::f and fec0::2, or 10.0.2.15 and 10.0.2.2.
        let addr = |last: u8| -> Vec<u8> {
            if v6 {
                let mut a = vec![0; 16];
                a[..2].copy_from_slice(&[0xfe, 0xc0]);
                a[15] = last;
                a
            } else {
                vec![10, 0, 2, last]
            }
        };
        let (src, dst) = (addr(15), addr(2));
        let mut f = vec![0x52, 0x55, 10, 0, 2, 2, 0x52, 0x54, 0, 0x12, 0x34, 0x56];
        if v6 {
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend_from_slice(&(t.len() as u16).to_be_bytes());
            f.extend_from_slice(&[TCP, 64]);
        } else {
            f.extend_from_slice(&[8, 0, 0x45, 0]);
            f.extend_from_slice(&((20 + t.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0, 0x40, 0, 64, TCP, 0, 0]);
        }
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        let c = !checksum(&src, &dst, &t);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&t);
        f
    }

    /// The one's-complement sum of the pseudo-header and segment (0xffff when right).
    fn checksum(src: &[u8], dst: &[u8], t: &[u8]) -> u16 {
        let mut p = src.to_vec();
        p.extend_from_slice(dst);
        p.extend_from_slice(&[0, TCP]);
        p.extend_from_slice(&(t.len() as u16).to_be_bytes());
        fold(ones_sum(&p) + ones_sum(t))
    }

    fn valid(f: &[u8]) -> bool {
        if f[12] == 8 {
            checksum(&f[26..30], &f[30..34], &f[34..]) == 0xffff
        } else {
            checksum(&f[22..38], &f[38..54], &f[54..]) == 0xffff
        }
    }

    const MSS: [u8; 4] = [OPT_MSS, 4, 0x05, 0xb4];

    #[test]
    fn a_repeated_syn_loses_its_mss_and_keeps_a_right_checksum() {
        for v6 in [false, true] {
            // MSS at an even and at an odd offset, among other options.
            for opts in [
                [&MSS[..], &[1, 3, 3, 7]].concat(),
                [&[1u8][..], &MSS, &[1, 1, 1]].concat(),
                [&[4u8, 2][..], &[1], &MSS, &[0]].concat(),
            ] {
                for flags in [SYN, SYN | ACK] {
                    let mut g = HandshakeGuard::default();
                    let first = segment(v6, flags, 77, &opts);
                    assert!(valid(&first));
                    let mut f = first.clone();
                    assert!(!g.check(&mut f), "the first SYN goes as it is");
                    assert_eq!(f, first);
                    let mut f = first.clone();
                    assert!(g.check(&mut f), "v6 {v6} {opts:?}");
                    assert!(valid(&f), "checksum after the rewrite, v6 {v6} {opts:?}");
                    let at = f.windows(4).position(|w| w == MSS);
                    assert_eq!(at, None, "the MSS option is gone");
                    assert_eq!(f.len(), first.len());
                    let diff = f.iter().zip(&first).filter(|(a, b)| a != b).count();
                    assert!(diff <= 6, "only the option and checksum change");
                }
            }
        }
    }

    #[test]
    fn a_bad_checksum_stays_bad() {
        let mut g = HandshakeGuard::default();
        let mut f = segment(false, SYN, 1, &MSS);
        let n = f.len();
        f[n - 1] ^= 0x40;
        assert!(!valid(&f));
        g.check(&mut f.clone());
        assert!(g.check(&mut f));
        assert!(!valid(&f));
    }

    #[test]
    fn other_segments_go_as_they_are() {
        let mut g = HandshakeGuard::default();
        let syn = segment(false, SYN, 5, &MSS);
        g.check(&mut syn.clone());
        for mut f in [
            segment(false, SYN, 6, &MSS), // another sequence number: a new connection
            segment(false, SYN | ACK, 5, &MSS), // another flag set
            segment(false, ACK, 5, &MSS), // not a SYN
            segment(false, SYN | RST, 5, &MSS),
        ] {
            let before = f.clone();
            assert!(!g.check(&mut f));
            assert_eq!(f, before);
        }
        // Segments without SYN, or with RST, are never touched, however often they come.
        for mut f in [
            segment(false, ACK, 5, &MSS),
            segment(false, SYN | RST, 5, &MSS),
        ] {
            let before = f.clone();
            assert!(!g.check(&mut f));
            assert_eq!(f, before);
        }
        // A later fragment has no TCP header to read.
        let mut f = syn.clone();
        f[20] = 0x20;
        f[21] = 0x10;
        assert!(!g.check(&mut f));
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_is_forgotten() {
        let mut g = HandshakeGuard::default();
        for seq in 0..REMEMBERED as u32 + 10 {
            g.check(&mut segment(false, SYN, seq, &MSS));
        }
        assert_eq!(g.seen.len(), REMEMBERED);
        assert_eq!(g.order.len(), REMEMBERED);
        assert!(!g.check(&mut segment(false, SYN, 0, &MSS)), "forgotten");
        assert!(g.check(&mut segment(false, SYN, REMEMBERED as u32 + 9, &MSS)));
    }

    #[test]
    fn cut_and_bent_frames_do_no_harm() {
        let mut g = HandshakeGuard::default();
        for v6 in [false, true] {
            let f = segment(v6, SYN, 9, &[&[1u8, 1][..], &MSS].concat());
            for n in 0..f.len() {
                g.check(&mut f[..n].to_vec());
                g.check(&mut f[..n].to_vec());
            }
            for i in 12..f.len() {
                for v in [0u8, 1, 2, 4, 0x0f, 0x45, 0xf0, 0xff] {
                    let mut b = f.clone();
                    b[i] = v;
                    g.check(&mut b.clone());
                    g.check(&mut b);
                }
            }
        }
    }
}
