//! A tiny, fully specified PRNG ([`SplitMix64`]), so that a seed draws the same prompts and the
//! same simulations in every build, forever; and the one unpredictable source, the kernel's
//! ([`fill_from_kernel`], [`fresh_seed`]).

/// Fills `bytes` from the kernel's random source (getrandom), or says why it could not.
pub fn fill_from_kernel(bytes: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: getrandom writes at most `bytes.len() - filled` bytes at `bytes[filled..]`.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n > 0 {
            filled += n as usize;
        } else {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// 64 bits no one can know in advance, from the kernel's random source: seeds, and every draw
/// the harness makes that a variant must not predict (scratch directory names, the worker's heap
/// shift, the order of a comparison's builds and of its pairs).
pub fn fresh_seed() -> u64 {
    let mut bytes = [0u8; 8];
    if fill_from_kernel(&mut bytes).is_ok() {
        u64::from_le_bytes(bytes)
    } else {
        // No getrandom (very old kernels): the clock's nanoseconds and the process id.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        now.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_fills_every_byte_and_never_the_same_twice() {
        // Longer than one getrandom call is promised to fill (256 bytes) without a signal.
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        fill_from_kernel(&mut a).unwrap();
        fill_from_kernel(&mut b).unwrap();
        assert_ne!(a, b);
        // Its last 32 bytes written too: all zero by chance once in 2^256.
        assert!(a[4064..].iter().any(|&x| x != 0));
        fill_from_kernel(&mut []).unwrap();
    }
}
