//! The quality phase of a run: after every timed request, the oracle scores each one and the
//! gates are decided.
//!
//! For each timed sample: the oracle scores the prompt plus the emitted tokens (teacher-forced);
//! the baseline's own answer to the same instance is the reference. When every emitted token is
//! the oracle's argmax, the variant's answer *is* the baseline's greedy answer, so it serves as
//! the reference at no cost; otherwise the oracle generates the reference and scores it. Both
//! answers are cached by the oracle, so a repeated instance costs nothing the second time.

use anyhow::Result;

use crate::oracle::{Oracle, OracleCost};
use crate::prompts::PromptSet;
use crate::protocol::Protocol;
use crate::quality::{repeated_ngram_share, GateReport, RequestQuality, TextFigures, REPETITION_N};
use crate::report::Sample;
use crate::tokenize::TextCodec;

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
    let bar = crate::run::progress_bar(samples.len(), "quality ");
    let mut judged = Vec::with_capacity(samples.len());
    for sample in samples.iter_mut() {
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
        judged.push((sample.prompt.clone(), quality.clone()));
        sample.quality = Some(quality);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(GateReport::decide(&judged, order, &protocol.gates))
}

/// One line on what the oracle cost.
pub fn describe_cost(cost: &OracleCost) -> String {
    format!(
        "oracle: {:.1} s ({} sequences scored, {} reference answers generated, {} answers from its cache)",
        cost.seconds, cost.scored, cost.generated, cost.cache_hits
    )
}
