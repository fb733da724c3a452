//! Generation and scoring over any [`Transformer`]: the hand-written CPU model or the
//! candle-ops one.
//!
//! [`generate`] prefills the prompt in chunks of [`Transformer::prefill_chunk`] tokens
//! ([`PREFILL_CHUNK`] on the CPU), then greedily decodes
//! exactly `max_new_tokens` tokens (end-of-sequence does not stop it), handing each one to the
//! caller as soon as it is chosen. [`score`] runs a sequence teacher-forced, in the same chunks,
//! and reports for every position the log-probability of the actual next token and the argmax
//! ([`score_row`]); logits are only ever materialised [`SCORE_LOGIT_ROWS`] rows at a time.

use plugin_api::ScoredPosition;

use crate::model::{tensor_to_vec, ModelError, Transformer};

/// Tokens per prefill (and scoring) forward pass: 256, so that a chunk's activations fit in a
/// core's L2 (2 MiB) even at the MLP's 1,536 columns (1.5 MiB), where each prefill task reads
/// them whole once for its rows.
pub const PREFILL_CHUNK: usize = 256;

/// Rows of logits computed at once while scoring.
pub const SCORE_LOGIT_ROWS: usize = 64;

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// There is nothing to score.
    #[error("cannot score an empty token sequence")]
    EmptySequence,
    /// The request does not fit in the context window.
    #[error("{needed} positions ({what}) exceed the context length {context}")]
    ContextOverflow {
        /// What was asked for, in words.
        what: String,
        /// Positions it needs.
        needed: usize,
        /// The model's context length.
        context: usize,
    },
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Greedy-decodes exactly `max_new_tokens` tokens after `prompt`, passing each to `emit` as soon
/// as it is chosen; stops early only when `emit` returns `false`. Returns how many tokens were
/// emitted. The KV cache is reset first, so requests are independent.
pub fn generate<M: Transformer + ?Sized>(
    model: &mut M,
    prompt: &[u32],
    max_new_tokens: usize,
    mut emit: impl FnMut(&[u32]) -> bool,
) -> Result<usize, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let context = model.config().context_len;
    let needed = prompt.len().saturating_add(max_new_tokens);
    if needed > context {
        return Err(GenerateError::ContextOverflow {
            what: format!(
                "a {}-token prompt plus {max_new_tokens} new tokens",
                prompt.len()
            ),
            needed,
            context,
        });
    }
    model.reset();
    if max_new_tokens == 0 {
        return Ok(0);
    }
    model.reserve(needed)?;

    let mut logits = Vec::new();
    let mut pos = 0;
    let mut token = 0;
    for chunk in prompt.chunks(model.prefill_chunk().max(1)) {
        if pos + chunk.len() < prompt.len() {
            model.forward_hidden(chunk, pos)?;
        } else {
            token = model.forward_greedy(chunk, pos, &mut logits)?;
        }
        pos += chunk.len();
    }
    if !emit(&[token]) || max_new_tokens == 1 {
        return Ok(1);
    }
    let rest = model.decode(token, pos, max_new_tokens - 1, &mut |t| emit(&[t]))?;
    Ok(1 + rest)
}

/// Teacher-forced scoring: entry `i` describes the distribution after `tokens[..=i]`, evaluated
/// at `tokens[i + 1]`, so there are `tokens.len() - 1` entries. The KV cache is reset first.
pub fn score<M: Transformer + ?Sized>(
    model: &mut M,
    tokens: &[u32],
) -> Result<Vec<ScoredPosition>, GenerateError> {
    if tokens.is_empty() {
        return Err(GenerateError::EmptySequence);
    }
    let context = model.config().context_len;
    if tokens.len() > context {
        return Err(GenerateError::ContextOverflow {
            what: format!("a {}-token sequence", tokens.len()),
            needed: tokens.len(),
            context,
        });
    }
    model.reset();
    // The last token has no successor to score, so it never needs to be run.
    let inputs = &tokens[..tokens.len() - 1];
    model.reserve(inputs.len())?;
    let mut scored = Vec::with_capacity(inputs.len());
    let mut logits = Vec::new();
    let mut pos = 0;
    for chunk in inputs.chunks(PREFILL_CHUNK) {
        let hidden = model.forward_hidden(chunk, pos)?;
        let mut row = 0;
        while row < chunk.len() {
            let rows = SCORE_LOGIT_ROWS.min(chunk.len() - row);
            let part = model.logits(&hidden.narrow(0, row, rows).map_err(ModelError::from)?)?;
            tensor_to_vec(&part, &mut logits)?;
            let vocab = logits.len() / rows;
            for (r, row_logits) in logits.chunks_exact(vocab).enumerate() {
                let next = tokens[pos + row + r + 1];
                scored.push(score_row(row_logits, next));
            }
            row += rows;
        }
        pos += chunk.len();
    }
    Ok(scored)
}

/// The index of the largest logit (the first one on ties; NaNs never win).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

