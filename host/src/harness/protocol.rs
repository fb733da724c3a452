//! The measurement protocol: `prompts/protocol.toml`, part of the locked harness.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why the protocol file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ProtocolError {
    pub path: PathBuf,
    pub message: String,
}

/// How every run is measured. Each value's reason is written beside it in the file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Protocol {
    /// Tokens every request must produce, exactly.
    pub max_new_tokens: u32,
    /// Timed rounds over all prompts.
    pub rounds: u32,
    /// Untimed requests before the first round.
    pub warmup_requests: u32,
    /// Seed of the prompt draws: not in the file. Every run and comparison draws a fresh one
    /// (or takes `--seed`), so no instance can be known in advance; it is recorded with the
    /// protocol in every result.
    #[serde(skip_deserializing)]
    pub seed: u64,
    /// Seconds a request (or the variant's load) may take before the worker is killed.
    pub request_timeout_s: f64,
    /// The decoding policy; only "greedy" exists.
    pub decoding: String,
    /// The quality gates' thresholds (`[gates]`).
    pub gates: Gates,
    /// How `host compare` decides (`[compare]`).
    pub compare: CompareRules,
    /// What `host compare --screen` measures instead (`[screen]`).
    pub screen: ScreenRules,
}

/// `host compare --screen`: a cheap first look at an idea on part of the protocol, whose
/// verdict is recorded as a screen and can never be kept.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScreenRules {
    /// The prompts a screen runs (a subset of prompts/).
    pub prompts: Vec<String>,
    /// Tokens every request of a screen produces.
    pub max_new_tokens: u32,
    /// Looks of a screen.
    pub looks: u32,
    /// Rounds between a screen's looks.
    pub rounds_per_look: u32,
}

/// The statistics of `host compare`: thresholds and the schedule of looks.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CompareRules {
    /// Smallest relative change that can earn a verdict (0.01 = 1%).
    pub noise_threshold: f64,
    /// The chance of any false verdict, over every figure and every look, is at most this.
    pub alpha: f64,
    /// Looks at the data, fixed in advance.
    pub looks: u32,
    /// Rounds (each one request per prompt and variant) between looks.
    pub rounds_per_look: u32,
    /// How early alpha is spent over the looks (Hwang-Shih-DeCani gamma: -4 late, 0 evenly,
    /// 1 early); see `significance::spent`.
    pub spending_gamma: f64,
    /// Tokens of the short untimed request each fresh worker answers before its timed one.
    pub warmup_new_tokens: u32,
    /// Measuring stops (once decode is decided) when every guarded figure's chance of ending
    /// SLOWER at the last look is below this; 0 waits until each is shown no worse.
    pub guard_stop_chance: f64,
    /// Measuring stops, with nothing SLOWER, when decode's chance of ending FASTER and its
    /// chance of ending SLOWER are both below this (futility); 0 waits for decode to be decided.
    pub futility_chance: f64,
    /// The comparison stops at the first look after this many seconds of measuring.
    pub max_seconds: f64,
    /// A pair's two timed requests take turns on the machine, this many ms each, so that a
    /// slow spell hits both; 0 runs them one after the other.
    pub turn_ms: u32,
}

/// Thresholds of the quality gates, each decided per prompt over its timed requests.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    /// A token whose oracle log-probability is within this many nats of the oracle's argmax
    /// counts as agreeing (a near tie that reordered floating-point sums may flip).
    pub tie_margin: f64,
    /// Least share of emitted tokens that must agree with the oracle.
    pub min_agreement: f64,
    /// Largest ratio of the variant's perplexity (under the oracle) to the baseline's.
    pub max_perplexity_ratio: f64,
    /// Largest drop of the sanity-check pass rate below the baseline's, as a share of checks.
    pub max_check_drop: f64,
    /// Largest rise of the repeated-4-gram share above the baseline's.
    pub max_repetition_rise: f64,
    /// Where the oracle computes (`cpu`, `cuda`, `cuda:N`): a device other than the CPU
    /// builds the oracle with that device's cargo feature. Absent means `cpu`.
    #[serde(default = "default_oracle_device")]
    pub oracle_device: String,
    /// How many rounds of a comparison's candidate the oracle scores (picked at random after
    /// measuring); a run scores all of its rounds.
    pub scored_rounds: u32,
}

fn default_oracle_device() -> String {
    "cpu".into()
}

