//! What `host run` and `host compare` share before and during measuring.
//!
//! [`Setup::open`] reads the protocol (with command-line overrides) and the prompts, opens the
//! model and its tokenizer: the cheap errors come first. [`Setup::plan`] draws and tokenizes
//! every request of a measurement ([`Planned`]); [`timed_request`] sends one to a worker and
//! turns the reply into a checked [`Sample`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::gguf::Model;
use crate::harness::prompts::{with_nonce, PromptInstance, PromptSet, PromptSpec, Sharing};
use crate::harness::protocol::Protocol;
use crate::harness::tokenize::TextCodec;
use crate::ledger::record::{self, Provenance};
use crate::measure::sample::Sample;
use crate::measure::Timing;
use crate::supervisor::build_place::BuildSandbox;
use crate::supervisor::{Generation, Worker};
use crate::worker::wire::LoadRequest;
use plugin_api::Device;

/// Printed before and after a run whose harness is not HEAD's.
pub fn modified_banner(harness: &crate::vcs::Harness) -> String {
    format!(
        "*** HARNESS MODIFIED: {}. These figures are comparable with no other run, and a \
         comparison under this harness is refused. ***",
        harness.describe()
    )
}

/// Printed before and after any measurement on a synthetic model (`host synth`): `gated` when
/// its weights are secret ([`crate::gguf::Model::is_gated`]).
pub fn synthetic_banner(gated: bool) -> &'static str {
    match gated {
        true => {
            "*** SYNTHETIC MODEL: secret random weights. Its text is noise, so the prompts' \
checks mean nothing here, but every token is gated against the oracle at this shape; figures \
compare only with runs on this same file. ***"
        }
        false => {
            "*** SYNTHETIC MODEL: random weights from a seed. These figures measure speed \
only; the quality gates are skipped and nothing measured on it can be kept (write the file \
without --seed for a gated one). ***"
        }
    }
}

/// Command-line values that override the protocol file or the defaults for one invocation.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// A GGUF instead of the default model.
    pub model: Option<PathBuf>,
    pub rounds: Option<u32>,
    pub max_new_tokens: Option<u32>,
    pub seed: Option<u64>,
    pub timeout_s: Option<f64>,
    /// Only these prompts (all when empty).
    pub prompts: Vec<String>,
    /// Where the variants compute [default: the CPU].
    pub device: Option<Device>,
    /// The thread count every measured worker is held to [default: every core].
    pub threads: Option<usize>,
    /// `host compare --screen`: the protocol's `[screen]` prompts, tokens and looks replace
    /// the full protocol's (the caller refuses flags that would change them).
    pub screen: bool,
}

/// The protocol, prompts, model and tokenizer of one invocation.
pub struct Setup {
    /// The checkout's root.
    pub root: PathBuf,
    pub protocol: Protocol,
    pub prompts: PromptSet,
    pub model: Model,
    pub codec: TextCodec,
    /// Whether every prompt runs (no `--prompt`).
    pub all_prompts: bool,
    /// Where the variants compute (`--device`).
    pub device: Device,
    /// The threads each measured worker computes with and the CPUs it is pinned to
    /// (`--threads`); `None`: every core, the variant's choice of threads.
    pub threads: Option<usize>,
}

/// One request to send: which prompt, which round (`None` for a warm-up), its text and ids.
pub struct Planned<'a> {
    pub spec: &'a PromptSpec,
    pub round: Option<u32>,
    pub instance: PromptInstance,
    pub ids: Vec<u32>,
}

impl Planned<'_> {
    /// How the request is named in progress lines and errors.
    pub fn label(&self, rounds: u32) -> String {
        match self.round {
            Some(r) => format!("prompt {:?} round {}/{rounds}", self.instance.prompt, r + 1),
            None => format!("warm-up request ({:?})", self.instance.prompt),
        }
    }
}

/// Every request of a run or a comparison, no two with the same instance.
pub struct Plan<'a> {
    /// Sets of warm-up requests: one for a run, one per pair for a comparison (each pair's
    /// workers are new).
    pub warmups: Vec<Vec<Planned<'a>>>,
    /// The timed rounds, each one request per prompt.
    pub rounds: Vec<Vec<Planned<'a>>>,
}

/// The checkout's root: the nearest ancestor of `start` with `prompts/protocol.toml`.
pub fn find_root(start: &Path) -> Result<PathBuf> {
    let start = start
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", start.display()))?;
    start
        .ancestors()
        .find(|d| d.join("prompts/protocol.toml").is_file())
        .map(Path::to_path_buf)
        .with_context(|| {
            format!("no prompts/protocol.toml in {} or above it: run host from inside an autoinfer checkout", start.display())
        })
}