/// Log-softmax (in f32) of one row of logits, evaluated at `target` and at the argmax.
/// A `target` outside the row gets a log-probability of negative infinity.
pub fn score_row(logits: &[f32], target: u32) -> ScoredPosition {
    let best = argmax(logits);
    let max = logits.get(best as usize).copied().unwrap_or(0.0);
    let sum: f32 = logits.iter().map(|&v| (v - max).exp()).sum();
    let log_z = max + sum.ln();
    let logprob = logits
        .get(target as usize)
        .map_or(f32::NEG_INFINITY, |&v| v - log_z);
    ScoredPosition {
        logprob,
        argmax: best,
        argmax_logprob: max - log_z,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{tiny, LlamaModel};

    fn tiny_model(context: u64) -> LlamaModel {
        LlamaModel::from_gguf(tiny::view("llama", context)).unwrap()
    }

    #[test]
    fn generate_emits_exactly_the_requested_tokens_one_by_one() {
        let mut model = tiny_model(64);
        let mut got = Vec::new();
        let n = generate(&mut model, &[1, 2, 3], 20, |t| {
            assert_eq!(t.len(), 1);
            got.push(t[0]);
            true
        })
        .unwrap();
        assert_eq!((n, got.len()), (20, 20));
        assert!(got.iter().all(|&t| (t as usize) < tiny::VOCAB));
        // a second request starts from a clean cache and repeats itself
        let mut again = Vec::new();
        generate(&mut model, &[1, 2, 3], 20, |t| {
            again.push(t[0]);
            true
        })
        .unwrap();
        assert_eq!(again, got);
    }

    #[test]
    fn generate_stops_when_the_sink_says_so() {
        let mut model = tiny_model(64);
        let mut calls = 0;
        let n = generate(&mut model, &[5], 10, |_| {
            calls += 1;
            calls < 4
        })
        .unwrap();
        assert_eq!((n, calls), (4, 4));
        assert_eq!(
            generate(&mut model, &[5], 0, |_| unreachable!()).unwrap(),
            0
        );
    }

    #[test]
    fn generate_refuses_empty_prompts_and_context_overflow() {
        let mut model = tiny_model(16);
        assert!(matches!(
            generate(&mut model, &[], 4, |_| true),
            Err(GenerateError::EmptyPrompt)
        ));
        let err = generate(&mut model, &[1; 10], 7, |_| true).unwrap_err();
        assert!(matches!(
            err,
            GenerateError::ContextOverflow {
                needed: 17,
                context: 16,
                ..
            }
        ));
        assert!(generate(&mut model, &[1; 10], 6, |_| true).is_ok());
        assert!(matches!(
            score(&mut model, &[]),
            Err(GenerateError::EmptySequence)
        ));
        assert!(matches!(
            score(&mut model, &[1; 17]),
            Err(GenerateError::ContextOverflow { .. })
        ));
        assert!(score(&mut model, &[1]).unwrap().is_empty());
    }

    #[test]
    fn score_reproduces_greedy_choices_across_chunks() {
        // a prompt longer than one prefill chunk, so both runs cross a chunk boundary
        let mut model = tiny_model(1024);
        let prompt: Vec<u32> = (0..PREFILL_CHUNK as u32 + 40)
            .map(|i| (i * 7) % 16)
            .collect();
        let mut generated = Vec::new();
        generate(&mut model, &prompt, 30, |t| {
            generated.push(t[0]);
            true
        })
        .unwrap();
        let mut seq = prompt.clone();
        seq.extend(&generated);
        let scored = score(&mut model, &seq).unwrap();
        assert_eq!(scored.len(), seq.len() - 1);
        for (j, &tok) in generated.iter().enumerate() {
            let s = scored[prompt.len() - 1 + j];
            assert_eq!(s.argmax, tok, "generated token {j}");
            assert_eq!(s.logprob, s.argmax_logprob);
            assert!(s.logprob <= 0.0);
        }
        for (i, s) in scored.iter().enumerate() {
            assert!(s.logprob <= s.argmax_logprob, "position {i}: {s:?}");
        }
    }

    #[test]
    fn argmax_prefers_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -5.0, -4.0]), 2);
        assert_eq!(argmax(&[-1.0]), 0);
    }

    #[test]
    fn score_row_is_a_log_softmax() {
        let logits = [0.0, 2f32.ln(), 0.0];
        // probabilities 1/4, 1/2, 1/4
        let s = score_row(&logits, 2);
        assert_eq!(s.argmax, 1);
        assert!((s.logprob - 0.25f32.ln()).abs() < 1e-6, "{s:?}");
        assert!((s.argmax_logprob - 0.5f32.ln()).abs() < 1e-6, "{s:?}");
        // shifting every logit changes nothing; huge values do not overflow
        let shifted = score_row(&[1000.0, 1000.0 + 2f32.ln(), 1000.0], 0);
        assert!((shifted.logprob - 0.25f32.ln()).abs() < 1e-4, "{shifted:?}");
        assert_eq!(score_row(&logits, 7).logprob, f32::NEG_INFINITY);
    }

    #[test]
    fn log_probabilities_sum_to_one() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 7.0).collect();
        let total: f32 = (0..1000).map(|t| score_row(&logits, t).logprob.exp()).sum();
        assert!((total - 1.0).abs() < 1e-4, "{total}");
    }
}
