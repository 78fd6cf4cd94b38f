//! Frames a hostile peer or guest would send: mostly well-formed Ethernet/IP/TCP/UDP with one
//! or more header fields lying (lengths, header sizes, offsets), plus short, oversized and
//! 64 KiB ones, and virtio-net headers whose GSO and checksum fields lie.

use crate::rng::Rng;

pub const OUR_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Largest frame a backend hands over (64 KiB GSO frame + Ethernet + VLAN + virtio-net header).
pub const MAX_FRAME: usize = net_backends::MAX_FRAME;

fn dst(rng: &mut Rng) -> [u8; 6] {
    match rng.below(6) {
        0 => [0xff; 6],
        1 => [0x01, 0x00, 0x5e, 0, 0, rng.below(256) as u8],
        2 => [0x33, 0x33, 0, 0, 0, rng.below(256) as u8],
        3 => {
            let b = rng.bytes(6);
            b.try_into().unwrap()
        }
        _ => OUR_MAC,
    }
}

/// A 16-bit field that is right, off by a little, or anything.
fn lie16(rng: &mut Rng, right: usize) -> u16 {
    match rng.below(8) {
        0 => rng.next_u64() as u16,
        1 => 0,
        2 => right.wrapping_add(rng.below(8) as usize) as u16,
        3 => right.wrapping_sub(rng.below(8) as usize) as u16,
        _ => right as u16,
    }
}

/// A TCP or UDP header (with payload) of `payload` bytes.
fn l4(rng: &mut Rng, tcp: bool, payload: usize) -> Vec<u8> {
    let mut h = if tcp {
        let mut h = rng.bytes(20);
        // Data offset: usually 5 (20 bytes) or with options, sometimes impossible (0-4).
        let doff: u8 = match rng.below(6) {
            0 => rng.below(16) as u8,
            1 => rng.below(5) as u8,
            2 => 5 + rng.below(11) as u8,
            _ => 5,
        };
        h[12] = doff << 4 | (h[12] & 0x0f);
        let opts = (doff as usize * 4).saturating_sub(20);
        if rng.chance(70) {
            h.extend(rng.bytes(opts));
        }
        h
    } else {
        let mut h = rng.bytes(8);
        let len = lie16(rng, 8 + payload);
        h[4..6].copy_from_slice(&len.to_be_bytes());
        if rng.chance(20) {
            h[6..8].fill(0);
        }
        h
    };
    h.extend(rng.bytes(payload));
    h
}

fn payload_len(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0 => 0,
        1..=4 => rng.usize(64),
        5..=7 => rng.usize(1500),
        8 => rng.range(1400, 9000) as usize,
        _ => rng.range(9000, 65_000) as usize,
    }
}

/// An IPv4 or IPv6 packet carrying TCP, UDP or something else.
fn ip(rng: &mut Rng, v6: bool) -> Vec<u8> {
    let proto: u8 = match rng.below(8) {
        0..=3 => 6,
        4..=5 => 17,
        6 => 1,
        _ => rng.below(256) as u8,
    };
    let body = if proto == 6 || proto == 17 {
        {
            let n = payload_len(rng);
            l4(rng, proto == 6, n)
        }
    } else {
        {
            let n = payload_len(rng);
            rng.bytes(n)
        }
    };
    if v6 {
        let mut h = rng.bytes(40);
        h[0] = 0x60 | (h[0] & 0x0f);
        if rng.chance(90) {
            h[0] = 0x60;
        }
        h[6] = proto;
        h[4..6].copy_from_slice(&lie16(rng, body.len()).to_be_bytes());
        h.extend(body);
        return h;
    }
    let ihl: u8 = match rng.below(8) {
        0 => rng.below(16) as u8,
        1 => 5 + rng.below(11) as u8,
        _ => 5,
    };
    let mut h = rng.bytes(20);
    h[0] = if rng.chance(95) { 0x40 } else { h[0] & 0xf0 } | ihl;
    h.extend(rng.bytes((ihl as usize * 4).saturating_sub(20)));
    let hlen = h.len();
    h[2..4].copy_from_slice(&lie16(rng, hlen + body.len()).to_be_bytes());
    if rng.chance(80) {
        h[6..8].fill(0); // not a fragment
    }
    h[9] = proto;
    h.extend(body);
    h
}

