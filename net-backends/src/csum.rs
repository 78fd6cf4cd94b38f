//! The Internet checksum's arithmetic (RFC 1071), shared by the NIC models' offloads and the
//! backends that touch a header.

/// Ones'-complement sum of `data` as 16-bit big-endian words (odd byte padded with zero),
/// partly folded. Add several sums before folding.
///
/// The bulk is summed eight bytes at a time in native byte order: the ones'-complement sum
/// commutes with swapping the bytes of every word (RFC 1071, section 2(B)), so the folded
/// native-order sum only needs one swap at the end. The 32-bit halves added into a 64-bit
/// accumulator could only overflow on a slice of 16 GiB or more.
pub fn ones_sum(data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(8);
    let native: u64 = words
        .by_ref()
        .map(|w| {
            let w = u64::from_ne_bytes(w.try_into().unwrap());
            (w & 0xffff_ffff) + (w >> 32)
        })
        .sum();
    let native = fold(native);
    let mut sum = if cfg!(target_endian = "little") {
        native.swap_bytes()
    } else {
        native
    } as u64;
    let mut tail = words.remainder().chunks_exact(2);
    sum += tail
        .by_ref()
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u64)
        .sum::<u64>();
    if let [last] = tail.remainder() {
        sum += (*last as u64) << 8;
    }
    sum
}

/// Folds a sum to 16 bits (not inverted).
pub fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}
