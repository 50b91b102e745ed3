//! Helpers the unit tests of several modules share.

/// Bytes of a deterministic pseudo-random sequence (xorshift32), so the tests need no RNG crate.
/// Tests pin hashes of outputs made from it: changing it changes those hashes.
pub(crate) fn noise_bytes(count: usize, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect()
}
