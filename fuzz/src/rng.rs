//! The fuzzer's only source of randomness: SplitMix64, seeded per case from the campaign seed
//! and the case number, so any case can be generated again from those two numbers.

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The generator for case `case` of the campaign seeded with `seed`.
    pub fn for_case(seed: u64, case: u64) -> Rng {
        let mut r = Rng(seed ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub fn usize(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.usize(items.len())]
    }

    /// One of `items`, or (as often as any one of them) whatever `any` makes.
    pub fn pick_or<T: Copy>(&mut self, items: &[T], any: impl FnOnce(&mut Rng) -> T) -> T {
        let i = self.usize(items.len() + 1);
        match items.get(i) {
            Some(t) => *t,
            None => any(self),
        }
    }

    /// Up to `n - 1` random bytes.
    pub fn bytes_below(&mut self, n: usize) -> Vec<u8> {
        let k = self.usize(n);
        self.bytes(k)
    }

    /// Index into `weights`, chosen in proportion to them.
    pub fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|w| *w as u64).sum();
        let mut x = self.below(total);
        for (i, w) in weights.iter().enumerate() {
            if x < *w as u64 {
                return i;
            }
            x -= *w as u64;
        }
        weights.len() - 1
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let w = self.next_u64().to_le_bytes();
            let k = (n - v.len()).min(8);
            v.extend_from_slice(&w[..k]);
        }
        v
    }

    /// A length that is usually small, sometimes at an edge, now and then huge.
    pub fn len(&mut self, typical: usize, max: usize) -> usize {
        match self.below(10) {
            0 => 0,
            1 => max,
            2 => self.usize(max + 1),
            3 => typical.saturating_sub(1).min(max),
            4 => (typical + 1).min(max),
            _ => self.usize(typical.min(max) + 1),
        }
    }

    /// A value a hostile register write might carry: zero, all ones, one bit, small, near a
    /// power of two, or anything.
    pub fn value(&mut self, width: u8) -> u64 {
        let mask = if width >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * width as u32)) - 1
        };
        let v = match self.below(9) {
            0 => 0,
            1 => u64::MAX,
            2 => 1 << self.below(64),
            3 => self.below(16),
            4 => (1u64 << self.below(64)).wrapping_sub(self.below(3)),
            5 => self.below(0x1_0000),
            _ => self.next_u64(),
        };
        v & mask
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn cases_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::for_case(7, 3).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::for_case(7, 3).next_u64(),
            Rng::for_case(7, 4).next_u64()
        );
        let mut r = Rng::new(1);
        assert!((0..1000).all(|_| r.below(10) < 10));
        assert_eq!(r.bytes(13).len(), 13);
    }
}
