//! The offload code the NIC models share, called directly: checksums over any range (and
//! the receive side's FCS and sum in one pass, against crc32fast and the plain sum), the
//! frame parser, checksum filling and verification, TCP segmentation, and the virtio-net
//! headers that hand checksums and segmentation to the peer, both on layers the parser found
//! and on layers a driver made up (e1000's context descriptors give the offsets themselves),
//! with VLAN tags inserted as rtl8139 does.

use super::frames::frame;
use super::Bytes;
use crate::harness::{op, Target};
use crate::rng::Rng;
use devices::net::fcs;
use devices::net::offload::{self, Layers};
use net_backends::vnet::VnetHdr;
use net_backends::Offloads;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FakeLayers {
    pub l3: usize,
    pub ipv4: bool,
    pub l4: usize,
    pub proto: u8,
    pub hdr_len: usize,
    pub end: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OffloadOp {
    /// The frame the next operations work on.
    Frame(Bytes),
    /// An 802.1Q tag inserted after the MAC addresses.
    Vlan(u16),
    /// Layers from the parser (none when it refuses the frame).
    Parse,
    /// Layers as a driver claims them.
    Claim(FakeLayers),
    FillIpv4,
    FillL4,
    VerifyIpv4,
    VerifyL4,
    Insert {
        start: usize,
        field: usize,
        end: usize,
    },
    Segment {
        mss: usize,
    },
    Sum {
        from: usize,
        to: usize,
    },
    /// The frame made ready for the peer to segment, with the offloads the peer takes
    /// (bits: csum, tso4, tso6, tso_ecn).
    PrepareGso {
        mss: usize,
        peer: u8,
    },
    PrepareCsum,
    /// The same on the frame's first `cut` bytes only (`_head` variants, as a model that
    /// sends the rest from guest memory calls them): never a read past the cut, and what
    /// they accept, the whole-frame functions do alike.
    HeadOps {
        cut: usize,
        mss: usize,
        peer: u8,
    },
    CsumHdr {
        start: usize,
        field: usize,
    },
}

pub struct Offload;

/// The offloads a peer takes, from bits: csum, tso4, tso6, tso_ecn.
fn peer_offloads(bits: u8) -> Offloads {
    Offloads {
        csum: bits & 1 != 0,
        tso4: bits & 2 != 0,
        tso6: bits & 4 != 0,
        tso_ecn: bits & 8 != 0,
        ufo: false,
    }
}

/// The `_head` functions on `f[..cut]` (the rest of `f` "in guest memory"), each checked
/// against its whole-frame twin: the same answer, the same bytes changed.
fn head_ops(f: &[u8], at: Option<Layers>, cut: usize, mss: usize, peer: u8) {
    let len = f.len();
    let head = &f[..cut.min(len)];
    let parsed = offload::parse_head(head, len);
    if let Some(p) = &parsed {
        assert_eq!(
            offload::parse(f).as_ref(),
            Some(p),
            "parse_head found other layers"
        );
    }
    let Some(a) = parsed.or(at) else {
        return;
    };
    let peer = peer_offloads(peer);
    let (mut h, mut w) = (head.to_vec(), f.to_vec());
    let got = offload::prepare_gso_head(&mut h, len, &a, mss, peer);
    if got.is_some() {
        assert_eq!(got, offload::prepare_gso(&mut w, &a, mss, peer));
        assert!(
            h[..] == w[..h.len()],
            "prepare_gso_head changed other bytes"
        );
    } else {
        assert!(h[..] == head[..], "refused, yet the head changed");
    }
    let (mut h, mut w) = (head.to_vec(), f.to_vec());
    let got = offload::prepare_csum_head(&mut h, len, &a);
    if got.is_some() {
        assert_eq!(got, offload::prepare_csum(&mut w, &a));
        assert!(
            h[..] == w[..h.len()],
            "prepare_csum_head changed other bytes"
        );
    } else {
        assert!(h[..] == head[..], "refused, yet the head changed");
    }
    let mut h = head.to_vec();
    offload::fill_ipv4_checksum_head(&mut h, len, &a);
}

/// What the host kernel checks of a header before it takes the frame: a checksum that starts
/// no earlier than an IPv4 header's length into the frame, its field inside the frame, and
/// the headers no longer than the frame.
fn header_fits(h: &VnetHdr, len: usize) {
    assert!(h.csum_start >= 20, "csum_start {}", h.csum_start);
    let field = h.csum_start as usize + h.csum_offset as usize;
    assert!(
        field + 2 <= len,
        "checksum field at {field} of a {len}-byte frame"
    );
    assert!(h.hdr_len as usize <= len, "hdr_len {} of {len}", h.hdr_len);
}

fn small(rng: &mut Rng) -> usize {
    match rng.below(5) {
        0 => rng.below(70_000) as usize,
        1 => usize::MAX - rng.below(4) as usize,
        _ => rng.below(80) as usize,
    }
}

impl Target for Offload {
    const NAME: &'static str = "offload";
    const ABOUT: &'static str = "checksums, frame parsing, TSO and VLAN insertion, called directly";
    type Op = OffloadOp;

    fn generate(rng: &mut Rng) -> Vec<OffloadOp> {
        let mut ops = vec![OffloadOp::Frame(Bytes(frame(rng)))];
        let n = rng.range(1, 30) as usize;
        while ops.len() < n {
            ops.push(match rng.below(19) {
                0 => OffloadOp::Frame(Bytes(frame(rng))),
                1 => OffloadOp::Vlan(rng.below(0x1_0000) as u16),
                2..=4 => OffloadOp::Parse,
                5 => OffloadOp::Claim(FakeLayers {
                    l3: rng.pick_or(&[14, 18], small),
                    ipv4: rng.chance(70),
                    l4: rng.pick_or(&[34, 38, 54], small),
                    proto: rng.pick_or(&[6, 17], |r| r.below(256) as u8),
                    hdr_len: rng.pick_or(&[54, 58, 74], small),
                    end: small(rng),
                }),
                6 => OffloadOp::FillIpv4,
                7 => OffloadOp::FillL4,
                8 => OffloadOp::VerifyIpv4,
                9 => OffloadOp::VerifyL4,
                10 => OffloadOp::Insert {
                    start: small(rng),
                    field: small(rng),
                    end: small(rng),
                },
                11 | 12 => OffloadOp::Segment {
                    mss: rng.pick_or(&[0, 1, 8, 536, 1448, 9000], small),
                },
                13 => OffloadOp::Sum {
                    from: small(rng),
                    to: small(rng),
                },
                14 => OffloadOp::PrepareGso {
                    mss: rng.pick_or(&[0, 1, 536, 1448, 65_535, 65_536], small),
                    peer: rng.pick_or(&[0xf], |r| r.below(16) as u8),
                },
                15 => OffloadOp::PrepareCsum,
                16 | 17 => OffloadOp::HeadOps {
                    cut: rng.pick_or(&[256], small),
                    mss: rng.pick_or(&[0, 536, 1448, 65_535], small),
                    peer: rng.pick_or(&[0xf], |r| r.below(16) as u8),
                },
                _ => OffloadOp::CsumHdr {
                    start: small(rng),
                    field: small(rng),
                },
            });
        }
        ops
    }

    fn execute(ops: &[OffloadOp]) {
        let mut f: Vec<u8> = vec![];
        let mut at: Option<Layers> = None;
        let mut scratch = Vec::new();
        for (i, o) in ops.iter().enumerate() {
            op(i);
            match o {
                OffloadOp::Frame(b) => {
                    f = b.0.clone();
                    at = None;
                }
                OffloadOp::Vlan(tci) => {
                    if f.len() >= 12 {
                        let t = tci.to_be_bytes();
                        f.splice(12..12, [0x81, 0x00, t[0], t[1]]);
                    }
                }
                OffloadOp::Parse => at = offload::parse(&f),
                OffloadOp::Claim(c) => {
                    at = Some(Layers {
                        l3: c.l3,
                        ipv4: c.ipv4,
                        l4: c.l4,
                        proto: c.proto,
                        hdr_len: c.hdr_len,
                        end: c.end,
                    })
                }
                OffloadOp::FillIpv4 => {
                    if let Some(a) = &at {
                        offload::fill_ipv4_checksum(&mut f, a);
                    }
                }
                OffloadOp::FillL4 => {
                    if let Some(a) = &at {
                        offload::fill_l4_checksum(&mut f, a);
                    }
                }
                OffloadOp::VerifyIpv4 => {
                    if let Some(a) = &at {
                        let _ = offload::ipv4_header_ok(&f, a);
                    }
                }
                OffloadOp::VerifyL4 => {
                    if let Some(a) = &at {
                        let _ = offload::l4_checksum_ok(&f, a);
                    }
                }
                OffloadOp::Insert { start, field, end } => {
                    let _ = offload::insert_checksum(&mut f, *start, *field, *end);
                }
                OffloadOp::Segment { mss } => {
                    if let Some(a) = &at {
                        let mut n = 0usize;
                        let _ = offload::segment_tcp(&f, a, *mss, &mut scratch, |s| {
                            n += 1;
                            if s.len() > f.len() + 64 {
                                panic!(
                                    "a segment ({} bytes) longer than its frame ({})",
                                    s.len(),
                                    f.len()
                                );
                            }
                            Ok::<(), ()>(())
                        });
                    }
                }
                OffloadOp::Sum { from, to } => {
                    if let Some(s) = f.get(*from..*to) {
                        let _ = offload::checksum(s);
                    }
                    // The receive side's one pass (FCS and the segment's sum) against the
                    // two it stands for, over any range, in the frame or not.
                    let (crc, sum) = fcs::crc_and_sum(&f, Some(*from..*to));
                    assert_eq!(crc, crc32fast::hash(&f), "FCS of {} bytes", f.len());
                    // Every kernel this CPU runs gives the same.
                    for &k in fcs::kernels() {
                        let (c, s) = fcs::crc_and_sum_on(Some(k), &f, Some(*from..*to));
                        assert_eq!(c, crc, "{k:?}: FCS of {} bytes", f.len());
                        let (s, sum) = (s.map(offload::fold), sum.map(offload::fold));
                        assert_eq!(s, sum, "{k:?}: sum of {from}..{to} in {} bytes", f.len());
                    }
                    // The FCS alone, of the frame whole and in two pieces.
                    assert_eq!(fcs::crc(&[&f]), crc, "FCS alone of {} bytes", f.len());
                    let (a, b) = f.split_at((*from).min(f.len()));
                    assert_eq!(fcs::crc(&[a, b]), crc, "FCS of {} bytes in two", f.len());
                    let end = (*to).min(f.len());
                    let want = offload::fold(offload::ones_sum(&f[(*from).min(end)..end]));
                    let got = sum.map(offload::fold);
                    assert_eq!(got, Some(want), "sum of {from}..{to} in {} bytes", f.len());
                }
                OffloadOp::PrepareGso { mss, peer } => {
                    if let Some(a) = &at {
                        let peer = peer_offloads(*peer);
                        let before = f.clone();
                        match offload::prepare_gso(&mut f, a, *mss, peer) {
                            Some(h) => {
                                header_fits(&h, f.len());
                                let _ = offload::gso_frames(&h, f.len());
                            }
                            None => assert!(f == before, "refused, yet the frame changed"),
                        }
                    }
                }
                OffloadOp::PrepareCsum => {
                    if let Some(a) = &at {
                        let before = f.clone();
                        match offload::prepare_csum(&mut f, a) {
                            Some(h) => header_fits(&h, f.len()),
                            None => assert!(f == before, "refused, yet the frame changed"),
                        }
                    }
                }
                OffloadOp::CsumHdr { start, field } => {
                    if let Some(h) = offload::csum_hdr(f.len(), *start, *field) {
                        header_fits(&h, f.len());
                    }
                }
                OffloadOp::HeadOps { cut, mss, peer } => head_ops(&f, at, *cut, *mss, *peer),
            }
        }
    }
}