/// What a worker must not reach even where it lies inside a hierarchy it may read (a system
/// directory, an `LD_LIBRARY_PATH` entry): the checkout `root`, the target directory (the host
/// binary, the oracle's build and cache, other builds) wherever `CARGO_TARGET_DIR` puts it, the
/// results, and autoinfer's cache (models, tools).
pub fn protected_paths(root: Option<&Path>, results: Option<&Path>) -> Vec<PathBuf> {
    let mut paths = vec![crate::harness::fetch::cache_dir()];
    if let Some(root) = root {
        paths.push(root.to_path_buf());
        paths.push(crate::supervisor::revision::target_dir(root));
    }
    paths.extend(crate::supervisor::cargo_build::target_dir_from_env());
    paths.extend(results.map(Path::to_path_buf));
    paths
}

/// How variant builds in the checkout at `root` are confined: in the one place every variant
/// is built ([`crate::supervisor::revision::place_dir`]), from a copy of the files they need,
/// starting from the committed baseline's build ([`crate::supervisor::revision::seed_dir`]);
/// they may read that copy, the toolchain and the system, and write only the place's target
/// directory; each build for at most the time `AUTOINFER_BUILD_TIMEOUT` sets (fails when it
/// is not a number of seconds).
pub fn build_sandbox(root: &Path) -> Result<BuildSandbox> {
    use crate::supervisor::cargo_build::{build_limit, BUILD_TIMEOUT_VAR};
    let value = std::env::var_os(BUILD_TIMEOUT_VAR).map(|v| v.to_string_lossy().into_owned());
    let limit = build_limit(value.as_deref())?;
    Ok(BuildSandbox {
        seed: Some(crate::supervisor::revision::seed_dir(root)),
        dir: crate::supervisor::revision::place_dir(root),
        checkout: root.to_path_buf(),
        limit,
    })
}

/// Resolves the model: `--model`, else the default one (fetched when missing, hash-checked).
pub fn open_model(path: Option<&Path>) -> Result<Model> {
    match path {
        Some(p) => Ok(Model::open(p)?),
        None => {
            let p = crate::harness::fetch::default_model()?;
            let model = Model::open(&p)?;
            let sha = model.sha256();
            if sha != crate::harness::fetch::DEFAULT_MODEL_SHA256 {
                bail!(
                    "the cached default model {} has SHA-256 {sha}, not {}; delete it and run again to refetch",
                    p.display(),
                    crate::harness::fetch::DEFAULT_MODEL_SHA256
                );
            }
            Ok(model)
        }
    }
}

/// `--threads N` checked against the CPUs this process may run on: at least 1, at most that
/// many (a worker is pinned to N of them, so more could never be granted).
pub fn checked_threads(threads: Option<usize>) -> Result<Option<usize>> {
    let Some(n) = threads else { return Ok(None) };
    let cpus = crate::sandbox::allowed_cpus()?.len();
    if n == 0 || n > cpus {
        bail!(
            "--threads {n}: a worker can be given 1 to {cpus} CPU(s) here (the CPUs this process \
             may run on)"
        );
    }
    Ok(Some(n))
}

/// `set` narrowed to `chosen` (all when empty). An unknown name is blamed on where it came
/// from: the `--prompt` flag, or the protocol's `[screen]` when `screen`.
fn choose_prompts(
    set: PromptSet,
    chosen: &[String],
    screen: bool,
    prompts_dir: &Path,
) -> Result<PromptSet> {
    set.select(chosen).map_err(|e| match screen {
        true => anyhow::anyhow!(
            "{}: [screen] prompts: {e}",
            prompts_dir.join("protocol.toml").display()
        ),
        false => anyhow::anyhow!("--prompt {e}"),
    })
}