impl Gates {
    /// The oracle's device, parsed (an error names the bad value).
    pub fn oracle_device(&self) -> Result<plugin_api::Device, String> {
        self.oracle_device
            .parse()
            .map_err(|e| format!("gates.oracle_device: {e}"))
    }
}

impl Protocol {
    /// The protocol this checkout ships (prompts/protocol.toml), for the simulations that
    /// justify its values.
    #[cfg(test)]
    pub fn shipped() -> Protocol {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../prompts/protocol.toml");
        Protocol::load(&path).expect("prompts/protocol.toml loads")
    }

    /// Loads and checks `path`.
    pub fn load(path: &Path) -> Result<Protocol, ProtocolError> {
        let err = |message: String| ProtocolError {
            path: path.into(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        if toml::from_str::<toml::Table>(&text).is_ok_and(|t| t.contains_key("seed")) {
            return Err(err(
                "`seed` is no longer a protocol value: every run draws a fresh seed (recorded in \
                 its results row); pass --seed to repeat one. Remove the line."
                    .into(),
            ));
        }
        let p: Protocol =
            toml::from_str(&text).map_err(|e| err(e.to_string().trim_end().to_string()))?;
        p.check().map_err(err)?;
        p.screen.check().map_err(err)?;
        Ok(p)
    }

    /// Checks the values make sense (also after command-line overrides).
    pub fn check(&self) -> Result<(), String> {
        if self.max_new_tokens < 2 {
            return Err(format!(
                "max_new_tokens is {}; at least 2 are needed to time decoding",
                self.max_new_tokens
            ));
        }
        if self.rounds == 0 {
            return Err("rounds must be at least 1".into());
        }
        let t = self.request_timeout_s;
        if !t.is_finite() || t <= 0.0 || t > 86_400.0 {
            return Err(format!(
                "request_timeout_s must be between 0 and 86400 seconds, not {t}"
            ));
        }
        let g = &self.gates;
        for (name, value, lo, hi) in [
            ("gates.tie_margin", g.tie_margin, 0.0, 10.0),
            ("gates.min_agreement", g.min_agreement, 0.0, 1.0),
            (
                "gates.max_perplexity_ratio",
                g.max_perplexity_ratio,
                1.0,
                1e6,
            ),
            ("gates.max_check_drop", g.max_check_drop, 0.0, 1.0),
            ("gates.max_repetition_rise", g.max_repetition_rise, 0.0, 1.0),
        ] {
            if !(lo..=hi).contains(&value) {
                return Err(format!("{name} must be between {lo} and {hi}, not {value}"));
            }
        }
        g.oracle_device()?;
        if g.scored_rounds == 0 {
            return Err("gates.scored_rounds must be at least 1".into());
        }
        self.compare.check()?;
        if self.decoding != "greedy" {
            return Err(format!(
                "decoding {:?} is not supported (only \"greedy\")",
                self.decoding
            ));
        }
        Ok(())
    }
}

impl CompareRules {
    /// Checks the values make sense (also after command-line overrides).
    pub fn check(&self) -> Result<(), String> {
        for (name, value, lo, hi) in [
            ("compare.noise_threshold", self.noise_threshold, 0.0, 1.0),
            ("compare.alpha", self.alpha, 1e-6, 0.5),
            ("compare.max_seconds", self.max_seconds, 1.0, 604_800.0),
            ("compare.spending_gamma", self.spending_gamma, -10.0, 10.0),
            (
                "compare.guard_stop_chance",
                self.guard_stop_chance,
                0.0,
                0.5,
            ),
            ("compare.futility_chance", self.futility_chance, 0.0, 0.5),
        ] {
            if !(lo..=hi).contains(&value) {
                return Err(format!("{name} must be between {lo} and {hi}, not {value}"));
            }
        }
        if !(1..=100).contains(&self.looks) {
            return Err(format!(
                "compare.looks must be between 1 and 100, not {}",
                self.looks
            ));
        }
        if !(1..=1000).contains(&self.rounds_per_look) {
            return Err(format!(
                "compare.rounds_per_look must be between 1 and 1000, not {}",
                self.rounds_per_look
            ));
        }
        if self.turn_ms != 0 && !(10..=60_000).contains(&self.turn_ms) {
            return Err(format!(
                "compare.turn_ms must be 0 (one request after the other) or between 10 and \
                 60000, not {}",
                self.turn_ms
            ));
        }
        if !(1..=4096).contains(&self.warmup_new_tokens) {
            return Err(format!(
                "compare.warmup_new_tokens must be between 1 and 4096, not {}",
                self.warmup_new_tokens
            ));
        }
        Ok(())
    }
}

impl ScreenRules {
    /// Checks the values make sense.
    pub fn check(&self) -> Result<(), String> {
        if self.prompts.is_empty() {
            return Err("screen.prompts must name at least one prompt".into());
        }
        if !(2..=4096).contains(&self.max_new_tokens) {
            return Err(format!(
                "screen.max_new_tokens must be between 2 and 4096, not {}",
                self.max_new_tokens
            ));
        }
        if !(1..=100).contains(&self.looks) || !(1..=1000).contains(&self.rounds_per_look) {
            return Err(format!(
                "screen.looks (1 to 100) and screen.rounds_per_look (1 to 1000) are {} and {}",
                self.looks, self.rounds_per_look
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_protocol_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../prompts/protocol.toml");
        let p = Protocol::load(&path).unwrap();
        assert_eq!(p.decoding, "greedy");
    }

    #[test]
    fn bad_values_are_named() {
        let dir = std::env::temp_dir().join(format!("autoinfer-protocol-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("protocol.toml");
        let good = "max_new_tokens = 8\nrounds = 1\nwarmup_requests = 1\nrequest_timeout_s = 5\ndecoding = \"greedy\"\n\
                    [gates]\ntie_margin = 0.01\nmin_agreement = 0.99\nmax_perplexity_ratio = 1.05\n\
                    max_check_drop = 0.1\nmax_repetition_rise = 0.2\nscored_rounds = 3\n\
                    [compare]\nnoise_threshold = 0.01\nalpha = 0.05\nlooks = 5\nrounds_per_look = 2\nspending_gamma = -1.0\nwarmup_new_tokens = 8\nguard_stop_chance = 0.01\nfutility_chance = 0.01\nmax_seconds = 600\nturn_ms = 250\n\
                    [screen]\nprompts = [\"a\"]\nmax_new_tokens = 16\nlooks = 2\nrounds_per_look = 1\n";
        std::fs::write(&path, good).unwrap();
        Protocol::load(&path).expect("the good file loads");
        for (bad, needle) in [
            (good.replace("rounds = 1", "rounds = 0"), "rounds"),
            (good.replace("rounds = 1", "rounds = \"x\""), "rounds"),
            (good.replace("greedy", "beam"), "beam"),
            (
                good.replace("request_timeout_s = 5", "request_timeout_s = inf"),
                "request_timeout_s",
            ),
            (
                good.replace("rounds = 1\n", "rounds = 1\nseed = 3\n"),
                "--seed",
            ),
            (
                good.replace("min_agreement = 0.99", "min_agreement = 1.5"),
                "gates.min_agreement",
            ),
            (
                good.replace("max_perplexity_ratio = 1.05", "max_perplexity_ratio = 0.5"),
                "gates.max_perplexity_ratio",
            ),
            (good.replace("tie_margin = 0.01\n", ""), "tie_margin"),
            (
                good.replace("scored_rounds = 3", "scored_rounds = 0"),
                "gates.scored_rounds",
            ),
            (
                good.replace("[compare]", "oracle_device = \"gpu\"\n[compare]"),
                "gates.oracle_device",
            ),
            (good.replace("[gates]", "[gate]"), "gate"),
            (good.replace("alpha = 0.05", "alpha = 0"), "compare.alpha"),
            (good.replace("looks = 5", "looks = 0"), "compare.looks"),
            (
                good.replace("spending_gamma = -1.0", "spending_gamma = 30.0"),
                "compare.spending_gamma",
            ),
            (
                good.replace("warmup_new_tokens = 8", "warmup_new_tokens = 0"),
                "compare.warmup_new_tokens",
            ),
            (
                good.replace("prompts = [\"a\"]", "prompts = []"),
                "screen.prompts",
            ),
            (
                good.replace("guard_stop_chance = 0.01", "guard_stop_chance = 0.9"),
                "compare.guard_stop_chance",
            ),
            (
                good.replace("max_new_tokens = 16", "max_new_tokens = 1"),
                "screen.max_new_tokens",
            ),
            (good.replace("looks = 2\n", "looks = 0\n"), "screen.looks"),
            (
                good.replace("rounds_per_look = 2", "rounds_per_look = 0"),
                "compare.rounds_per_look",
            ),
            (
                good.replace("noise_threshold = 0.01\n", ""),
                "noise_threshold",
            ),
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = Protocol::load(&path).unwrap_err().to_string();
            assert!(e.contains("protocol.toml") && e.contains(needle), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
