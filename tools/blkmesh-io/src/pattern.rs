//! Deterministic pseudo-random numbers and data patterns.
//!
//! No external RNG: runs must be reproducible from `--seed`, and the data
//! written by `verify` must be recomputable from (seed, generation, offset)
//! when it is read back.

/// SplitMix64 finaliser: a good 64-bit mix of `x`.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A small, fast generator (SplitMix64 sequence).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(mix64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (`n > 0`; returns 0 for `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Multiply-shift: unbiased enough for workload generation.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u8) -> bool {
        self.below(100) < u64::from(percent)
    }
}

/// The data `verify` writes at disk offset `disk_offset`: each aligned
/// 8-byte word is a hash of (key, word index), so a misplaced, stale or
/// torn sector is detected and its offset is known.
pub fn fill(key: u64, disk_offset: u64, out: &mut [u8]) {
    let mut pos = 0usize;
    while pos < out.len() {
        let abs = disk_offset + pos as u64;
        let word = mix64(key ^ (abs / 8)).to_le_bytes();
        let start = (abs % 8) as usize;
        let n = (8 - start).min(out.len() - pos);
        out[pos..pos + n].copy_from_slice(&word[start..start + n]);
        pos += n;
    }
}

/// The key for one write of `verify`: distinct per seed and generation.
pub fn key(seed: u64, generation: u64) -> u64 {
    mix64(seed ^ mix64(generation))
}

/// First index where `actual` differs from `expected`.
pub fn first_mismatch(expected: &[u8], actual: &[u8]) -> Option<usize> {
    expected
        .iter()
        .zip(actual)
        .position(|(e, a)| e != a)
        .or((expected.len() != actual.len()).then(|| expected.len().min(actual.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_depends_only_on_key_and_absolute_offset() {
        let mut whole = vec![0u8; 4096];
        fill(7, 512, &mut whole);
        // The same bytes generated in odd-sized pieces.
        let mut pieces = vec![0u8; 4096];
        let mut at = 0;
        for len in [3usize, 509, 1, 1024, 2559] {
            fill(7, 512 + at as u64, &mut pieces[at..at + len]);
            at += len;
        }
        assert_eq!(at, 4096);
        assert_eq!(whole, pieces);
        let mut other = vec![0u8; 4096];
        fill(8, 512, &mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn rng_is_reproducible_and_bounded() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        for _ in 0..1000 {
            let x = a.below(10);
            assert_eq!(x, b.below(10));
            assert!(x < 10);
        }
        assert_eq!(a.below(0), 0);
    }

    #[test]
    fn finds_first_mismatch() {
        assert_eq!(first_mismatch(b"abcd", b"abcd"), None);
        assert_eq!(first_mismatch(b"abcd", b"abXd"), Some(2));
        assert_eq!(first_mismatch(b"abcd", b"abc"), Some(3));
    }
}
