//! What e1000 and rtl8139 compute over a received frame before the guest sees it: the frame
//! check sequence the wire carried after it (a CRC-32, IEEE 802.3) and, for the checksum
//! status they report, the ones'-complement sum of its transport segment. Both from one pass
//! over the frame where the CPU allows.
//!
//! The CRC is the reflected one of the polynomial 0x04C11DB7 that `crc32fast` computes. Where
//! the CPU has VPCLMULQDQ with AVX-512 (F and BW) or AVX2, a frame of [`WIDE_MIN`] bytes or
//! more ([`WIDE_MIN_AVX2`] with AVX2 alone) whose segment's sum is wanted too is folded 64
//! bytes at a time by carry-less multiplication (the folding method of Gopal et al., "Fast
//! CRC Computation for Generic Polynomials Using PCLMULQDQ", Intel, 2009), in one 512-bit
//! vector or two 256-bit ones, and
//! the blocks loaded for the CRC that lie inside the segment are added to the sum as they
//! pass. The frame is folded as if zero bytes came before it, as many as make it end on a
//! whole block (the first block is loaded masked, or copied after zeros where there is no
//! masked load of bytes, and the CRC starts from the register those zeros take to the
//! all-ones one it starts from), and the last 128 bits are reduced to the CRC by Barrett's
//! method; the segment's ends outside whole blocks go through [`ones_sum`]. With AVX-512, a
//! frame's CRC alone takes the same kernel from [`CRC_ALONE_MIN`] bytes. Otherwise
//! `crc32fast` and [`ones_sum`] make two passes.
//!
//! Measured here (an AMD EPYC, whose AVX-512 units are 256 bits wide), 1514 bytes in cache:
//! the one pass about 54 ns with 512-bit vectors and 82 with 256-bit ones, against 86 for the
//! two passes (`crc32fast` 64, [`ones_sum`] of the segment 34); the 512-bit kernel for the CRC
//! alone 56. The folding waits on its multiplications, and the sum fills that time. The
//! 256-bit kernel keeps two accumulators where the 512-bit one keeps four: four spilled out
//! of AVX2's sixteen registers and took 95 ns. On an Intel Xeon (512-bit units), 1514 bytes:
//! the one pass 48 ns with 512-bit vectors and 71 with 256-bit ones, the two passes 94
//! (`crc32fast` 43), the CRC alone through the 512-bit kernel 36; 768 bytes: 35, 45 and 43.

use super::offload::{fold, ones_sum};
use std::ops::Range;
use std::sync::OnceLock;

/// Bytes of the frame check sequence.
pub const FCS_LEN: usize = 4;

/// Frames shorter than this take the two passes where the 512-bit kernel is the fastest the
/// CPU has, and whatever kernel is named to [`crc_and_sum_on`]: the vector set-up costs more
/// than it saves (on an AMD EPYC; on an Intel Xeon the kernel is still 2-4 ns behind up to 384
/// bytes).
pub const WIDE_MIN: usize = 256;

/// Frames shorter than this take the two passes where the 256-bit kernel is the fastest the
/// CPU has: it loses to them below 1 KiB (on an Intel Xeon, 45 against 43 ns at 768 bytes and
/// 53 against 64 at 1024; on an AMD EPYC it lost up to 511 bytes).
pub const WIDE_MIN_AVX2: usize = 1024;

/// Frames shorter than this have their CRC alone from `crc32fast`, which is as fast or faster
/// here below it (and well ahead below 1 KiB).
pub const CRC_ALONE_MIN: usize = 1280;

/// Frames longer than this take the two passes: the kernel's sum would overflow past 2 MiB.
const WIDE_MAX: usize = 1 << 20;

/// A folding kernel: with 512-bit vectors (AVX-512 F and BW) or 256-bit ones (AVX2), both
/// with VPCLMULQDQ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Avx512,
    Avx2,
}

