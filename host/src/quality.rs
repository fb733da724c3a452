//! Quality figures the host computes from a variant's own output.
//!
//! Today: [`repeated_ngram_share`], the repetition measure that the quality gates will compare
//! with the baseline's (a degenerate variant loops; a perplexity gate alone would reward that).
//! The oracle-scored gates (agreement, perplexity) build on the worker's `Score` request.

use std::collections::HashSet;

/// The n-gram length used for repetition: long enough that ordinary prose rarely repeats one.
pub const REPETITION_N: usize = 4;

/// Share of the `n`-grams of `tokens` that already occurred earlier in `tokens` (0 to 1; 0 when
/// there are fewer than `n` tokens).
pub fn repeated_ngram_share(tokens: &[u32], n: usize) -> f64 {
    if n == 0 || tokens.len() < n {
        return 0.0;
    }
    let mut seen = HashSet::new();
    let windows = tokens.windows(n);
    let total = windows.len();
    let repeated = windows.filter(|w| !seen.insert(*w)).count();
    repeated as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_repeats_of_earlier_ngrams() {
        assert_eq!(repeated_ngram_share(&[1, 2, 3, 4, 5, 6], 2), 0.0);
        // 1 2 | 1 2 | 1 2: bigrams 12 21 12 21 12 -> the last three repeat.
        assert_eq!(repeated_ngram_share(&[1, 2, 1, 2, 1, 2], 2), 3.0 / 5.0);
        assert_eq!(repeated_ngram_share(&[7; 10], 4), 6.0 / 7.0);
        assert_eq!(repeated_ngram_share(&[1, 2], 4), 0.0);
    }
}