/// One Ethernet frame (no virtio-net header).
pub fn frame(rng: &mut Rng) -> Vec<u8> {
    match rng.below(20) {
        0 => return rng.bytes_below(14),
        1 => {
            let n = rng.range(14, 2000) as usize;
            return rng.bytes(n);
        }
        2 => {
            let n = rng.range(1515, 9100) as usize;
            return rng.bytes(n);
        }
        3 => {
            let n = rng.range(60_000, MAX_FRAME as u64 + 16) as usize;
            return rng.bytes(n);
        }
        _ => {}
    }
    let mut f = Vec::with_capacity(1600);
    f.extend(dst(rng));
    f.extend([0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]);
    let vlans = match rng.below(10) {
        0 => 1,
        1 => 2,
        _ => 0,
    };
    for _ in 0..vlans {
        f.extend([0x81, 0x00]);
        f.extend(rng.bytes(2));
    }
    match rng.below(10) {
        0..=5 => {
            f.extend([0x08, 0x00]);
            f.extend(ip(rng, false));
        }
        6..=7 => {
            f.extend([0x86, 0xdd]);
            f.extend(ip(rng, true));
        }
        8 => {
            f.extend([0x08, 0x06]);
            f.extend(rng.bytes(28));
        }
        _ => {
            f.extend(rng.bytes(2));
            f.extend(rng.bytes_below(100));
        }
    }
    if rng.chance(10) {
        let n = rng.usize(f.len() + 1);
        f.truncate(n);
    }
    f.truncate(MAX_FRAME);
    f
}

/// A virtio-net header (12 bytes, version 1 layout) whose fields may lie about `frame`.
pub fn vnet_hdr(rng: &mut Rng, frame_len: usize) -> [u8; 12] {
    let mut h = [0u8; 12];
    if rng.chance(30) {
        return h; // no offload: the common case
    }
    h[0] = match rng.below(4) {
        0 => 1, // NEEDS_CSUM
        1 => 2, // DATA_VALID
        2 => rng.below(256) as u8,
        _ => 0,
    };
    h[1] = *[0u8, 1, 3, 4, 0x81, 0x84]
        .get(rng.usize(7))
        .unwrap_or(&(rng.below(256) as u8));
    let fields = [
        lie16(rng, 54),
        lie16(rng, 1448),
        lie16(rng, 34),
        lie16(rng, 16),
        lie16(rng, 1),
    ];
    for (i, v) in fields.iter().enumerate() {
        let v = if rng.chance(10) {
            frame_len.wrapping_add(rng.below(4) as usize) as u16
        } else {
            *v
        };
        h[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
    }
    h
}

/// A frame as a backend with (or without) a virtio-net header delivers it.
pub fn backend_frame(rng: &mut Rng, vnet: bool) -> Vec<u8> {
    let f = frame(rng);
    if !vnet {
        return f;
    }
    if rng.chance(5) {
        return rng.bytes_below(12); // shorter than the header
    }
    let mut out = vnet_hdr(rng, f.len()).to_vec();
    out.extend(f);
    out.truncate(MAX_FRAME);
    out
}

/// A guest-physical address: inside RAM, at its end, across it, or far outside.
pub fn addr(rng: &mut Rng, ram: u64, typical: &[u64]) -> u64 {
    match rng.below(12) {
        0 => ram - rng.range(0, 64),
        1 => ram + rng.below(4096),
        2 => u64::MAX - rng.below(64),
        3 => (1 << 32) - rng.below(64),
        4 => rng.next_u64(),
        5 => rng.below(ram),
        _ => rng.pick(typical) + rng.below(16) * 64,
    }
}