impl Setup {
    /// Reads `root`'s protocol and prompts with `o` applied, then opens the model.
    pub fn open(root: PathBuf, o: &Overrides) -> Result<Setup> {
        let prompts_dir = root.join("prompts");
        let mut protocol = Protocol::load(&prompts_dir.join("protocol.toml"))?;
        let mut chosen = o.prompts.clone();
        if o.screen {
            let screen = &protocol.screen;
            chosen = screen.prompts.clone();
            protocol.max_new_tokens = screen.max_new_tokens;
            protocol.compare.looks = screen.looks;
            protocol.compare.rounds_per_look = screen.rounds_per_look;
        }
        if let Some(r) = o.rounds {
            protocol.rounds = r;
        }
        if let Some(n) = o.max_new_tokens {
            protocol.max_new_tokens = n;
        }
        protocol.seed = o.seed.unwrap_or_else(crate::stats::rng::fresh_seed);
        if let Some(t) = o.timeout_s {
            protocol.request_timeout_s = t;
        }
        protocol
            .check()
            .map_err(|m| anyhow::anyhow!("command-line override: {m}"))?;
        let prompts = choose_prompts(
            PromptSet::load(&prompts_dir)?,
            &chosen,
            o.screen,
            &prompts_dir,
        )?;
        let model = open_model(o.model.as_deref())?;
        let codec = TextCodec::from_model(model.view)
            .with_context(|| format!("model {}", model.path.display()))?;
        Ok(Setup {
            root,
            protocol,
            prompts,
            model,
            codec,
            all_prompts: chosen.is_empty(),
            device: o.device.unwrap_or(Device::Cpu),
            threads: checked_threads(o.threads)?,
        })
    }

    /// What every measured worker asks its variant at load time: the device, and the thread
    /// count of `--threads` (the worker is pinned to that many CPUs), or none (the variant uses
    /// every core this process may use).
    pub fn load_request(&self) -> LoadRequest {
        LoadRequest {
            threads: self.threads,
            device: Some(self.device),
        }
    }

    /// The device as results record it: `cpu`, or `cpu, 1 thread` under `--threads 1`.
    /// A GPU's label names the card's model too (`cuda:0 (NVIDIA H200)`), where the driver
    /// lists it: results of two kinds of card are not one history.
    pub fn device_label(&self) -> String {
        let device = match self.device {
            Device::Cuda(_) => {
                let models = record::nvidia_models(Path::new(record::NVIDIA_GPUS));
                match models.as_slice() {
                    [] => self.device.to_string(),
                    models => format!("{} ({})", self.device, models.join(" or ")),
                }
            }
            _ => self.device.to_string(),
        };
        match self.threads {
            None => device,
            Some(1) => format!("{device}, 1 thread"),
            Some(n) => format!("{device}, {n} threads"),
        }
    }

    /// The prompt names in order.
    pub fn order(&self) -> Vec<String> {
        self.prompts
            .prompts
            .iter()
            .map(|p| p.name.clone())
            .collect()
    }

    /// Every request of a run or a comparison, drawn up front from the seed so that no two
    /// share an instance: `rounds` timed rounds (one instance per prompt each), and
    /// `warmup_sets` sets of warm-ups (`warmup_requests` each, over the prompts in turn).
    /// `sharing` says whether the timed requests may share the prompts' `shared` parameters
    /// (only when each goes to a fresh process); warm-ups never do, since the process that
    /// answers a warm-up answers a timed request next.
    pub fn plan(&self, rounds: u32, warmup_sets: u32, sharing: Sharing) -> Result<Plan<'_>> {
        let mut used = std::collections::HashSet::new();
        let specs = &self.prompts.prompts;
        let seed = self.protocol.seed;
        let mut plan = Plan {
            warmups: Vec::new(),
            rounds: Vec::new(),
        };
        for r in 0..rounds {
            let mut round = Vec::new();
            for spec in specs {
                let instance = spec
                    .draw_unique(seed, r as u64, sharing, &mut used)
                    .map_err(anyhow::Error::msg)?;
                round.push(self.tokenized(spec, Some(r), instance)?);
            }
            plan.rounds.push(round);
        }
        // Warm-ups draw from streams counted down from u64::MAX, far from the rounds'.
        let n = self.protocol.warmup_requests as u64;
        for set in 0..warmup_sets as u64 {
            let mut warmups = Vec::new();
            for i in 0..n {
                let spec = &specs[i as usize % specs.len()];
                let instance = spec
                    .draw_unique(
                        seed,
                        u64::MAX - (set * n + i),
                        Sharing::PerRequest,
                        &mut used,
                    )
                    .map_err(anyhow::Error::msg)?;
                warmups.push(self.tokenized(spec, None, instance)?);
            }
            plan.warmups.push(warmups);
        }
        Ok(plan)
    }

    fn tokenized<'a>(
        &'a self,
        spec: &'a PromptSpec,
        round: Option<u32>,
        instance: PromptInstance,
    ) -> Result<Planned<'a>> {
        let chat = self.codec.render_chat(&instance.user_text)?;
        let ids = self.codec.encode(&with_nonce(&instance.nonce, &chat))?;
        Ok(Planned {
            spec,
            round,
            instance,
            ids,
        })
    }

    /// The provenance of a measurement of one variant.
    pub fn provenance(
        &self,
        variant_dir: String,
        package: &str,
        tree: String,
        harness: &crate::vcs::Harness,
        sandbox: crate::sandbox::Level,
    ) -> Provenance {
        Provenance {
            time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            commit: crate::vcs::describe_commit(&self.root),
            variant_dir,
            variant_package: package.to_string(),
            variant_tree: tree,
            harness: harness.hash.clone(),
            harness_modified: harness.modified.clone(),
            model_path: self.model.path.display().to_string(),
            model_sha256: self.model.sha256().to_string(),
            model_kind: crate::ledger::record::ModelKind::of(&self.model),
            model_shape: self.model.shape_sha256(),
            machine: record::machine(),
            device: self.device_label(),
            sandbox,
        }
    }

    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.protocol.request_timeout_s)
    }
}

