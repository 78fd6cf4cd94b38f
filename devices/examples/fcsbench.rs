//! The FCS kernels alone, in cache: ns per frame for `crc32fast`, each folding kernel this CPU
//! runs for the CRC alone and for the CRC with the sum of a TCP segment (from byte 34), and
//! the two passes (`crc32fast`, then `ones_sum`), at lengths from 64 to 1514 bytes. The best
//! of seven rounds of 200 000 calls each. The Intel Xeon figures in `devices/src/net/fcs.rs`
//! and the README come from it (the AMD EPYC ones from an earlier, uncommitted loop).
//!
//! Usage: fcsbench

use devices::net::fcs;
use devices::net::offload::ones_sum;
use std::hint::black_box;
use std::time::Instant;

/// ns per call of `f`, the best of seven rounds.
fn time(mut f: impl FnMut()) -> f64 {
    const CALLS: u32 = 200_000;
    (0..7)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..CALLS {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(CALLS)
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let data: Vec<u8> = (0..2048u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let kernels = fcs::kernels();
    print!("| bytes | crc32fast | two passes |");
    for k in kernels {
        print!(" {k:?} CRC | {k:?} CRC + sum |");
    }
    println!();
    println!("|{}", "---|".repeat(3 + 2 * kernels.len()));
    for len in [64, 128, 256, 384, 512, 768, 1024, 1280, 1514] {
        let frame = &data[..len];
        let segment = 34..len;
        let crc = time(|| {
            black_box(crc32fast::hash(black_box(frame)));
        });
        let two = time(|| {
            let f = black_box(frame);
            black_box((crc32fast::hash(f), ones_sum(&f[segment.clone()])));
        });
        print!("| {len} | {crc:.1} | {two:.1} |");
        for &k in kernels {
            // Below `fcs::WIDE_MIN` a kernel is not taken: these are the two passes again.
            // From there on the kernel runs, also the 256-bit one below `fcs::WIDE_MIN_AVX2`,
            // where `crc_and_sum` would not take it: that is how its losses there are seen.
            let alone = time(|| {
                black_box(fcs::crc_and_sum_on(Some(k), black_box(frame), Some(0..0)));
            });
            let both = time(|| {
                black_box(fcs::crc_and_sum_on(
                    Some(k),
                    black_box(frame),
                    Some(segment.clone()),
                ));
            });
            print!(" {alone:.1} | {both:.1} |");
        }
        println!();
    }
}
