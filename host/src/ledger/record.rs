//! The experiment log: one row per run appended to `results/results.tsv`, and one JSON file per
//! run with every raw sample.
//!
//! [`row`] builds a run's typed row ([`crate::ledger::row`] appends it); JSON files are written
//! to a temporary name and renamed, so a crash can lose at most the run in progress.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::harness::protocol::Protocol;
use crate::ledger::row::{ResultsRow, Status, Verdict};
use crate::measure::sample::Summary;
use crate::quality::GateReport;

/// Which prompts a run covered: a partial run (`--prompt`) says so in its row.
pub struct Scope<'a> {
    pub prompts: &'a [String],
    pub all_prompts: bool,
}

/// What a comparison adds to its row (`host run` rows leave these columns `-`).
pub struct Compared<'a> {
    /// Variant A as given.
    pub against: &'a str,
    pub against_tree: &'a str,
    pub rounds: u32,
    /// The decode rate's paired statistics (B/A), at the decision's alpha.
    pub decode: Option<&'a crate::stats::significance::Paired>,
    /// KEEP, REVERT, NOISE (SCREEN-... for a screen); `None` when the comparison failed.
    pub verdict: Option<Verdict>,
}

/// What the measured model is, as far as a keep is concerned ([`ModelKind::keepable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// The protocol's default model (its pinned SHA-256).
    Default,
    /// A `host synth` file whose weights came from a secret key: gated at its shape.
    SyntheticSecret,
    /// A `host synth` file written from a seed: measured for speed only.
    SyntheticSeeded,
    /// Any other GGUF, or a record from before this field.
    #[default]
    Other,
}

impl ModelKind {
    /// The kind of `model`.
    pub fn of(model: &crate::gguf::Model) -> ModelKind {
        match (model.is_synthetic(), model.is_gated()) {
            (true, true) => ModelKind::SyntheticSecret,
            (true, false) => ModelKind::SyntheticSeeded,
            _ if model.sha256() == crate::harness::fetch::DEFAULT_MODEL_SHA256 => {
                ModelKind::Default
            }
            _ => ModelKind::Other,
        }
    }

    /// Whether a comparison on such a model may be kept: the default model, or a synthetic
    /// one no variant can regenerate. Any other file is gated, but its weights are whatever
    /// its writer chose (all zeros, say, where skipping every layer gives the oracle's own
    /// output), so the gates say nothing of the real model.
    pub fn keepable(self) -> bool {
        matches!(self, ModelKind::Default | ModelKind::SyntheticSecret)
    }

    /// In words, for a refusal.
    pub fn describe(self) -> &'static str {
        match self {
            ModelKind::Default => "the default model",
            ModelKind::SyntheticSecret => "a synthetic model with secret weights",
            ModelKind::SyntheticSeeded => "a synthetic model written from a seed",
            ModelKind::Other => "a model that is neither the default one nor synthetic",
        }
    }
}

/// Where the run's code and machine came from.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub time: String,
    pub commit: String,
    pub variant_dir: String,
    pub variant_package: String,
    pub variant_tree: String,
    pub harness: String,
    pub model_path: String,
    pub model_sha256: String,
    /// What the model is, for `host keep`.
    pub model_kind: ModelKind,
    /// The model's shape ([`crate::gguf::Model::shape_sha256`]): for `host keep`, which
    /// refuses a verdict drawn again on the same shape after another.
    pub model_shape: String,
    pub machine: String,
    pub device: String,
    /// What of the harness differed from HEAD (empty: the committed one ran).
    pub harness_modified: Vec<String>,
    /// How the variant code of the measurement was confined ([`crate::sandbox::Level`]).
    pub sandbox: crate::sandbox::Level,
}

/// A one-line description of this machine: host name, CPU model, logical CPUs.
pub fn machine() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{host} ({cpu}, {cpus} CPUs)")
}

/// Where the NVIDIA driver lists the machine's GPUs: a folder per card, each with an
/// `information` file.
pub const NVIDIA_GPUS: &str = "/proc/driver/nvidia/gpus";

/// The models of the NVIDIA GPUs listed under `gpus` ([`NVIDIA_GPUS`]; each card's
/// `information` file names it on its `Model:` line), each once, sorted: so a comparison's
/// device says which card it ran on (an H100 and an H200 machine have the same CPUs and both
/// call it `cuda:0`). Empty where there is no NVIDIA driver or it lists no card.
pub fn nvidia_models(gpus: &Path) -> Vec<String> {
    let Ok(cards) = fs::read_dir(gpus) else {
        return Vec::new();
    };
    let mut models: Vec<String> = cards
        .flatten()
        .filter_map(|card| fs::read_to_string(card.path().join("information")).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("Model:"))
                .map(|m| m.trim().to_string())
        })
        .filter(|m| !m.is_empty())
        .collect();
    models.sort();
    models.dedup();
    models
}

/// The first 12 hex digits of a hash: enough to tell runs apart in a table.
fn short(hash: &str) -> String {
    hash.chars().take(12).collect()
}

/// Writes `value` as pretty JSON to `dir/<stem>.json` (atomically) and returns its path.
pub fn write_json<T: Serialize>(dir: &Path, stem: &str, value: &T) -> Result<PathBuf> {
    let runs = dir.join("runs");
    fs::create_dir_all(&runs).with_context(|| format!("cannot create {}", runs.display()))?;
    let path = runs.join(format!("{stem}.json"));
    let tmp = runs.join(format!(".{stem}.json.tmp"));
    let text = serde_json::to_string_pretty(value)?;
    fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, &path)
        .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    Ok(path)
}

