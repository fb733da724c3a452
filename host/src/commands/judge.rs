//! The quality phase of a run: after every timed request, the oracle scores each one and the
//! gates are decided.
//!
//! For each timed sample, one prompt's samples after another (so that a document shared by
//! them is computed once): the oracle scores the prompt plus the emitted tokens (teacher-forced);
//! the baseline's own answer to the same instance is the reference. When every emitted token is
//! the oracle's argmax, the variant's answer *is* the baseline's greedy answer, so it serves as
//! the reference at no cost; otherwise the oracle generates the reference and scores it. Both
//! answers are cached by the oracle, so a repeated instance costs nothing the second time.

use anyhow::Result;

use crate::harness::prompts::PromptSet;
use crate::harness::protocol::Protocol;
use crate::harness::tokenize::TextCodec;
use crate::measure::sample::Sample;
use crate::quality::{repeated_ngram_share, GateReport, RequestQuality, TextFigures, REPETITION_N};
use crate::supervisor::oracle::{Oracle, OracleCost};

/// The variant's own text figures, as the timed phase already computed them.
fn sample_figures(sample: &Sample) -> TextFigures {
    TextFigures {
        checks_passed: sample.checks.iter().filter(|c| c.passed).count(),
        checks_total: sample.checks.len(),
        repetition: sample.repetition,
    }
}

/// The text figures (checks, repetition) of `tokens` as an answer to `sample`'s instance,
/// computed as the timed phase computes them for the variant's own answer.
fn text_figures(
    codec: &TextCodec,
    prompts: &PromptSet,
    sample: &Sample,
    tokens: &[u32],
) -> Result<TextFigures> {
    let end = tokens
        .iter()
        .position(|&t| t == codec.eos_id)
        .unwrap_or(tokens.len());
    let text = codec.decode(&tokens[..end])?;
    let checks = prompts
        .prompts
        .iter()
        .find(|p| p.name == sample.prompt)
        .map(|spec| spec.evaluate(&sample.instance, &text))
        .unwrap_or_default();
    Ok(TextFigures {
        checks_passed: checks.iter().filter(|c| c.passed).count(),
        checks_total: checks.len(),
        repetition: repeated_ngram_share(&tokens[..end], REPETITION_N),
    })
}

/// Scores every sample with `oracle`, stores each one's figures in `sample.quality`, and decides
/// the gates per prompt (in `order`).
pub fn judge(
    oracle: &mut Oracle,
    samples: &mut [Sample],
    codec: &TextCodec,
    prompts: &PromptSet,
    protocol: &Protocol,
    order: &[String],
) -> Result<GateReport> {
    let bar = crate::progress::progress_bar(samples.len(), "quality ");
    let mut judged = Vec::with_capacity(samples.len());
    // One prompt's requests one after another: the oracle reuses the KV cache of the prefix a
    // sequence shares with the one before (a shared document), so it computes it once.
    let mut sequence: Vec<usize> = (0..samples.len()).collect();
    let rank = |name: &str| order.iter().position(|o| o == name).unwrap_or(order.len());
    sequence.sort_by_key(|&i| (rank(&samples[i].prompt), samples[i].round));
    // Progress in tokens the oracle must compute, not sequences: one long-context sequence
    // costs as much as several short ones, and a prefix shared with the previous one is free.
    let mut costs = Vec::with_capacity(sequence.len());
    let mut previous: Vec<u32> = Vec::new();
    for &i in &sequence {
        let tokens: Vec<u32> = samples[i]
            .prompt_ids
            .iter()
            .chain(&samples[i].tokens)
            .copied()
            .collect();
        let shared = previous
            .iter()
            .zip(&tokens)
            .take_while(|(a, b)| a == b)
            .count();
        costs.push((tokens.len() - shared) as f64);
        previous = tokens;
    }
    let total_tokens: f64 = costs.iter().sum();
    let mut done_tokens = 0.0;
    let started = std::time::Instant::now();
    let count = samples.len();
    for (i, (&index, cost)) in sequence.iter().zip(&costs).enumerate() {
        let sample = &mut samples[index];
        let label = format!(
            "scoring prompt {:?} round {}",
            sample.prompt,
            sample.round + 1
        );
        bar.set_message(label.clone());
        let scores = oracle.scores(&sample.prompt_ids, &sample.tokens, &label)?;
        let greedy = sample
            .tokens
            .iter()
            .zip(&scores)
            .all(|(&t, s)| t == s.argmax);
        let variant = sample_figures(sample);
        let (reference, reference_scores, reference_figures) = if greedy {
            // The variant's answer is the baseline's greedy answer: nothing to recompute.
            oracle.remember_reference(&sample.prompt_ids, &sample.tokens);
            (sample.tokens.clone(), scores.clone(), variant)
        } else {
            let what = format!(
                "the reference answer to prompt {:?} round {}",
                sample.prompt,
                sample.round + 1
            );
            let reference = oracle.reference(&sample.prompt_ids, protocol.max_new_tokens, &what)?;
            let reference_scores =
                oracle.scores(&sample.prompt_ids, &reference, &format!("scoring {what}"))?;
            let figures = text_figures(codec, prompts, sample, &reference)?;
            (reference, reference_scores, figures)
        };
        let quality = RequestQuality::judge(
            &sample.tokens,
            &scores,
            &reference,
            &reference_scores,
            variant,
            reference_figures,
            protocol.gates.tie_margin,
        );
        done_tokens += cost;
        let elapsed = started.elapsed().as_secs_f64();
        crate::progress::log_line(
            &bar,
            format!(
                "oracle: {}/{count} sequences scored (prompt {:?} round {}: agreement {:.4}); {}",
                i + 1,
                sample.prompt,
                sample.round + 1,
                quality.agreement,
                time_left(elapsed, done_tokens, total_tokens)
            ),
        );
        judged.push((sample.prompt.clone(), quality.clone()));
        sample.quality = Some(quality);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(GateReport::decide(&judged, order, &protocol.gates))
}

/// "12 s so far, about 40 s left": the time left estimated from the rate so far, in tokens
/// (prompt and answer) scored per second.
fn time_left(elapsed: f64, done_tokens: f64, total_tokens: f64) -> String {
    if done_tokens >= total_tokens || done_tokens <= 0.0 {
        return format!("{elapsed:.0} s");
    }
    let left = elapsed / done_tokens * (total_tokens - done_tokens);
    format!("{elapsed:.0} s so far, about {left:.0} s left")
}

/// One line on what the oracle cost.
pub fn describe_cost(cost: &OracleCost) -> String {
    format!(
        "oracle: {:.1} s ({} sequences scored, {} reference answers generated, {} answers from its cache)",
        cost.seconds, cost.scored, cost.generated, cost.cache_hits
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_scales_the_rate_so_far() {
        assert_eq!(
            time_left(10.0, 100.0, 400.0),
            "10 s so far, about 30 s left"
        );
        assert_eq!(time_left(12.4, 400.0, 400.0), "12 s");
        assert_eq!(time_left(0.0, 0.0, 400.0), "0 s");
    }
}