/// The CRC-32 of `parts` one after the other, as the wire carries it after a frame (a frame
/// and its padding, say).
pub fn crc(parts: &[&[u8]]) -> u32 {
    match parts {
        // Measured only with AVX-512: `crc32fast` has a 256-bit kernel of its own.
        [frame] if frame.len() >= CRC_ALONE_MIN && folds(frame) == Some(Kernel::Avx512) => {
            one_pass(Kernel::Avx512, frame, 0..0).0
        }
        _ => {
            let mut h = crc32fast::Hasher::new();
            for p in parts {
                h.update(p);
            }
            h.finalize()
        }
    }
}

/// The CRC-32 of `frame` and, for `sum`, the ones'-complement sum of `frame[sum]` (partly
/// folded: [`fold`] gives what it gives of [`ones_sum`]'s). A range outside the frame sums
/// what of it the frame holds.
pub fn crc_and_sum(frame: &[u8], sum: Option<Range<usize>>) -> (u32, Option<u64>) {
    crc_and_sum_on(folds(frame), frame, sum)
}

/// [`crc_and_sum`] with `kernel` for the one pass where it applies (a sum asked for, a frame
/// of [`WIDE_MIN`] bytes to 1 MiB, a kernel this CPU runs: [`kernels`]); otherwise, or with
/// none, the two passes (whose CRC alone [`crc`] may still fold). Unlike [`crc_and_sum`], it
/// runs the 256-bit kernel from [`WIDE_MIN`] bytes too: tests and benchmarks time it there.
pub fn crc_and_sum_on(
    kernel: Option<Kernel>,
    frame: &[u8],
    sum: Option<Range<usize>>,
) -> (u32, Option<u64>) {
    let sum = sum.map(|r| {
        let end = r.end.min(frame.len());
        r.start.min(end)..end
    });
    match (kernel, sum) {
        (Some(k), Some(r))
            if (WIDE_MIN..=WIDE_MAX).contains(&frame.len()) && kernels().contains(&k) =>
        {
            let (crc, sum) = one_pass(k, frame, r);
            (crc, Some(sum))
        }
        (_, r) => (crc(&[frame]), r.map(|r| ones_sum(&frame[r]))),
    }
}

/// The kernel that takes `frame` here, if any.
fn folds(frame: &[u8]) -> Option<Kernel> {
    folds_with(kernels().first().copied(), frame.len())
}

/// Whether a CPU whose fastest kernel is `first` folds a frame of `len` bytes with it.
fn folds_with(first: Option<Kernel>, len: usize) -> Option<Kernel> {
    let k = first?;
    let min = match k {
        Kernel::Avx512 => WIDE_MIN,
        Kernel::Avx2 => WIDE_MIN_AVX2,
    };
    (min..=WIDE_MAX).contains(&len).then_some(k)
}

/// The CRC-32 of `frame` and the sum of `frame[r]` (`r` within it), in one pass of `kernel`,
/// which must run here ([`kernels`]).
fn one_pass(kernel: Kernel, frame: &[u8], r: Range<usize>) -> (u32, u64) {
    // The kernel folds the frame as if `pad` zero bytes came first, so that it ends on a
    // whole block; a block's offset in the frame is its offset there less `pad`.
    let pad = frame.len().wrapping_neg() % 64;
    let lo = (r.start + pad).next_multiple_of(64);
    let hi = (r.end + pad) & !63;
    assert!(kernels().contains(&kernel));
    assert!((WIDE_MIN..=WIDE_MAX).contains(&frame.len()) && r.start <= r.end);
    assert!(r.end <= frame.len());
    // SAFETY: `kernels` found the CPU features the kernel needs.
    let (crc, blocks) = unsafe {
        match kernel {
            Kernel::Avx512 => x86::crc_and_sum(frame, pad, lo, hi),
            Kernel::Avx2 => x86::crc_and_sum_avx2(frame, pad, lo, hi),
        }
    };
    if lo >= hi {
        return (crc, ones_sum(&frame[r]));
    }
    let (head, tail) = (&frame[r.start..lo - pad], &frame[hi - pad..r.end]);
    // The blocks' words begin at even offsets of the longer message, `pad` bytes before
    // offsets of the frame, and the tail begins at one of those: when `pad + r.start` is odd
    // they pair the segment's bytes the other way round, and their sum is the segment's
    // with its bytes swapped (RFC 1071 2(B)).
    let after = blocks + ones_sum(tail);
    let after = if (pad + r.start).is_multiple_of(2) {
        after
    } else {
        u64::from(fold(after).swap_bytes())
    };
    (crc, ones_sum(head) + after)
}

