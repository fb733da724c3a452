//! Summaries of the raw samples and the tables `host run` prints.
//!
//! [`Sample`] is one timed request as recorded; [`Figures`] summarises a set of them (median and
//! spread of each figure, check pass counts); [`Summary`] holds the overall figures and one per
//! prompt, in prompt order.

use std::fmt::Write as _;

use serde::Serialize;

use crate::harness::prompts::{CheckOutcome, PromptInstance};
use crate::measure::Timing;
use crate::quality::RequestQuality;
use crate::stats::{percentile, Spread};

/// One timed request, everything kept.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub prompt: String,
    pub round: u32,
    pub instance: PromptInstance,
    pub timing: Timing,
    pub peak_rss_kib: u64,
    /// CPU time the variant's worker used on this request (all its threads), in ms.
    pub cpu_ms: f64,
    /// Time the worker was kept stopped during this request while the other side of its pair
    /// took a turn (`host compare`), in ms; no timing counts it.
    pub paused_ms: f64,
    pub tokens: Vec<u32>,
    /// Index of the first end-of-sequence token, if any.
    pub eos_at: Option<usize>,
    /// The output text up to the first end-of-sequence token.
    pub text: String,
    /// Share of repeated 4-grams in the tokens before the first end-of-sequence token.
    pub repetition: f64,
    pub checks: Vec<CheckOutcome>,
    /// The prompt's token ids (not recorded: the instance says how to rebuild them).
    #[serde(skip)]
    pub prompt_ids: Vec<u32>,
    /// The quality gates' figures for this request, once the oracle has scored it.
    pub quality: Option<RequestQuality>,
}

/// Median and spread of every figure over a set of samples.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub label: String,
    pub requests: usize,
    pub prompt_tokens: Option<Spread>,
    pub prefill_tok_s: Option<Spread>,
    pub decode_tok_s: Option<Spread>,
    pub ttft_ms: Option<Spread>,
    /// Per request: the median gap between tokens, then summarised over requests.
    pub itl_p50_ms: Option<Spread>,
    /// Per request: the 99th-percentile gap between tokens, then summarised over requests.
    pub itl_p99_ms: Option<Spread>,
    pub peak_rss_mib: Option<Spread>,
    /// Share of repeated 4-grams in the output (see `quality::repeated_ngram_share`).
    pub repetition: Option<Spread>,
    pub checks_passed: usize,
    pub checks_total: usize,
}

impl Figures {
    /// Summarises `samples` under `label`.
    pub fn of(label: &str, samples: &[&Sample]) -> Figures {
        let over = |f: &dyn Fn(&Sample) -> Option<f64>| {
            Spread::of(&samples.iter().filter_map(|s| f(s)).collect::<Vec<_>>())
        };
        Figures {
            label: label.into(),
            requests: samples.len(),
            prompt_tokens: over(&|s| Some(s.timing.prompt_tokens as f64)),
            prefill_tok_s: over(&|s| Some(s.timing.prefill_tok_s)),
            decode_tok_s: over(&|s| Some(s.timing.decode_tok_s)),
            ttft_ms: over(&|s| Some(s.timing.ttft_ms)),
            itl_p50_ms: over(&|s| percentile(&s.timing.itl_ms, 50.0)),
            itl_p99_ms: over(&|s| percentile(&s.timing.itl_ms, 99.0)),
            peak_rss_mib: over(&|s| Some(s.peak_rss_kib as f64 / 1024.0)),
            repetition: over(&|s| Some(s.repetition)),
            checks_passed: samples
                .iter()
                .flat_map(|s| &s.checks)
                .filter(|c| c.passed)
                .count(),
            checks_total: samples.iter().map(|s| s.checks.len()).sum(),
        }
    }
}

/// The overall figures and those of each prompt.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub overall: Figures,
    pub per_prompt: Vec<Figures>,
}

impl Summary {
    /// Summarises `samples`, keeping `prompt_order` for the per-prompt rows.
    pub fn of(samples: &[Sample], prompt_order: &[String]) -> Summary {
        let all: Vec<&Sample> = samples.iter().collect();
        let per_prompt = prompt_order
            .iter()
            .map(|name| {
                Figures::of(
                    name,
                    &samples
                        .iter()
                        .filter(|s| &s.prompt == name)
                        .collect::<Vec<_>>(),
                )
            })
            .filter(|f| f.requests > 0)
            .collect();
        Summary {
            overall: Figures::of("all", &all),
            per_prompt,
        }
    }

