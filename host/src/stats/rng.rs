//! A tiny, fully specified PRNG ([`SplitMix64`]), so that a seed draws the same prompts and the
//! same simulations in every build, forever.

/// Sebastiano Vigna's SplitMix64: one 64-bit state, one output per step.
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a plain seed.
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The generator's state (tests play an attacker who has found it).
    #[cfg(test)]
    pub(crate) fn state(&self) -> u64 {
        self.0
    }

    /// Uniform in `0..n` (n > 0), without modulo bias worth mentioning for small n.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}