/// The row for one run (`summary` is `None` when the run failed before any figure, `gates`
/// when it was not gated).
#[allow(clippy::too_many_arguments)]
pub fn row(
    p: &Provenance,
    protocol: &Protocol,
    scope: &Scope,
    summary: Option<&Summary>,
    gates: Option<&GateReport>,
    compared: Option<&Compared>,
    status: Status,
    description: &str,
    json: &Path,
) -> ResultsRow {
    let f = |v: Option<f64>, digits: usize| {
        v.map(|v| format!("{v:.digits$}"))
            .unwrap_or_else(|| "-".into())
    };
    let o = summary.map(|s| &s.overall);
    let g = gates.map(|r| &r.overall);
    ResultsRow {
        time: p.time.clone(),
        commit: p.commit.clone(),
        variant: p.variant_dir.clone(),
        variant_tree: short(&p.variant_tree),
        harness: if p.harness_modified.is_empty() {
            short(&p.harness)
        } else {
            // Loud, and never equal to a committed harness's hash.
            format!(
                "modified-{}",
                short(p.harness.trim_start_matches("modified-"))
            )
        },
        sandbox: p.sandbox.label(),
        model: short(&p.model_sha256),
        machine: p.machine.clone(),
        device: p.device.clone(),
        rounds: protocol.rounds.to_string(),
        max_new_tokens: protocol.max_new_tokens.to_string(),
        seed: protocol.seed.to_string(),
        prompts: if scope.all_prompts {
            "all".into()
        } else {
            scope.prompts.join(",")
        },
        prefill_tok_s: f(o.and_then(|o| o.prefill_tok_s.map(|s| s.median)), 1),
        decode_tok_s: f(o.and_then(|o| o.decode_tok_s.map(|s| s.median)), 2),
        decode_iqr_pct: f(o.and_then(|o| o.decode_tok_s.map(|s| s.iqr_percent())), 1),
        ttft_ms: f(o.and_then(|o| o.ttft_ms.map(|s| s.median)), 1),
        itl_p50_ms: f(o.and_then(|o| o.itl_p50_ms.map(|s| s.median)), 2),
        itl_p99_ms: f(o.and_then(|o| o.itl_p99_ms.map(|s| s.median)), 2),
        peak_rss_mib: f(o.and_then(|o| o.peak_rss_mib.map(|s| s.max)), 1),
        // The gates' count where they ran: over the same answers as the baseline's beside it.
        // The timed samples' count alone leaves out the rounds a comparison's B answered
        // untimed, so it read "12/14 (baseline 18/21)" for a variant that passed 18 of 21.
        checks_passed: g
            .map(|g| format!("{}/{}", g.checks_passed, g.checks_total))
            .or_else(|| o.map(|o| format!("{}/{}", o.checks_passed, o.checks_total)))
            .unwrap_or_else(|| "-".into()),
        checks_baseline: g
            .map(|g| format!("{}/{}", g.reference_checks_passed, g.checks_total))
            .unwrap_or_else(|| "-".into()),
        agreement: f(g.map(|g| g.agreement), 4),
        ppl_ratio: f(g.map(|g| g.perplexity_ratio), 4),
        repetition: f(g.map(|g| g.repetition), 3),
        repetition_baseline: f(g.map(|g| g.reference_repetition), 3),
        gates: match gates {
            None => "-".into(),
            Some(r) if r.passed() => "pass".into(),
            Some(r) => format!(
                "fail: {}",
                r.failures
                    .iter()
                    .map(|f| format!("{} {}", f.prompt, f.gate))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        },
        against: compared.map_or("-".into(), |c| c.against.to_string()),
        against_tree: compared.map_or("-".into(), |c| short(c.against_tree)),
        compare_rounds: compared.map_or("-".into(), |c| c.rounds.to_string()),
        decode_ratio: compared.and_then(|c| c.decode).map_or("-".into(), |d| {
            format!("{:.4} [{:.4}, {:.4}]", d.ratio, d.ci.0, d.ci.1)
        }),
        verdict: compared.and_then(|c| c.verdict),
        status,
        description: description.to_string(),
        json: json
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A card's model is read from its `Model:` line, each model once; a card without an
    /// information file, or no driver at all, adds nothing.
    #[test]
    fn nvidia_models_are_read_from_the_drivers_cards() {
        let gpus = std::env::temp_dir().join(format!("autoinfer-gpus-{}", std::process::id()));
        let _ = fs::remove_dir_all(&gpus);
        let card = |bus: &str, info: Option<&str>| {
            let dir = gpus.join(bus);
            fs::create_dir_all(&dir).unwrap();
            if let Some(info) = info {
                fs::write(dir.join("information"), info).unwrap();
            }
        };
        assert!(nvidia_models(&gpus).is_empty(), "no driver: no models");
        let h200 = "Model: \t\t NVIDIA H200\nIRQ:   \t\t 17\nGPU UUID: \t GPU-0\n";
        card("0000:18:00.0", Some(h200));
        card("0000:2a:00.0", Some(h200));
        card("0000:3a:00.0", None);
        assert_eq!(nvidia_models(&gpus), ["NVIDIA H200"]);
        card("0000:4a:00.0", Some("Model: \t\t NVIDIA H100 80GB HBM3\n"));
        assert_eq!(
            nvidia_models(&gpus),
            ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
        );
        let _ = fs::remove_dir_all(&gpus);
    }
}