    /// The per-prompt table and the overall block, as printed by `host run`.
    pub fn render(&self) -> String {
        let cell = |s: &Option<Spread>, digits: usize| match s {
            Some(s) if s.n > 1 => {
                format!("{:.d$} ({:.d$}-{:.d$})", s.median, s.min, s.max, d = digits)
            }
            Some(s) => format!("{:.d$}", s.median, d = digits),
            None => "-".into(),
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<14} {:>6}  {:<24} {:<22} {:<28} {:<19} {:<19} {:>7}",
            "prompt",
            "tokens",
            "prefill tok/s",
            "decode tok/s",
            "TTFT ms",
            "ITL p50 ms",
            "ITL p99 ms",
            "checks"
        );
        for f in &self.per_prompt {
            let _ = writeln!(
                out,
                "{:<14} {:>6}  {:<24} {:<22} {:<28} {:<19} {:<19} {:>7}",
                f.label,
                f.prompt_tokens
                    .map(|s| format!("{:.0}", s.median))
                    .unwrap_or_default(),
                cell(&f.prefill_tok_s, 1),
                cell(&f.decode_tok_s, 2),
                cell(&f.ttft_ms, 1),
                cell(&f.itl_p50_ms, 2),
                cell(&f.itl_p99_ms, 2),
                format!("{}/{}", f.checks_passed, f.checks_total),
            );
        }
        let o = &self.overall;
        let _ = writeln!(
            out,
            "\noverall, {} timed requests (median, interquartile range, min-max):",
            o.requests
        );
        for (name, s, digits) in [
            ("prefill tok/s", &o.prefill_tok_s, 1),
            ("decode tok/s", &o.decode_tok_s, 2),
            ("TTFT ms", &o.ttft_ms, 1),
            ("ITL p50 ms", &o.itl_p50_ms, 2),
            ("ITL p99 ms", &o.itl_p99_ms, 2),
            ("peak RSS MiB", &o.peak_rss_mib, 1),
            ("repetition", &o.repetition, 3),
        ] {
            if let Some(s) = s {
                let _ = writeln!(
                    out,
                    "  {name:<14} {:>10.d$}   IQR {:.d$}-{:.d$} ({:.1}%)   range {:.d$}-{:.d$}",
                    s.median,
                    s.p25,
                    s.p75,
                    s.iqr_percent(),
                    s.min,
                    s.max,
                    d = digits
                );
            }
        }
        let _ = writeln!(
            out,
            "  {:<14} {:>10}",
            "checks passed",
            format!("{}/{}", o.checks_passed, o.checks_total)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(prompt: &str, decode_ms_per_token: u64, passed: bool) -> Sample {
        let emits: Vec<u64> = (0..4)
            .map(|i| 100_000_000 + i * decode_ms_per_token * 1_000_000)
            .collect();
        Sample {
            prompt: prompt.into(),
            round: 0,
            instance: PromptInstance {
                prompt: prompt.into(),
                user_text: String::new(),
                nonce: String::new(),
                values: Default::default(),
            },
            timing: Timing::from_arrivals(50, &[1, 2, 3, 4], &emits, 0, 4, 10).unwrap(),
            peak_rss_kib: 2048,
            cpu_ms: 0.0,
            paused_ms: 0.0,
            tokens: vec![1, 2, 3, 4],
            eos_at: None,
            text: String::new(),
            repetition: 0.25,
            checks: vec![CheckOutcome {
                check: "x".into(),
                passed,
                detail: String::new(),
            }],
            prompt_ids: vec![9; 50],
            quality: None,
        }
    }

    #[test]
    fn summarises_per_prompt_and_overall() {
        let samples = vec![
            sample("a", 10, true),
            sample("b", 20, false),
            sample("a", 20, true),
        ];
        let s = Summary::of(&samples, &["a".into(), "b".into(), "c".into()]);
        assert_eq!(
            s.per_prompt.len(),
            2,
            "a prompt without samples gets no row"
        );
        assert_eq!(s.per_prompt[0].decode_tok_s.unwrap().median, 75.0);
        assert_eq!(s.overall.decode_tok_s.unwrap().median, 50.0);
        assert_eq!((s.overall.checks_passed, s.overall.checks_total), (2, 3));
        assert_eq!(s.overall.peak_rss_mib.unwrap().max, 2.0);
        assert_eq!(s.overall.repetition.unwrap().median, 0.25);
        let table = s.render();
        assert!(
            table.contains("decode tok/s") && table.contains("75.00 (50.00-100.00)"),
            "{table}"
        );
    }
}
