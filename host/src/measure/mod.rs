//! Turning one timed generation into figures, under the fixed-work rules of the protocol.
//!
//! [`Timing::from_arrivals`] checks the work was exactly what was asked (count, vocabulary)
//! and computes, from the supervisor's own timestamps (each token's arrival, taken in a process
//! no variant code runs in): time to first token, prefill rate (prompt tokens /
//! TTFT), decode rate ((n - 1) / (last - first)) and the inter-token gaps.

pub mod roofline;
pub mod sample;

use serde::Serialize;

/// Figures of one request, all from host timestamps.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Timing {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub ttft_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub total_ms: f64,
    /// Gaps between consecutive tokens, in ms (n - 1 of them).
    pub itl_ms: Vec<f64>,
}

/// Why a generation does not count.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WorkError {
    #[error("emitted {got} tokens; the protocol asks for exactly {want}")]
    TooFew { got: usize, want: usize },
    #[error(
        "emitted {extra} token(s) after the host said stop; the protocol asks for exactly {want}"
    )]
    TooMany { extra: u64, want: usize },
    #[error("emitted token id {id} at position {pos}, outside the vocabulary (size {vocab})")]
    OutOfVocab { id: u32, pos: usize, vocab: u32 },
    #[error("emitted all {n} tokens in one instant, so decode time cannot be measured; emit each token as it is decided")]
    NoDecodeTime { n: usize },
}

impl Timing {
    /// Validates and measures one generation: `tokens` as received, `arrivals_ns[i]` the time
    /// token `i` arrived (ns after the request was sent), `overflow` the tokens that arrived
    /// past `want`.
    pub fn from_arrivals(
        prompt_tokens: usize,
        tokens: &[u32],
        arrivals_ns: &[u64],
        overflow: u64,
        want: usize,
        vocab: u32,
    ) -> Result<Timing, WorkError> {
        if overflow > 0 {
            return Err(WorkError::TooMany {
                extra: overflow,
                want,
            });
        }
        if tokens.len() != want || arrivals_ns.len() != want {
            return Err(WorkError::TooFew {
                got: tokens.len(),
                want,
            });
        }
        if let Some((pos, &id)) = tokens.iter().enumerate().find(|(_, &t)| t >= vocab) {
            return Err(WorkError::OutOfVocab { id, pos, vocab });
        }
        let ms = |ns: u64| ns as f64 / 1e6;
        let first = arrivals_ns[0];
        let last = arrivals_ns[want - 1];
        let decode_ms = ms(last - first);
        if want > 1 && decode_ms <= 0.0 {
            return Err(WorkError::NoDecodeTime { n: want });
        }
        let ttft_ms = ms(first).max(1e-6);
        Ok(Timing {
            prompt_tokens,
            new_tokens: want,
            ttft_ms,
            prefill_tok_s: prompt_tokens as f64 / (ttft_ms / 1e3),
            decode_tok_s: if want > 1 {
                (want - 1) as f64 / (decode_ms / 1e3)
            } else {
                0.0
            },
            total_ms: ms(last),
            itl_ms: arrivals_ns.windows(2).map(|w| ms(w[1] - w[0])).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computes_rates_from_timestamps() {
        // 100 prompt tokens, first token at 50 ms, then one every 10 ms.
        let emits: Vec<u64> = (0..5).map(|i| 50_000_000 + i * 10_000_000).collect();
        let t = Timing::from_arrivals(100, &[1, 2, 3, 4, 5], &emits, 0, 5, 10).unwrap();
        assert!((t.ttft_ms - 50.0).abs() < 1e-9);
        assert!((t.prefill_tok_s - 2000.0).abs() < 1e-6);
        assert!((t.decode_tok_s - 100.0).abs() < 1e-6);
        assert_eq!(t.itl_ms, vec![10.0; 4]);
    }

    /// What the drift fixture's `pairs` mode does to the figures, exactly: every second token
    /// held back and sent with the next leaves the decode rate as it was and doubles every
    /// other gap, so only the ITL tail can see it (the end-to-end test in `tests/compare.rs`
    /// checks that `host compare` then reverts on ITL p99).
    #[test]
    fn a_stall_every_other_token_keeps_the_rate_and_doubles_the_gaps() {
        let steady: Vec<u64> = (0..7).map(|i| 50_000_000 + i * 10_000_000).collect();
        // Tokens 2 and 3 arrive with 3, 4 and 5 with 5, ...: arrival i is steady's odd one.
        let paired: Vec<u64> = (0..7).map(|i| steady[i + (i % 2)]).collect();
        let a = Timing::from_arrivals(100, &[1; 7], &steady, 0, 7, 10).unwrap();
        let b = Timing::from_arrivals(100, &[1; 7], &paired, 0, 7, 10).unwrap();
        assert_eq!(a.decode_tok_s, b.decode_tok_s);
        assert_eq!(a.ttft_ms, b.ttft_ms);
        assert_eq!(a.itl_ms, vec![10.0; 6]);
        assert_eq!(b.itl_ms, vec![20.0, 0.0, 20.0, 0.0, 20.0, 0.0]);
    }

    #[test]
    fn refuses_wrong_work() {
        let e = |n: usize| (0..n as u64).map(|i| (i + 1) * 1000).collect::<Vec<_>>();
        assert_eq!(
            Timing::from_arrivals(1, &[1; 4], &e(4), 0, 5, 10),
            Err(WorkError::TooFew { got: 4, want: 5 })
        );
        assert_eq!(
            Timing::from_arrivals(1, &[1; 5], &e(5), 1, 5, 10),
            Err(WorkError::TooMany { extra: 1, want: 5 })
        );
        assert_eq!(
            Timing::from_arrivals(1, &[1, 2, 10, 3, 4], &e(5), 0, 5, 10),
            Err(WorkError::OutOfVocab {
                id: 10,
                pos: 2,
                vocab: 10
            })
        );
        assert_eq!(
            Timing::from_arrivals(1, &[1; 3], &[5, 5, 5], 0, 3, 10),
            Err(WorkError::NoDecodeTime { n: 3 })
        );
    }
}