/// The folding kernels that can run here, the fastest first.
pub fn kernels() -> &'static [Kernel] {
    static KERNELS: OnceLock<Vec<Kernel>> = OnceLock::new();
    KERNELS.get_or_init(|| {
        let mut k = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("vpclmulqdq") && has!("pclmulqdq") && has!("sse4.1") {
                if has!("avx512f") && has!("avx512bw") {
                    k.push(Kernel::Avx512);
                }
                if has!("avx2") {
                    k.push(Kernel::Avx2);
                }
            }
        }
        k
    })
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub unsafe fn crc_and_sum(_: &[u8], _: usize, _: usize, _: usize) -> (u32, u64) {
        unreachable!("no kernel runs off x86_64")
    }
    pub unsafe fn crc_and_sum_avx2(_: &[u8], _: usize, _: usize, _: usize) -> (u32, u64) {
        unreachable!("no kernel runs off x86_64")
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::offload::fold;
    use std::arch::x86_64::*;

    /// The CRC's generator polynomial with its x^32 term.
    const POLY: u64 = 0x1_04C1_1DB7;

    /// x^n mod POLY (bit i the coefficient of x^i).
    const fn xpow_mod(n: u32) -> u32 {
        let mut r: u64 = 1;
        let mut i = 0;
        while i < n {
            r <<= 1;
            if r & (1 << 32) != 0 {
                r ^= POLY;
            }
            i += 1;
        }
        r as u32
    }

    /// The folding constant for x^n, in the bit-reflected form the reflected CRC folds with.
    const fn k(n: u32) -> i64 {
        ((xpow_mod(n).reverse_bits() as u64) << 1) as i64
    }

    /// Constants that move a 128-bit lane `D` bits on: the low half of a lane is multiplied
    /// by x^(D+32), the high half by x^(D-32) (reduced).
    struct Fold<const D: u32>;
    impl<const D: u32> Fold<D> {
        const LO: i64 = k(D + 32);
        const HI: i64 = k(D - 32);
    }

    macro_rules! k512 {
        ($d:expr) => {
            _mm512_set_epi64(
                Fold::<$d>::HI,
                Fold::<$d>::LO,
                Fold::<$d>::HI,
                Fold::<$d>::LO,
                Fold::<$d>::HI,
                Fold::<$d>::LO,
                Fold::<$d>::HI,
                Fold::<$d>::LO,
            )
        };
    }
    macro_rules! k128 {
        ($d:expr) => {
            _mm_set_epi64x(Fold::<$d>::HI, Fold::<$d>::LO)
        };
    }

    /// Each lane of `a` moved on by the distance `k` stands for, added to `b`.
    #[inline]
    #[target_feature(enable = "avx512f,vpclmulqdq")]
    fn fold512(a: __m512i, b: __m512i, k: __m512i) -> __m512i {
        let lo = _mm512_clmulepi64_epi128(a, k, 0x00);
        let hi = _mm512_clmulepi64_epi128(a, k, 0x11);
        _mm512_ternarylogic_epi64(lo, hi, b, 0x96) // lo ^ hi ^ b
    }

    macro_rules! k256 {
        ($d:expr) => {
            _mm256_set_epi64x(
                Fold::<$d>::HI,
                Fold::<$d>::LO,
                Fold::<$d>::HI,
                Fold::<$d>::LO,
            )
        };
    }

    /// [`fold512`] for a 64-byte block held in two 256-bit halves.
    #[inline]
    #[target_feature(enable = "avx2,vpclmulqdq")]
    fn fold256x2(a: [__m256i; 2], b: [__m256i; 2], k: __m256i) -> [__m256i; 2] {
        let half = |a, b| {
            let lo = _mm256_clmulepi64_epi128(a, k, 0x00);
            let hi = _mm256_clmulepi64_epi128(a, k, 0x11);
            _mm256_xor_si256(_mm256_xor_si256(lo, hi), b)
        };
        [half(a[0], b[0]), half(a[1], b[1])]
    }

    #[inline]
    #[target_feature(enable = "pclmulqdq,sse4.1")]
    fn fold128(a: __m128i, b: __m128i, k: __m128i) -> __m128i {
        let lo = _mm_clmulepi64_si128(a, k, 0x00);
        let hi = _mm_clmulepi64_si128(a, k, 0x11);
        _mm_xor_si128(_mm_xor_si128(lo, hi), b)
    }

    /// x^64 divided by the polynomial (the quotient, 33 bits, bit i the coefficient of x^i).
    const fn x64_div_poly() -> u64 {
        let (mut rem, mut q) = (1u128 << 64, 0u64);
        let mut i = 64;
        while i >= 32 {
            if rem & (1 << i) != 0 {
                rem ^= (POLY as u128) << (i - 32);
                q |= 1 << (i - 32);
            }
            i -= 1;
        }
        q
    }

    /// The polynomial, and the quotient of x^64 by it, bit-reflected (33 bits each) for the
    /// Barrett reduction.
    const P_REFLECTED: i64 = (POLY.reverse_bits() >> 31) as i64;
    const MU_REFLECTED: i64 = (x64_div_poly().reverse_bits() >> 31) as i64;

    /// The CRC of the message when its last 64 bytes are what `lanes` stand for (as a CRC
    /// register of zero would read them): the lanes folded into the last one, its low half
    /// moved on onto the high half (96 bits left), the low 32 of those onto the rest (64),
    /// then a Barrett reduction to 32.
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse4.1")]
    fn lanes_to_crc(lanes: [__m128i; 4]) -> u32 {
        let x = fold128(lanes[0], lanes[2], k128!(256));
        let y = fold128(lanes[1], lanes[3], k128!(256));
        let x = fold128(x, y, k128!(128));
        let low32 = _mm_set_epi32(0, 0, 0, !0);
        let x = _mm_xor_si128(
            _mm_clmulepi64_si128(x, _mm_set_epi64x(0, k(96)), 0x00),
            _mm_srli_si128(x, 8),
        );
        let x = _mm_xor_si128(
            _mm_clmulepi64_si128(_mm_and_si128(x, low32), _mm_set_epi64x(0, k(64)), 0x00),
            _mm_srli_si128(x, 4),
        );
        let pm = _mm_set_epi64x(MU_REFLECTED, P_REFLECTED);
        let t1 = _mm_clmulepi64_si128(_mm_and_si128(x, low32), pm, 0x10);
        let t2 = _mm_clmulepi64_si128(_mm_and_si128(t1, low32), pm, 0x00);
        !(_mm_extract_epi32(_mm_xor_si128(x, t2), 1) as u32)
    }

    /// The ones'-complement sum of the words a kernel added up in the CPU's byte order (this
    /// module is x86's: little-endian), as the network's big-endian words sum: the sum of
    /// words in the other byte order is the byte-swapped sum (RFC 1071 2(B)).
    fn big_endian(native: u64) -> u64 {
        u64::from(fold(native).swap_bytes())
    }

    /// The CRC register that `pad` zero bytes take to the all-ones one the CRC starts from:
    /// the register to start from when the message is taken to begin with them.
    const fn before_zeros(pad: usize) -> u32 {
        // A zero bit shifts the register right and adds the polynomial when a one falls out;
        // the polynomial's top bit (reflected) tells afterwards which happened.
        let mut r = !0u32;
        let mut i = 0;
        while i < 8 * pad {
            r = if r & 0x8000_0000 != 0 {
                ((r ^ 0xEDB8_8320) << 1) | 1
            } else {
                r << 1
            };
            i += 1;
        }
        r
    }

    const INITIAL: [u32; 64] = {
        let mut t = [0; 64];
        let mut pad = 0;
        while pad < 64 {
            t[pad] = before_zeros(pad);
            pad += 1;
        }
        t
    };

    /// The CRC-32 of `data` (at least 256 bytes), folded as if `pad` zero bytes (`pad` < 64,
    /// `data.len() + pad` a multiple of 64) came first and the CRC started so that they leave
    /// its register all ones; and the ones'-complement sum (partly folded, words big-endian)
    /// of the 64-byte blocks of that longer message that lie in `[lo, hi)` (both multiples
    /// of 64 and counted in it; none when `lo >= hi`).
    ///
    /// # Safety
    ///
    /// The CPU has the features enabled here.
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq,pclmulqdq,sse4.1")]
    pub unsafe fn crc_and_sum(data: &[u8], pad: usize, lo: usize, hi: usize) -> (u32, u64) {
        let n = data.len() + pad;
        assert!(data.len() >= super::WIDE_MIN && pad < 64 && n.is_multiple_of(64));
        let low16 = _mm512_set1_epi32(0xffff);
        // The blocks' 16-bit words in native order, two to each 32-bit lane: a lane takes
        // 2 * 0xffff a block, so it holds the sum of 2^15 blocks (2 MiB) before it overflows.
        let mut sum = _mm512_setzero_si512();
        let mut add = |o: usize, v: __m512i| {
            if o >= lo && o + 64 <= hi {
                let words = _mm512_add_epi32(_mm512_and_si512(v, low16), _mm512_srli_epi32(v, 16));
                sum = _mm512_add_epi32(sum, words);
            }
            v
        };
        // The first block: `pad` zero bytes, then the first bytes of `data`.
        let first = {
            let start = data.as_ptr().wrapping_sub(pad);
            // SAFETY: the mask takes bytes `pad..64` of the block at `start`, which are the
            // first `64 - pad` bytes of `data`; a masked load neither reads nor faults on the
            // bytes its mask leaves out, and gives zeros for them.
            add(0, unsafe {
                _mm512_maskz_loadu_epi8(!0u64 << pad, start.cast())
            })
        };
        let mut load = |o: usize| {
            let block = &data[o - pad..o - pad + 64];
            // SAFETY: `block` is 64 readable bytes; the load takes them unaligned.
            add(o, unsafe { _mm512_loadu_si512(block.as_ptr().cast()) })
        };
        // Four accumulators over 256-byte blocks; the CRC's initial register goes into the
        // first.
        let init = _mm512_zextsi128_si512(_mm_cvtsi32_si128(INITIAL[pad] as i32));
        let mut v = [first, load(64), load(128), load(192)];
        v[0] = _mm512_xor_si512(v[0], init);
        let mut o = 256;
        while o + 256 <= n {
            for (i, acc) in v.iter_mut().enumerate() {
                *acc = fold512(*acc, load(o + 64 * i), k512!(2048));
            }
            o += 256;
        }
        let a = fold512(v[0], v[1], k512!(512));
        let b = fold512(v[2], v[3], k512!(512));
        let mut acc = fold512(a, b, k512!(1024));
        while o < n {
            acc = fold512(acc, load(o), k512!(512));
            o += 64;
        }
        let crc = lanes_to_crc([
            _mm512_extracti32x4_epi32(acc, 0),
            _mm512_extracti32x4_epi32(acc, 1),
            _mm512_extracti32x4_epi32(acc, 2),
            _mm512_extracti32x4_epi32(acc, 3),
        ]);
        let lanes = _mm512_add_epi64(
            _mm512_cvtepu32_epi64(_mm512_castsi512_si256(sum)),
            _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(sum, 1)),
        );
        (crc, big_endian(_mm512_reduce_add_epi64(lanes) as u64))
    }
    /// [`crc_and_sum`] with 256-bit vectors (AVX2): each 64-byte block in two halves.
    ///
    /// # Safety
    ///
    /// The CPU has the features enabled here.
    #[target_feature(enable = "avx2,vpclmulqdq,pclmulqdq,sse4.1")]
    pub unsafe fn crc_and_sum_avx2(data: &[u8], pad: usize, lo: usize, hi: usize) -> (u32, u64) {
        let n = data.len() + pad;
        assert!(data.len() >= super::WIDE_MIN && pad < 64 && n.is_multiple_of(64));
        let low16 = _mm256_set1_epi32(0xffff);
        // A sum for each half, so that a 32-bit lane takes 2 * 0xffff a block, as in the
        // 512-bit kernel, and holds the sum of 2^15 blocks.
        let mut sums = [_mm256_setzero_si256(); 2];
        let mut add = |o: usize, v: [__m256i; 2]| {
            if o >= lo && o + 64 <= hi {
                for (sum, v) in sums.iter_mut().zip(v) {
                    let words =
                        _mm256_add_epi32(_mm256_and_si256(v, low16), _mm256_srli_epi32(v, 16));
                    *sum = _mm256_add_epi32(*sum, words);
                }
            }
            v
        };
        let halves = |block: &[u8]| {
            let p = block[..64].as_ptr();
            // SAFETY: `block` has 64 readable bytes; the loads take them unaligned.
            unsafe {
                [
                    _mm256_loadu_si256(p.cast()),
                    _mm256_loadu_si256(p.add(32).cast()),
                ]
            }
        };
        // The first block: `pad` zero bytes, then the first bytes of `data` (AVX2 has no
        // masked load of bytes).
        let mut first = [0u8; 64];
        first[pad..].copy_from_slice(&data[..64 - pad]);
        let first = add(0, halves(&first));
        let mut load = |o: usize| add(o, halves(&data[o - pad..o - pad + 64]));
        let init = _mm256_zextsi128_si256(_mm_cvtsi32_si128(INITIAL[pad] as i32));
        // Two accumulators over 128-byte blocks: four of them, as the 512-bit kernel has,
        // would take more than AVX2's sixteen registers.
        let mut v = [first, load(64)];
        v[0][0] = _mm256_xor_si256(v[0][0], init);
        let mut o = 128;
        while o + 128 <= n {
            for (i, acc) in v.iter_mut().enumerate() {
                *acc = fold256x2(*acc, load(o + 64 * i), k256!(1024));
            }
            o += 128;
        }
        let mut acc = fold256x2(v[0], v[1], k256!(512));
        while o < n {
            acc = fold256x2(acc, load(o), k256!(512));
            o += 64;
        }
        let crc = lanes_to_crc([
            _mm256_extracti128_si256(acc[0], 0),
            _mm256_extracti128_si256(acc[0], 1),
            _mm256_extracti128_si256(acc[1], 0),
            _mm256_extracti128_si256(acc[1], 1),
        ]);
        let mut lanes = _mm256_setzero_si256();
        for sum in sums {
            lanes = _mm256_add_epi64(
                lanes,
                _mm256_add_epi64(
                    _mm256_cvtepu32_epi64(_mm256_castsi256_si128(sum)),
                    _mm256_cvtepu32_epi64(_mm256_extracti128_si256(sum, 1)),
                ),
            );
        }
        let mut total = [0u64; 4];
        // SAFETY: `total` has 32 writable bytes; the store takes them unaligned.
        unsafe { _mm256_storeu_si256(total.as_mut_ptr().cast(), lanes) };
        (crc, big_endian(total.iter().sum()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::offload::fold;

    fn message(len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    /// Every kernel that runs here, and the two passes.
    fn every_way() -> Vec<Option<Kernel>> {
        kernels().iter().map(|&k| Some(k)).chain([None]).collect()
    }

    /// Every length around the kernels' block edges, every kind of range: the CRC crc32fast
    /// gives and the sum ones_sum gives.
    #[test]
    fn one_pass_gives_what_two_do() {
        for way in every_way() {
            one_pass_gives_what_two_do_on(way);
        }
    }

    fn one_pass_gives_what_two_do_on(way: Option<Kernel>) {
        let data = message(4200);
        let lens = [
            1279, 1280, 1281, 1513, 1514, 1518, 1792, 2047, 2048, 2049, 4000, 4200,
        ];
        for len in (0..700).chain(lens) {
            let f = &data[..len];
            let ends = [
                0,
                1,
                2,
                33,
                34,
                63,
                64,
                65,
                128,
                256,
                len / 2,
                len - len.min(1),
                len,
            ];
            for start in [
                0, 1, 2, 13, 14, 18, 34, 35, 38, 54, 63, 64, 66, 127, 128, 130,
            ] {
                for end in ends {
                    if end < start {
                        continue;
                    }
                    let (crc, sum) = crc_and_sum_on(way, f, Some(start..end));
                    assert_eq!(crc, crc32fast::hash(f), "{way:?}: crc, len {len}");
                    let want = fold(ones_sum(&f[start.min(len)..end.min(len)]));
                    let got = fold(sum.unwrap());
                    assert_eq!(got, want, "{way:?}: len {len} sum {start}..{end}");
                }
            }
            // A range that goes on past the frame.
            let (_, sum) = crc_and_sum_on(way, f, Some(len / 2..len + 100));
            let want = fold(ones_sum(&f[len / 2..]));
            assert_eq!(fold(sum.unwrap()), want, "{way:?}: len {len}");
            assert_eq!(crc_and_sum_on(way, f, None), (crc32fast::hash(f), None));
            assert_eq!(crc(&[f]), crc32fast::hash(f), "crc alone, len {len}");
        }
    }

    /// All-ones words, where a lane sum near overflow or a missed carry shows.
    #[test]
    fn sums_of_all_ones_fold_right() {
        for len in [256, 1514, 9000, 65536, WIDE_MAX, WIDE_MAX + 1] {
            let f = vec![0xffu8; len];
            for way in every_way() {
                let (crc, sum) = crc_and_sum_on(way, &f, Some(14..len));
                assert_eq!(crc, crc32fast::hash(&f), "{way:?}: len {len}");
                let want = fold(ones_sum(&f[14..]));
                assert_eq!(fold(sum.unwrap()), want, "{way:?}: len {len}");
            }
        }
    }

    #[test]
    fn the_check_value() {
        assert_eq!(crc(&[b"1234", b"56789"]), 0xcbf4_3926);
        // Long enough for the kernel, alone and with a sum (zlib gave the value).
        let long = b"123456789".repeat(160);
        assert_eq!(crc(&[&long]), 0xbebe_67de);
        for way in every_way() {
            let (crc, _) = crc_and_sum_on(way, &long, Some(34..1440));
            assert_eq!(crc, 0xbebe_67de, "{way:?}");
        }
    }

    /// Each kernel takes frames from the length where it beats the two passes.
    #[test]
    fn each_kernel_takes_frames_from_where_it_wins() {
        use Kernel::*;
        let cases = [
            (Some(Avx512), WIDE_MIN - 1, None),
            (Some(Avx512), WIDE_MIN, Some(Avx512)),
            (Some(Avx512), WIDE_MAX, Some(Avx512)),
            (Some(Avx512), WIDE_MAX + 1, None),
            (Some(Avx2), WIDE_MIN, None),
            (Some(Avx2), WIDE_MIN_AVX2 - 1, None),
            (Some(Avx2), WIDE_MIN_AVX2, Some(Avx2)),
            (Some(Avx2), 1514, Some(Avx2)),
            (Some(Avx2), WIDE_MAX + 1, None),
            (None, 1514, None),
        ];
        for (first, len, want) in cases {
            assert_eq!(folds_with(first, len), want, "{first:?}, {len} bytes");
        }
    }

    /// Where the CPU has what the folding kernels need, they run; CI names those CPUs
    /// (NICVM_EXPECT_WIDE_FCS=1: AVX-512 F and BW, AVX2 and VPCLMULQDQ), so that tests which
    /// pass through the two passes as well cannot hide a kernel that is never taken.
    #[test]
    fn the_kernels_run_where_expected() {
        let expected = std::env::var_os("NICVM_EXPECT_WIDE_FCS").is_some_and(|v| v == "1");
        if kernels().len() < 2 {
            let here = kernels();
            eprintln!("fcs: of the folding kernels only {here:?} run here; the rest are untested");
        }
        assert!(
            kernels() == [Kernel::Avx512, Kernel::Avx2] || !expected,
            "NICVM_EXPECT_WIDE_FCS=1, yet the kernels here are {:?}",
            kernels()
        );
    }
}
