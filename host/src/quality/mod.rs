//! The quality gates: figures the host computes from a variant's output and the oracle's scores,
//! and the verdict against the protocol's thresholds.
//!
//! Per timed request, [`RequestQuality::judge`] compares the variant's tokens with the oracle's
//! teacher-forced scores of them ([`ScoredPosition`], one per emitted token) and with the baseline's own answer to the same
//! instance (the reference). [`GateReport::decide`] pools the requests of each prompt and
//! checks every gate of [`crate::harness::protocol::Gates`]; a failure names the prompt, the figure and
//! the threshold.

use std::collections::HashSet;
use std::fmt::Write as _;

use plugin_api::ScoredPosition;
use serde::Serialize;

use crate::harness::protocol::Gates;

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

/// What a text's sanity checks and repetition came to (the variant's or the reference's).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TextFigures {
    pub checks_passed: usize,
    pub checks_total: usize,
    /// Share of repeated 4-grams before the first end-of-sequence token.
    pub repetition: f64,
}

/// The first disagreements of a request, kept so a failure can show where output went astray.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Disagreement {
    /// Index among the emitted tokens.
    pub index: usize,
    pub token: u32,
    pub oracle_argmax: u32,
    /// How many nats less likely the emitted token is than the argmax.
    pub gap: f64,
}

/// How many disagreements a request keeps for the record.
const KEPT_DISAGREEMENTS: usize = 5;

/// The gate figures of one timed request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestQuality {
    pub tokens: usize,
    /// Emitted tokens equal to the oracle's argmax or within the tie margin of it.
    pub agreed: usize,
    /// Of those, the ones that agreed only by the tie margin.
    pub agreed_by_margin: usize,
    pub agreement: f64,
    pub first_disagreements: Vec<Disagreement>,
    /// Mean negative log-likelihood (nats per token) of the emitted tokens under the oracle.
    pub nll: f64,
    /// The same for the baseline's own answer to this instance.
    pub reference_nll: f64,
    /// exp(nll - reference_nll): the variant's perplexity over the baseline's.
    pub perplexity_ratio: f64,
    /// True when the variant emitted exactly the baseline's tokens.
    pub matches_reference: bool,
    pub variant: TextFigures,
    pub reference: TextFigures,
}

fn mean_nll(scores: &[ScoredPosition]) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    -scores.iter().map(|s| s.logprob as f64).sum::<f64>() / scores.len() as f64
}

/// How many of a request's emitted tokens agree with the oracle's argmax (the agreement gate's
/// count, shared by `host run`'s gates and `host bench`'s check).
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    /// Emitted tokens equal to the oracle's argmax or within the tie margin of it.
    pub agreed: usize,
    /// Of those, the ones that agreed only by the tie margin.
    pub agreed_by_margin: usize,
    /// The first few that did not, in order.
    pub first_disagreements: Vec<Disagreement>,
}

impl Agreement {
    /// Counts `tokens` against the oracle's `scores` of them (one per token): a token agrees
    /// when it is the argmax, or within `tie_margin` nats of it.
    pub fn count(tokens: &[u32], scores: &[ScoredPosition], tie_margin: f64) -> Agreement {
        let mut agreed = 0;
        let mut agreed_by_margin = 0;
        let mut first_disagreements = Vec::new();
        for (index, (&token, s)) in tokens.iter().zip(scores).enumerate() {
            let gap = s.argmax_logprob as f64 - s.logprob as f64;
            if token == s.argmax {
                agreed += 1;
            } else if gap <= tie_margin {
                agreed += 1;
                agreed_by_margin += 1;
            } else if first_disagreements.len() < KEPT_DISAGREEMENTS {
                first_disagreements.push(Disagreement {
                    index,
                    token,
                    oracle_argmax: s.argmax,
                    gap,
                });
            }
        }
        Agreement {
            agreed,
            agreed_by_margin,
            first_disagreements,
        }
    }
}