/// One generation, checked and timed by the supervisor.
pub struct Generated {
    pub timing: Timing,
    pub tokens: Vec<u32>,
    pub peak_rss_kib: u64,
    pub cpu_ms: f64,
    pub paused_ms: f64,
}

/// Asks `worker` (the variant `name`) for exactly `max_new_tokens` tokens after `prompt` and
/// checks (count, vocabulary of `vocab` ids) and times what arrives. `label` names the request
/// in errors.
pub fn generate_timed(
    worker: &mut Worker,
    name: &str,
    prompt: &[u32],
    max_new_tokens: u32,
    vocab: u32,
    label: &str,
    timeout: Duration,
) -> Result<Generated> {
    let generation = worker.generate(prompt, max_new_tokens, label, timeout)?;
    checked(generation, name, prompt.len(), max_new_tokens, vocab, label)
}

/// What a worker generated, checked (count, vocabulary of `vocab` ids) and timed.
fn checked(
    generation: Generation,
    name: &str,
    prompt_tokens: usize,
    max_new_tokens: u32,
    vocab: u32,
    label: &str,
) -> Result<Generated> {
    let timing = Timing::from_arrivals(
        prompt_tokens,
        &generation.tokens,
        &generation.arrivals_ns,
        generation.overflow,
        max_new_tokens as usize,
        vocab,
    )
    .with_context(|| format!("variant {name} failed {label}"))?;
    Ok(Generated {
        timing,
        tokens: generation.tokens,
        peak_rss_kib: generation.peak_rss_kib,
        cpu_ms: generation.cpu_ms,
        paused_ms: generation.paused_ms,
    })
}

/// Sends `planned` to `worker` (the variant `name`), asking for exactly `new_tokens`, and checks
/// and times what comes back. A warm-up's sample is returned too; the caller decides what counts.
pub fn timed_request(
    setup: &Setup,
    worker: &mut Worker,
    name: &str,
    planned: &Planned,
    label: &str,
    new_tokens: u32,
) -> Result<Sample> {
    let generated = generate_timed(
        worker,
        name,
        &planned.ids,
        new_tokens,
        setup.codec.vocab_size,
        label,
        setup.timeout(),
    )?;
    sample_of(setup, planned, generated)
}

/// One side of a time-shared pair: a worker and the variant's name.
pub struct Contender<'w> {
    pub worker: &'w mut Worker,
    pub name: &'w str,
}

/// Sends `planned` to both workers and lets them take turns on the machine, `slice` at a time,
/// starting with `first` (0 for `a`), until both are done; each is timed by its own turns
/// only, so that whatever slows the machine for a few seconds slows both alike. The side that
/// finishes first leaves the other to run alone. Returns the samples of `a` and `b`.
pub fn timed_pair(
    setup: &Setup,
    a: Contender,
    b: Contender,
    planned: &Planned,
    label: &str,
    new_tokens: u32,
    first: usize,
    slice: Duration,
) -> Result<(Sample, Sample)> {
    let mut sides = [a, b];
    let mut running: [Option<crate::supervisor::Generating>; 2] = [None, None];
    let mut done: [Option<Generation>; 2] = [None, None];
    let mut turn = first.min(1);
    while done.iter().any(Option::is_none) {
        let side = turn;
        turn = 1 - turn;
        if done[side].is_some() {
            continue;
        }
        let contender = &mut sides[side];
        let generating = match &mut running[side] {
            Some(g) => g,
            slot => slot.insert(contender.worker.start(
                &planned.ids,
                new_tokens,
                label,
                setup.timeout(),
            )?),
        };
        // Alone once the other is done: no one left to share with.
        let until = done[1 - side]
            .is_none()
            .then(|| std::time::Instant::now() + slice);
        done[side] = contender.worker.advance(generating, until)?;
    }
    let [gen_a, gen_b] = done.map(|g| g.expect("the loop ends when both are done"));
    let vocab = setup.codec.vocab_size;
    let mut samples = [(gen_a, sides[0].name), (gen_b, sides[1].name)]
        .into_iter()
        .map(|(generation, name)| {
            let generated = checked(
                generation,
                name,
                planned.ids.len(),
                new_tokens,
                vocab,
                label,
            )?;
            sample_of(setup, planned, generated)
        });
    let sample_a = samples.next().expect("two sides")?;
    let sample_b = samples.next().expect("two sides")?;
    Ok((sample_a, sample_b))
}

