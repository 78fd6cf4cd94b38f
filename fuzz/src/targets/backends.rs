//! What the backends parse and write themselves: the stream framing (QEMU's 4-byte length
//! prefix, deframed by `stream::Deframer`), the VDE switch's reply (`vde::parse_reply`), and
//! the pcap writer (`-object filter-dump`), the guard that takes the MSS option off a
//! guest's repeated SYN before libslirp sees it, and the tap's merging of a TCP stream's
//! segments into GSO frames (`coalesce`, checked against the kernel's segmentation as
//! `coalesce::check` models it: what went merged must cut back into what came). The deframer is checked against the frames the
//! case put in the stream, the capture file against the frames that crossed the wrapped
//! backend: a wrong answer is a finding, not only a panic.

use super::frames::{backend_frame, frame};
use super::Bytes;
use crate::harness::{op, Target};
use crate::rng::Rng;
use net_backends::mem::pair;
use net_backends::pcap::PcapDump;
use net_backends::slirp::handshake::HandshakeGuard;
use net_backends::stream::{Deframer, HEADER_LEN};
use net_backends::vnet::VNET_HDR_LEN;
use net_backends::{Capabilities, NetBackend, Offloads, MAX_FRAME};
use serde::{Deserialize, Serialize};
use std::io::IoSlice;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BackendOp {
    /// Frames, as a peer sends them, cut into pieces at the given points and pushed one piece
    /// at a time (`len` overrides the true length of a frame: a lying prefix).
    Stream {
        frames: Vec<Bytes>,
        lie: Option<(usize, u32)>,
        cuts: Vec<usize>,
        /// Read through `space`/`filled` rather than `push`.
        direct: bool,
    },
    /// The peer went away: what follows the last whole frame goes.
    StreamEnd,
    /// Bytes the switch answered the handshake with.
    VdeReply(Bytes),
    /// A guest frame through the user network's handshake guard (twice when `again`).
    Handshake { frame: Bytes, again: bool },
    /// A capture of frames crossing a backend with (or without) a virtio-net header.
    Pcap {
        vnet: bool,
        maxlen: u32,
        frames: Vec<(bool, Bytes)>,
    },
    /// A batch to a tap: TCP streams' segments (IPv6 or not, checksums computed or left to
    /// the peer) and other frames, bytes of them changed, each frame in pieces.
    Merge {
        parts: Vec<MergePart>,
        /// (frame, byte, xor) changes.
        flips: Vec<(usize, usize, u8)>,
        /// Where each frame is cut into pieces.
        splits: Vec<Vec<usize>>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MergePart {
    Stream {
        v6: bool,
        n: usize,
        seq: u32,
        id: u16,
        mss: usize,
        partial: bool,
    },
    Frame(Bytes),
}

pub struct Backends;

fn stream_op(rng: &mut Rng) -> BackendOp {
    let n = rng.range(0, 6) as usize;
    let frames: Vec<Bytes> = (0..n)
        .map(|_| {
            if rng.chance(10) {
                Bytes(vec![])
            } else {
                Bytes(frame(rng))
            }
        })
        .collect();
    let total: usize = frames.iter().map(|f| HEADER_LEN + f.0.len()).sum();
    let lie = rng.chance(15).then(|| {
        let which = rng.usize(n.max(1));
        let len = rng.pick_or(
            &[0u32, MAX_FRAME as u32, MAX_FRAME as u32 + 1, u32::MAX],
            |r| r.next_u64() as u32 & 0x1_ffff,
        );
        (which, len)
    });
    let mut cuts: Vec<usize> = (0..rng.below(8)).map(|_| rng.usize(total + 1)).collect();
    cuts.sort_unstable();
    BackendOp::Stream {
        frames,
        lie,
        cuts,
        direct: rng.chance(50),
    }
}

fn reply(rng: &mut Rng) -> Vec<u8> {
    let len = if rng.chance(80) {
        net_backends::vde::REPLY_LEN
    } else {
        rng.usize(200)
    };
    let mut b = rng.bytes(len);
    if rng.chance(70) && b.len() >= 2 {
        b[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        if rng.chance(50) {
            let p = b"/tmp/vde.ctl/003.12345";
            let n = p.len().min(b.len() - 2);
            b[2..2 + n].copy_from_slice(&p[..n]);
            if b.len() > 2 + n && rng.chance(70) {
                b[2 + n] = 0;
            }
        }
    }
    b
}

impl Target for Backends {
    const NAME: &'static str = "backends";
    const ABOUT: &'static str =
        "stream framing, the VDE switch's reply, the pcap writer, slirp's SYN guard, the tap's segment merging";
    type Op = BackendOp;

    fn generate(rng: &mut Rng) -> Vec<BackendOp> {
        (0..rng.range(1, 12))
            .map(|_| match rng.below(14) {
                12 | 13 => merge_op(rng),
                0..=5 => stream_op(rng),
                6 => BackendOp::StreamEnd,
                7 => BackendOp::VdeReply(Bytes(reply(rng))),
                8 | 9 => BackendOp::Handshake {
                    frame: Bytes(syn(rng)),
                    again: rng.chance(60),
                },
                _ => {
                    let vnet = rng.chance(40);
                    let frames = (0..rng.range(0, 6))
                        .map(|_| (rng.chance(50), Bytes(backend_frame(rng, vnet))))
                        .collect();
                    BackendOp::Pcap {
                        vnet,
                        maxlen: rng.pick_or(&[1u32, 14, 60, 65_536], |r| r.below(70_000) as u32),
                        frames,
                    }
                }
            })
            .collect()
    }

    fn execute(ops: &[BackendOp]) {
        let mut d = Deframer::new();
        // Frames pushed and not yet taken, in order; cleared once a lie makes the stream
        // meaningless.
        let mut expected: std::collections::VecDeque<Vec<u8>> = Default::default();
        let mut poisoned = false;
        let mut guard = HandshakeGuard::default();
        for (i, o) in ops.iter().enumerate() {
            op(i);
            match o {
                BackendOp::Stream {
                    frames,
                    lie,
                    cuts,
                    direct,
                } => {
                    let mut stream = vec![];
                    for (k, f) in frames.iter().enumerate() {
                        let len = match lie {
                            Some((which, len)) if *which == k => {
                                poisoned |= *len as usize != f.0.len();
                                *len
                            }
                            _ => f.0.len() as u32,
                        };
                        // A frame longer than any backend takes is refused like a lie.
                        poisoned |= len as usize > MAX_FRAME;
                        stream.extend(len.to_be_bytes());
                        stream.extend(&f.0);
                        if !poisoned {
                            expected.push_back(f.0.clone());
                        }
                    }
                    let mut at = 0;
                    for &c in cuts.iter().chain(std::iter::once(&stream.len())) {
                        let c = c.min(stream.len());
                        if c <= at {
                            continue;
                        }
                        let piece = &stream[at..c];
                        if *direct {
                            let space = d.space(piece.len());
                            space[..piece.len()].copy_from_slice(piece);
                            d.filled(piece.len());
                        } else {
                            d.push(piece);
                        }
                        at = c;
                        // Take what is whole, as the backend's recv does between reads.
                        loop {
                            match d.next_frame() {
                                Ok(Some(got)) => {
                                    if poisoned {
                                        continue;
                                    }
                                    let want = expected.pop_front();
                                    assert_eq!(
                                        Some(got),
                                        want.as_deref(),
                                        "the deframer returned another frame than was sent"
                                    );
                                }
                                Ok(None) => break,
                                Err(_) => {
                                    // A length over MAX_FRAME: the backend drops the peer.
                                    assert!(poisoned, "a frame length error on honest lengths");
                                    d.clear();
                                    expected.clear();
                                    break;
                                }
                            }
                        }
                    }
                }
                BackendOp::StreamEnd => {
                    d.drop_partial();
                    while let Ok(Some(f)) = d.next_frame() {
                        if !poisoned {
                            assert_eq!(Some(f), expected.pop_front().as_deref());
                        }
                    }
                    d.clear();
                    expected.clear();
                    poisoned = false;
                }
                BackendOp::VdeReply(b) => {
                    let _ = net_backends::vde::parse_reply(&b.0);
                }
                BackendOp::Handshake { frame, again } => {
                    handshake(&mut guard, &frame.0);
                    if *again {
                        handshake(&mut guard, &frame.0);
                    }
                }
                BackendOp::Pcap {
                    vnet,
                    maxlen,
                    frames,
                } => pcap(*vnet, *maxlen, frames),
                BackendOp::Merge {
                    parts,
                    flips,
                    splits,
                } => merge(parts, flips, splits),
            }
        }
    }
}

/// A frame for the handshake guard: mostly a TCP SYN (or SYN-ACK) with an MSS option
/// somewhere among its options, its checksum right or not; else anything.
fn syn(rng: &mut Rng) -> Vec<u8> {
    use devices::net::offload::{fill_l4_checksum, parse, IPPROTO_TCP};
    let mut f = frame(rng);
    let Some(at) = parse(&f).filter(|a| a.proto == IPPROTO_TCP) else {
        return f;
    };
    if rng.chance(80) {
        let t = at.l4;
        f[t + 13] = (f[t + 13] & !0x04) | 0x02;
        let opts = at.hdr_len - t - 20;
        if opts >= 4 {
            let o = t + 20 + rng.usize(opts - 3);
            f[t + 20..o].fill(1);
            f[o..o + 4].copy_from_slice(&[2, 4, rng.below(256) as u8, rng.below(256) as u8]);
        }
        if rng.chance(70) {
            fill_l4_checksum(&mut f, &at);
        }
    }
    f
}

/// One frame through the guard: a changed frame keeps its length, differs in at most the
/// four bytes of an option and the two of the TCP checksum, and a TCP checksum that was
/// right stays right.
fn handshake(guard: &mut HandshakeGuard, frame: &[u8]) {
    let mut f = frame.to_vec();
    let changed = guard.check(&mut f);
    assert_eq!(f.len(), frame.len());
    let diff = f.iter().zip(frame).filter(|(a, b)| a != b).count();
    if !changed {
        assert_eq!(diff, 0, "a frame said unchanged was changed");
        return;
    }
    assert!(diff <= 6, "{diff} bytes changed");
    if let Some(at) = devices::net::offload::parse(frame) {
        if devices::net::offload::l4_checksum_ok(frame, &at) {
            assert!(
                devices::net::offload::l4_checksum_ok(&f, &at),
                "the rewrite broke a right checksum"
            );
        }
    }
}

/// Writes `frames` (sent or received) through a capture and checks the file: its header,
/// and per record the lengths and bytes the frame had on the wire (no virtio-net header).
fn pcap(vnet: bool, maxlen: u32, frames: &[(bool, Bytes)]) {
    let caps = Capabilities {
        vnet_hdr: vnet,
        offloads: if vnet {
            Offloads::ALL
        } else {
            Offloads::default()
        },
    };
    let dir = std::env::temp_dir().join(format!("nicvm-fuzz-pcap.{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("c.pcap");
    let (b, peer) = pair(caps);
    let maxlen = maxlen.max(1);
    let file = std::fs::File::create(&path).expect("create the capture");
    let mut dump = PcapDump::new(b, file, maxlen).expect("write its header");
    let mut wire: Vec<Vec<u8>> = vec![];
    let mut buf = vec![0u8; MAX_FRAME];
    for (send, f) in frames {
        if *send {
            // In two pieces, as NIC models hand frames over.
            let cut = f.0.len() / 2;
            dump.send(&[IoSlice::new(&f.0[..cut]), IoSlice::new(&f.0[cut..])])
                .expect("send");
            let skip = if vnet { 12.min(f.0.len()) } else { 0 };
            wire.push(f.0[skip..].to_vec());
        } else {
            // No backend delivers more than MAX_FRAME: what it reads is cut there.
            let f = &f.0[..f.0.len().min(MAX_FRAME)];
            peer.inject(f);
            let n = dump.recv(&mut buf).expect("recv").expect("a frame");
            assert!(&buf[..n] == f, "the capture changed a received frame");
            let skip = if vnet { 12.min(f.len()) } else { 0 };
            wire.push(f[skip..].to_vec());
        }
    }
    drop(dump);
    let file = std::fs::read(&path).expect("read the capture");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(file.len() >= 24, "no pcap header");
    assert_eq!(&file[..4], &0xa1b2_c3d4u32.to_le_bytes());
    assert_eq!(u32::from_le_bytes(file[16..20].try_into().unwrap()), maxlen);
    let mut at = 24;
    for w in &wire {
        let h = file.get(at..at + 16).expect("a record header per frame");
        let incl = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
        let orig = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
        assert_eq!(orig, w.len(), "orig_len is the wire length");
        assert_eq!(
            incl,
            w.len().min(maxlen as usize),
            "incl_len is cut at maxlen"
        );
        let data = file
            .get(at + 16..at + 16 + incl)
            .expect("the record's bytes");
        assert_eq!(data, &w[..incl], "the record holds the frame's first bytes");
        at += 16 + incl;
    }
    assert_eq!(at, file.len(), "nothing after the last record");
}

fn merge_op(rng: &mut Rng) -> BackendOp {
    let parts: Vec<MergePart> = (0..rng.range(1, 8))
        .map(|_| {
            if rng.chance(25) {
                let mut f = vec![0u8; VNET_HDR_LEN];
                if rng.chance(30) {
                    f = rng.bytes(VNET_HDR_LEN);
                }
                f.extend(frame(rng));
                MergePart::Frame(Bytes(f))
            } else {
                MergePart::Stream {
                    v6: rng.chance(30),
                    n: rng.range(1, 50) as usize,
                    seq: rng.below(1 << 32) as u32,
                    id: rng.below(1 << 16) as u16,
                    mss: rng.pick_or(&[1usize, 536, 1220, 1448, 1460], |r| {
                        r.range(1, 1500) as usize
                    }),
                    partial: rng.chance(50),
                }
            }
        })
        .collect();
    let flips = (0..rng.below(4))
        .map(|_| (rng.usize(64), rng.usize(140), 1 << rng.below(8)))
        .collect();
    let splits = (0..rng.below(8))
        .map(|_| (0..rng.below(4)).map(|_| rng.usize(1600)).collect())
        .collect();
    BackendOp::Merge {
        parts,
        flips,
        splits,
    }
}

/// A batch through the tap's merging: every frame answered, and what went merged cuts back
/// into exactly the frames it stands for (`coalesce::check::batch`).
fn merge(parts: &[MergePart], flips: &[(usize, usize, u8)], splits: &[Vec<usize>]) {
    use net_backends::coalesce::check::{stream, stream6};
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for p in parts {
        match p {
            MergePart::Stream {
                v6,
                n,
                seq,
                id,
                mss,
                partial,
            } => {
                let (n, mss) = ((*n).clamp(1, 64), (*mss).clamp(1, 1500));
                frames.extend(if *v6 {
                    stream6(n, *seq, mss, *partial)
                } else {
                    stream(n, *seq, *id, mss, *partial)
                })
            }
            MergePart::Frame(b) => frames.push(b.0.clone()),
        }
    }
    frames.truncate(64);
    for &(f, at, x) in flips {
        if let Some(b) = frames.get_mut(f).and_then(|f| f.get_mut(at)) {
            *b ^= x;
        }
    }
    if let Err(e) = net_backends::coalesce::check::batch(&frames, splits) {
        panic!("coalesce: {e}");
    }
}