impl RequestQuality {
    /// Judges one request: `tokens` the variant emitted and `scores` the oracle gave them (one
    /// per token), the reference tokens and their scores, and both texts' figures.
    pub fn judge(
        tokens: &[u32],
        scores: &[ScoredPosition],
        reference_tokens: &[u32],
        reference_scores: &[ScoredPosition],
        variant: TextFigures,
        reference: TextFigures,
        tie_margin: f64,
    ) -> RequestQuality {
        let Agreement {
            agreed,
            agreed_by_margin,
            first_disagreements,
        } = Agreement::count(tokens, scores, tie_margin);
        let nll = mean_nll(scores);
        let reference_nll = mean_nll(reference_scores);
        RequestQuality {
            tokens: tokens.len(),
            agreed,
            agreed_by_margin,
            agreement: if tokens.is_empty() {
                1.0
            } else {
                agreed as f64 / tokens.len() as f64
            },
            first_disagreements,
            nll,
            reference_nll,
            perplexity_ratio: (nll - reference_nll).exp(),
            matches_reference: tokens == reference_tokens,
            variant,
            reference,
        }
    }
}

/// The pooled gate figures of a set of requests (one prompt's, or all).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateFigures {
    pub label: String,
    pub requests: usize,
    pub agreement: f64,
    /// Pooled over tokens: exp(mean nll - mean reference nll).
    pub perplexity_ratio: f64,
    pub perplexity: f64,
    pub reference_perplexity: f64,
    pub checks_passed: usize,
    pub reference_checks_passed: usize,
    pub checks_total: usize,
    /// The reference's pass rate minus the variant's (positive: the variant passes fewer).
    pub check_drop: f64,
    pub repetition: f64,
    pub reference_repetition: f64,
    /// Requests whose tokens equal the baseline's exactly.
    pub exact_matches: usize,
}

impl GateFigures {
    /// Pools `requests` under `label`.
    pub fn of(label: &str, requests: &[&RequestQuality]) -> GateFigures {
        let tokens: usize = requests.iter().map(|q| q.tokens).sum();
        let agreed: usize = requests.iter().map(|q| q.agreed).sum();
        let pooled = |f: &dyn Fn(&RequestQuality) -> f64| {
            if tokens == 0 {
                0.0
            } else {
                requests.iter().map(|q| f(q) * q.tokens as f64).sum::<f64>() / tokens as f64
            }
        };
        let nll = pooled(&|q| q.nll);
        let reference_nll = pooled(&|q| q.reference_nll);
        let mean = |f: &dyn Fn(&RequestQuality) -> f64| {
            if requests.is_empty() {
                0.0
            } else {
                requests.iter().map(|q| f(q)).sum::<f64>() / requests.len() as f64
            }
        };
        let checks_total: usize = requests.iter().map(|q| q.variant.checks_total).sum();
        let checks_passed = requests.iter().map(|q| q.variant.checks_passed).sum();
        let reference_checks_passed = requests.iter().map(|q| q.reference.checks_passed).sum();
        let rate = |n: usize| {
            if checks_total == 0 {
                0.0
            } else {
                n as f64 / checks_total as f64
            }
        };
        GateFigures {
            label: label.into(),
            requests: requests.len(),
            agreement: if tokens == 0 {
                1.0
            } else {
                agreed as f64 / tokens as f64
            },
            perplexity_ratio: (nll - reference_nll).exp(),
            perplexity: nll.exp(),
            reference_perplexity: reference_nll.exp(),
            checks_passed,
            reference_checks_passed,
            checks_total,
            check_drop: rate(reference_checks_passed) - rate(checks_passed),
            repetition: mean(&|q| q.variant.repetition),
            reference_repetition: mean(&|q| q.reference.repetition),
            exact_matches: requests.iter().filter(|q| q.matches_reference).count(),
        }
    }
}

/// One failed gate: which prompt, which figure, its value and the threshold it broke.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct GateFailure {
    pub prompt: String,
    pub gate: String,
    /// The figure (JSON writes a non-finite one as null, read back as NaN).
    #[serde(deserialize_with = "null_as_nan")]
    pub figure: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub threshold: f64,
    /// The failure as one sentence.
    pub message: String,
}

/// A float that JSON may hold as null (serde_json writes NaN and infinities so).
fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(<Option<f64> as serde::Deserialize>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Every gate's figures per prompt and overall, and the failures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateReport {
    pub thresholds: Gates,
    pub per_prompt: Vec<GateFigures>,
    pub overall: GateFigures,
    pub failures: Vec<GateFailure>,
}