/// A checked, timed generation for `planned`, decoded and put through the prompt's checks.
fn sample_of(setup: &Setup, planned: &Planned, generated: Generated) -> Result<Sample> {
    let codec = &setup.codec;
    let Generated {
        timing,
        tokens,
        peak_rss_kib,
        cpu_ms,
        paused_ms,
    } = generated;
    let eos_at = tokens.iter().position(|&t| t == codec.eos_id);
    let answer = &tokens[..eos_at.unwrap_or(tokens.len())];
    let text = codec.decode(answer)?;
    let checks = planned.spec.evaluate(&planned.instance, &text);
    let repetition = crate::quality::repeated_ngram_share(answer, crate::quality::REPETITION_N);
    Ok(Sample {
        prompt_ids: planned.ids.clone(),
        quality: None,
        prompt: planned.instance.prompt.clone(),
        round: planned.round.unwrap_or(u32::MAX),
        instance: planned.instance.clone(),
        timing,
        peak_rss_kib,
        cpu_ms,
        paused_ms,
        tokens,
        eos_at,
        text,
        repetition,
        checks,
    })
}

/// One line describing a finished request, for the log under the progress bar.
pub fn request_line(sample: &Sample, label: &str) -> String {
    format!(
        "{label}: {} prompt tokens, prefill {:.1} tok/s, decode {:.2} tok/s",
        sample.timing.prompt_tokens, sample.timing.prefill_tok_s, sample.timing.decode_tok_s
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_prompt_is_blamed_on_the_flag_or_the_screen() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../prompts");
        let load = || PromptSet::load(&dir).unwrap();
        let chosen = ["code".to_string(), "poem".to_string()];
        let flag = choose_prompts(load(), &chosen, false, &dir)
            .unwrap_err()
            .to_string();
        assert!(
            flag.starts_with("--prompt \"poem\": no such prompt"),
            "{flag}"
        );
        let screen = choose_prompts(load(), &chosen, true, &dir)
            .unwrap_err()
            .to_string();
        assert!(
            screen.contains("protocol.toml: [screen] prompts: \"poem\": no such prompt"),
            "{screen}"
        );
        // The committed screen's prompts all exist.
        let protocol = Protocol::load(&dir.join("protocol.toml")).unwrap();
        let set = choose_prompts(load(), &protocol.screen.prompts, true, &dir).unwrap();
        assert_eq!(set.prompts.len(), protocol.screen.prompts.len());
    }

    /// The requests of a comparison share no opening: each starts with its own nonce, the chat
    /// template after it, so not even the template's first tokens are alike everywhere.
    #[test]
    fn the_requests_of_a_plan_share_no_opening() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let overrides = Overrides {
            seed: Some(9),
            ..Overrides::default()
        };
        let setup = Setup::open(root, &overrides).unwrap();
        let plan = setup.plan(3, 15, Sharing::PerRun).unwrap();
        let all: Vec<&Planned> = plan.rounds.iter().chain(&plan.warmups).flatten().collect();
        assert_eq!(all.len(), 3 * 5 + 15);
        let template = setup.codec.encode("<|im_start|>").unwrap();
        let firsts: std::collections::HashSet<u32> = all.iter().map(|p| p.ids[0]).collect();
        assert!(firsts.len() >= 8, "first tokens {firsts:?}");
        assert!(
            !firsts.contains(&template[0]),
            "the template comes after the nonce"
        );
        // Nonces are drawn per request even where the parameters are shared: the long
        // prompt's report is the same in all three rounds, its opening never.
        let nonces: std::collections::HashSet<&str> =
            all.iter().map(|p| p.instance.nonce.as_str()).collect();
        assert_eq!(nonces.len(), all.len());
    }
}