impl GateReport {
    /// Pools `requests` (prompt name, figures) per prompt in `order` and checks every gate of
    /// every prompt against `gates`.
    pub fn decide(requests: &[(String, RequestQuality)], order: &[String], gates: &Gates) -> Self {
        let all: Vec<&RequestQuality> = requests.iter().map(|(_, q)| q).collect();
        let per_prompt: Vec<GateFigures> = order
            .iter()
            .filter_map(|name| {
                let mine: Vec<&RequestQuality> = requests
                    .iter()
                    .filter(|(p, _)| p == name)
                    .map(|(_, q)| q)
                    .collect();
                (!mine.is_empty()).then(|| GateFigures::of(name, &mine))
            })
            .collect();
        let mut failures = Vec::new();
        for f in &per_prompt {
            let mut fail = |gate: &str, key: &str, figure: f64, threshold: f64, how: &str| {
                failures.push(GateFailure {
                    prompt: f.label.clone(),
                    gate: gate.into(),
                    figure,
                    threshold,
                    message: format!(
                        "prompt {:?}: {gate} {figure:.4} {how} the threshold {threshold} (gates.{key})",
                        f.label
                    ),
                });
            };
            if f.agreement < gates.min_agreement {
                fail(
                    "agreement",
                    "min_agreement",
                    f.agreement,
                    gates.min_agreement,
                    "is below",
                );
            }
            // NaN (no finite perplexity) fails too.
            if f.perplexity_ratio.is_nan() || f.perplexity_ratio > gates.max_perplexity_ratio {
                fail(
                    "perplexity ratio",
                    "max_perplexity_ratio",
                    f.perplexity_ratio,
                    gates.max_perplexity_ratio,
                    "is above",
                );
            }
            // Both are differences of small-count shares: 1e-9 keeps float rounding from
            // failing a value that sits exactly on its threshold.
            if f.check_drop > gates.max_check_drop + 1e-9 {
                fail(
                    "check drop",
                    "max_check_drop",
                    f.check_drop,
                    gates.max_check_drop,
                    "is above",
                );
            }
            let rise = f.repetition - f.reference_repetition;
            if rise > gates.max_repetition_rise + 1e-9 {
                fail(
                    "repetition rise",
                    "max_repetition_rise",
                    rise,
                    gates.max_repetition_rise,
                    "is above",
                );
            }
        }
        GateReport {
            thresholds: gates.clone(),
            overall: GateFigures::of("all", &all),
            per_prompt,
            failures,
        }
    }

    /// True when every gate of every prompt passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The gate table `host run` prints: figures per prompt and overall, then the thresholds.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let g = &self.thresholds;
        let _ = writeln!(
            out,
            "quality gates (variant vs the oracle, and vs the baseline's answer to the same instance):"
        );
        let _ = writeln!(
            out,
            "{:<14} {:>10} {:>10} {:>16} {:>18} {:>14} {:>6}",
            "prompt",
            "agreement",
            "ppl ratio",
            "ppl (baseline)",
            "checks (baseline)",
            "repetition",
            "exact"
        );
        for f in self.per_prompt.iter().chain(std::iter::once(&self.overall)) {
            let _ = writeln!(
                out,
                "{:<14} {:>10.4} {:>10.4} {:>16} {:>18} {:>14} {:>6}",
                f.label,
                f.agreement,
                f.perplexity_ratio,
                format!("{:.3} ({:.3})", f.perplexity, f.reference_perplexity),
                format!(
                    "{}/{} ({}/{})",
                    f.checks_passed, f.checks_total, f.reference_checks_passed, f.checks_total
                ),
                format!("{:.3} ({:.3})", f.repetition, f.reference_repetition),
                format!("{}/{}", f.exact_matches, f.requests),
            );
        }
        let _ = writeln!(
            out,
            "thresholds per prompt: agreement >= {} (tie margin {} nats), ppl ratio <= {}, \
             check drop <= {}, repetition rise <= {}",
            g.min_agreement,
            g.tie_margin,
            g.max_perplexity_ratio,
            g.max_check_drop,
            g.max_repetition_rise
        );
        if self.passed() {
            let _ = writeln!(out, "gates: PASS");
        } else {
            let _ = writeln!(out, "gates: FAIL");
            for f in &self.failures {
                let _ = writeln!(out, "  {}", f.message);
            }
        }
        out
    }
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

    fn gates() -> Gates {
        Gates {
            tie_margin: 0.01,
            min_agreement: 0.9,
            max_perplexity_ratio: 1.1,
            max_check_drop: 0.0,
            max_repetition_rise: 0.2,
            oracle_device: "cpu".into(),
            scored_rounds: 3,
        }
    }

    fn s(logprob: f32, argmax: u32, argmax_logprob: f32) -> ScoredPosition {
        ScoredPosition {
            logprob,
            argmax,
            argmax_logprob,
        }
    }

    fn text(passed: usize, repetition: f64) -> TextFigures {
        TextFigures {
            checks_passed: passed,
            checks_total: 2,
            repetition,
        }
    }

    #[test]
    fn agreement_counts_argmax_and_near_ties_only() {
        let tokens = [5, 6, 7, 8];
        let scores = [
            s(-0.1, 5, -0.1),   // the argmax
            s(-0.705, 9, -0.7), // 0.005 nats short: a tie
            s(-2.0, 9, -0.5),   // 1.5 nats short: disagrees
            s(-0.3, 8, -0.3),
        ];
        let q = RequestQuality::judge(
            &tokens,
            &scores,
            &tokens,
            &scores,
            text(2, 0.0),
            text(2, 0.0),
            0.01,
        );
        assert_eq!((q.agreed, q.agreed_by_margin, q.tokens), (3, 1, 4));
        assert_eq!(q.agreement, 0.75);
        assert_eq!(q.first_disagreements.len(), 1);
        assert_eq!(q.first_disagreements[0].index, 2);
        assert!((q.first_disagreements[0].gap - 1.5).abs() < 1e-6);
        assert!((q.perplexity_ratio - 1.0).abs() < 1e-12);
        assert!(q.matches_reference);
    }

    #[test]
    fn perplexity_ratio_compares_with_the_reference() {
        let q = RequestQuality::judge(
            &[1, 2],
            &[s(-2.0, 1, -2.0), s(-2.0, 2, -2.0)],
            &[1, 3],
            &[s(-1.0, 1, -1.0), s(-1.0, 3, -1.0)],
            text(2, 0.0),
            text(2, 0.0),
            0.0,
        );
        assert!((q.perplexity_ratio - 1f64.exp()).abs() < 1e-9);
        assert!(!q.matches_reference);
    }

    #[test]
    fn each_gate_fails_by_prompt_with_its_threshold() {
        let good = |p: &str| {
            let sc = [s(-1.0, 1, -1.0); 4];
            (
                p.to_string(),
                RequestQuality::judge(&[1; 4], &sc, &[1; 4], &sc, text(2, 0.1), text(2, 0.1), 0.01),
            )
        };
        let order = ["a".to_string(), "b".to_string()];
        let report = GateReport::decide(&[good("a"), good("b")], &order, &gates());
        assert!(report.passed(), "{:?}", report.failures);
        assert_eq!(report.overall.requests, 2);

        // Prompt b: wrong tokens, higher perplexity, a lost check, more repetition.
        let bad_scores = [s(-3.0, 2, -0.5); 4];
        let ref_scores = [s(-1.0, 2, -1.0); 4];
        let bad = (
            "b".to_string(),
            RequestQuality::judge(
                &[1; 4],
                &bad_scores,
                &[2; 4],
                &ref_scores,
                text(1, 0.9),
                text(2, 0.1),
                0.01,
            ),
        );
        let report = GateReport::decide(&[good("a"), bad], &order, &gates());
        let gates_failed: Vec<&str> = report.failures.iter().map(|f| f.gate.as_str()).collect();
        assert_eq!(
            gates_failed,
            [
                "agreement",
                "perplexity ratio",
                "check drop",
                "repetition rise"
            ]
        );
        assert!(report.failures.iter().all(|f| f.prompt == "b"));
        let m = &report.failures[0].message;
        assert!(
            m.contains("\"b\"") && m.contains("0.0000") && m.contains("gates.min_agreement"),
            "{m}"
        );
        let table = report.render();
        assert!(
            table.contains("gates: FAIL") && table.contains("agreement"),
            "{table}"
        );
    }

    #[test]
    fn an_infinite_perplexity_fails() {
        let q = RequestQuality::judge(
            &[1],
            &[s(f32::NEG_INFINITY, 2, -0.1)],
            &[2],
            &[s(-0.1, 2, -0.1)],
            text(2, 0.0),
            text(2, 0.0),
            0.01,
        );
        let report = GateReport::decide(&[("a".into(), q)], &["a".into()], &gates());
        assert!(report.failures.iter().any(|f| f.gate == "perplexity ratio"));
    }
}
