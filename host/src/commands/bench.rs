//! `host bench VARIANT`: llama-bench-style synthetic workloads, so a variant can be set beside
//! llama.cpp and beside the machine's memory bandwidth.
//!
//! Each [`Test`] is either prompt processing (`ppN`: a prompt of N random tokens, timed to the
//! first token, t/s = N / time to first token; a few more tokens follow, untimed, for the
//! oracle to check) or text generation (`tgN`: [`TG_PROMPT_TOKENS`] random tokens in, N tokens
//! out, t/s = N / time to the N-th token). The host draws the tokens from a fresh seed unless
//! given one, the
//! variant must emit exactly the tokens asked for (end-of-sequence is ignored), and the host's
//! worker timestamps them as in `host run`. Every test gets one warm-up request, then
//! `repetitions` timed ones; [`TestResult`] holds their mean and standard deviation. The thread
//! count reaches the variant as the `threads` load option. [`BenchReport`] adds the roofline:
//! the bytes of weights a generated token reads, the decode rate the measured bandwidth allows,
//! and each tg test's share of it.
//!
//! The figures are gated as `host run`'s are: after the last timed request, the oracle scores
//! every timed request's tokens (teacher-forced) and each test must reach the protocol's
//! agreement (its tie margin included), or bench fails and reports nothing ([`check_answers`]).
//! A bench prompt is easy to tell from a comparison's, so a variant that skipped the work here
//! could otherwise post any speed beside llama.cpp's. Only a model of random weights from a
//! seed (`host synth --seed`) is not gated, as in `host run`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::commands::setup::generate_timed;
use crate::harness::protocol::{Gates, Protocol};
use crate::measure::roofline::{measure_bandwidth, Roofline};
use crate::measure::Timing;
use crate::quality::Agreement;
use crate::stats::rng::SplitMix64;
use crate::supervisor::cargo_build::VariantCrate;
use crate::supervisor::oracle::{Oracle, OracleBuild};
use crate::supervisor::{Spawn, Worker};
use crate::worker::wire::LoadRequest;
use plugin_api::{Device, ModelView};

/// What `host bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub variant: PathBuf,
    /// Prompt lengths of the pp tests (0 = none).
    pub prompts: Vec<usize>,
    /// Generated lengths of the tg tests (0 = none).
    pub gens: Vec<usize>,
    pub repetitions: usize,
    pub threads: usize,
    /// Where the variant computes (the `device` load option).
    pub device: Device,
    pub model: Option<PathBuf>,
    /// The prompts' seed; `None` draws a fresh one, so that no variant can know them ahead.
    pub seed: Option<u64>,
    pub timeout_s: u64,
    pub no_build: bool,
    pub format: Format,
    pub verbose: bool,
}

/// How the report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Markdown,
    Json,
    Csv,
}

/// Tokens a pp request asks for (its rate is timed to the first). Every one is checked against
/// the oracle: a variant that skipped part of the prompt's work (attending to its last few
/// hundred tokens only, say) might still choose the right first token, but each further token
/// it computes from the same wrong state is another chance to be caught, and costs one decode
/// step, untimed. They do not catch a variant that, once its first token is out and the clock
/// has stopped, prefills again properly before the rest: its first token must still be the
/// oracle's in every repetition, as `host run`'s agreement gate asks of any first token.
pub const PP_CHECKED_TOKENS: usize = 8;

/// Random tokens a tg request's prompt has. With one, there would be only as many tg prompts as
/// the vocabulary has tokens, and a variant could carry every one's answer in a table computed
/// ahead (49,152 x 128 tokens for SmolLM2) and replay it at any speed; with 8 there are too
/// many to tabulate. Their prefill stays inside the tg rate's time (about a decode step's
/// weight reads): timing from the first token instead would let a variant compute every token
/// before emitting the first and post any rate (the drift fixture's `buffer`).
pub const TG_PROMPT_TOKENS: usize = 8;

/// One workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Test {
    /// Prompt processing of this many tokens.
    Prompt(usize),
    /// Text generation of this many tokens.
    Generate(usize),
}

impl Test {
    /// llama-bench's name: `pp512`, `tg128`.
    pub fn name(self) -> String {
        match self {
            Test::Prompt(n) => format!("pp{n}"),
            Test::Generate(n) => format!("tg{n}"),
        }
    }

    /// (prompt tokens, tokens to generate) of one request. A pp request is timed to its first
    /// token only, but asks for [`PP_CHECKED_TOKENS`] so that the oracle has more than one
    /// token to check it by.
    fn shape(self) -> (usize, usize) {
        match self {
            Test::Prompt(n) => (n, PP_CHECKED_TOKENS),
            Test::Generate(n) => (TG_PROMPT_TOKENS, n),
        }
    }

    /// (n_prompt, n_gen) as llama-bench reports the test: the other count is 0.
    fn counts(self) -> (usize, usize) {
        match self {
            Test::Prompt(n) => (n, 0),
            Test::Generate(n) => (0, n),
        }
    }

    /// Tokens per second of one timed request: pp to the first token, tg to the last, both from
    /// the request.
    fn rate(self, timing: &Timing) -> f64 {
        match self {
            Test::Prompt(n) => n as f64 / (timing.ttft_ms / 1e3),
            Test::Generate(n) => n as f64 / (timing.total_ms / 1e3),
        }
    }
}

/// The tests of `-p` and `-n`, in llama-bench's order (pp first); zeros are skipped.
pub fn tests_of(prompts: &[usize], gens: &[usize]) -> Vec<Test> {
    let pp = prompts.iter().filter(|&&n| n > 0).map(|&n| Test::Prompt(n));
    let tg = gens.iter().filter(|&&n| n > 0).map(|&n| Test::Generate(n));
    pp.chain(tg).collect()
}

/// The measured rates of one test.
#[derive(Debug, Clone, Serialize)]
pub struct TestResult {
    pub test: String,
    pub n_prompt: usize,
    pub n_gen: usize,
    /// Tokens per second of each timed repetition.
    pub samples_tok_s: Vec<f64>,
    pub mean_tok_s: f64,
    /// Sample standard deviation (0 with one repetition).
    pub sd_tok_s: f64,
    /// For tg tests: the mean as a share of the roofline's bound.
    pub roofline_share: Option<f64>,
    /// Share of the timed repetitions' tokens that agreed with the oracle; `None` when the
    /// model is not gated (random weights from a seed).
    pub agreement: Option<f64>,
}

/// What the model is, in llama-bench's columns.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub path: String,
    /// `llama 135M Q4_1`.
    pub description: String,
    /// Bytes of tensor data.
    pub size_bytes: u64,
    pub params: u64,
}

/// Everything `host bench` reports.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub variant: String,
    pub model: ModelInfo,
    /// llama-bench's name for the device: CPU, CUDA, Metal.
    pub backend: &'static str,
    /// The device as `--device` names it.
    pub device: String,
    /// Whether the model is synthetic (random weights).
    pub synthetic: bool,
    /// Whether every timed request's tokens were checked against the oracle (all but a model
    /// of random weights from a seed).
    pub gated: bool,
    pub threads: usize,
    pub repetitions: usize,
    pub seed: u64,
    /// Whether the seed was drawn fresh for this bench (no `--seed`): only then could no
    /// variant have known the prompts, and their answers, ahead.
    pub fresh_prompts: bool,
    /// The CPU's decode bound; `None` on another device (the host measures the CPU's
    /// bandwidth only).
    pub roofline: Option<Roofline>,
    pub tests: Vec<TestResult>,
}

/// Runs `host bench` and prints the report in the asked format.
pub fn bench(args: &BenchArgs) -> Result<BenchReport> {
    let tests = tests_of(&args.prompts, &args.gens);
    if tests.is_empty() {
        bail!("nothing to measure: -p and -n are both 0; ask for at least one test");
    }
    if args.repetitions == 0 {
        bail!("-r/--repetitions must be at least 1");
    }
    if args.threads == 0 {
        bail!("-t/--threads must be at least 1");
    }
    let seed = args.seed.unwrap_or_else(crate::stats::rng::fresh_seed);
    let variant = VariantCrate::open(&args.variant)?;
    let model = crate::commands::setup::open_model(args.model.as_deref())?;
    let view = model.view;
    let vocab = vocabulary(view).with_context(|| format!("model {}", model.path.display()))?;
    if let Some(context) = view.meta_uint("llama.context_length") {
        for &test in &tests {
            let (prompt, gen) = test.shape();
            if (prompt + gen) as u64 > context {
                bail!(
                    "{} needs {} positions; the model's context is {context}",
                    test.name(),
                    prompt + gen
                );
            }
        }
    }
    let synthetic = model.is_synthetic();
    let gated = model.is_gated();
    if synthetic {
        eprintln!("{}", crate::commands::setup::synthetic_banner(gated));
    }
    let Ok(root) = crate::commands::setup::find_root(&std::env::current_dir()?)
        .or_else(|_| crate::commands::setup::find_root(&args.variant))
    else {
        bail!(
            "host bench builds a variant inside an autoinfer checkout (its build starts from the \
             committed baseline's) and checks its tokens with that checkout's oracle; run it \
             from the checkout"
        );
    };
    let sandbox = crate::commands::setup::build_sandbox(&root)?;
    // The committed baseline's build is what the variant's confined build starts from.
    let base = if args.no_build {
        None
    } else {
        Some(OracleBuild::prepare(&root, args.device)?)
    };
    let (lib, _) = variant.library_for(args.no_build, args.device, &sandbox)?;
    let protocol_path = root.join("prompts").join("protocol.toml");
    let gates = Protocol::load(&protocol_path)?.gates;
    let oracle_device = gates
        .oracle_device()
        .map_err(|e| anyhow::anyhow!("{}: {e}", protocol_path.display()))?;
    // Built before measuring, so a build never runs beside a timed request; the base build
    // serves when it is for the oracle's device.
    let oracle_build = match (gated, base) {
        (false, _) => None,
        (true, Some(base)) if base.device == oracle_device => Some(base),
        (true, _) => Some(OracleBuild::prepare(&root, oracle_device)?),
    };

    // Before the worker starts, so nothing else reads memory meanwhile.
    let roofline = (args.device == Device::Cpu).then(|| {
        eprintln!("measuring memory bandwidth ...");
        Roofline::new(view, measure_bandwidth())
    });
    let name = args.variant.display().to_string();
    let timeout = std::time::Duration::from_secs(args.timeout_s);
    let load = LoadRequest {
        threads: Some(args.threads),
        device: Some(args.device),
    };
    let protect = crate::commands::setup::protected_paths(Some(&root), None);
    let mut worker = Worker::spawn(&Spawn {
        variant: &name,
        lib: &lib,
        model: &model.path,
        timeout,
        echo_log: args.verbose,
        load,
        protect: &protect,
    })?;

    let bar = crate::progress::progress_bar(tests.len() * (args.repetitions + 1), "");
    let mut results = Vec::new();
    let mut answers = Vec::new();
    for (t, &test) in tests.iter().enumerate() {
        let mut rates = Vec::new();
        for rep in 0..=args.repetitions {
            let label = if rep == 0 {
                format!("{} warm-up", test.name())
            } else {
                format!("{} repetition {rep}/{}", test.name(), args.repetitions)
            };
            bar.set_message(label.clone());
            let (n_prompt, n_gen) = test.shape();
            let prompt = random_tokens(seed, t as u64, rep as u64, n_prompt, vocab);
            let generated = generate_timed(
                &mut worker,
                &name,
                &prompt,
                n_gen as u32,
                vocab,
                &label,
                timeout,
            )?;
            let rate = test.rate(&generated.timing);
            crate::progress::log_line(&bar, format!("{label}: {rate:.2} t/s"));
            bar.inc(1);
            if rep > 0 {
                rates.push(rate);
                answers.push(Answer {
                    test: t,
                    label,
                    prompt,
                    tokens: generated.tokens,
                });
            }
        }
        let (mean, sd) = mean_sd(&rates);
        let (n_prompt, n_gen) = test.counts();
        results.push(TestResult {
            test: test.name(),
            n_prompt,
            n_gen,
            samples_tok_s: rates,
            mean_tok_s: mean,
            sd_tok_s: sd,
            roofline_share: roofline
                .as_ref()
                .filter(|_| matches!(test, Test::Generate(_)))
                .map(|r| mean / r.bound_tok_s),
            agreement: None,
        });
    }
    bar.finish_and_clear();
    drop(worker);
    if let Some(build) = oracle_build {
        let mut oracle = Oracle::new(
            build,
            &model.path,
            model.sha256(),
            timeout,
            args.verbose,
            protect.clone(),
        );
        let checked = check_answers(&mut oracle, &answers, &tests, &gates, &name);
        eprintln!(
            "{}",
            crate::commands::judge::describe_cost(&oracle.finish())
        );
        for (result, agreement) in results.iter_mut().zip(checked?) {
            result.agreement = Some(agreement);
        }
    }
    let report = BenchReport {
        variant: name,
        model: model_info(view, &model.path),
        backend: match args.device {
            Device::Cpu => "CPU",
            Device::Cuda(_) => "CUDA",
            Device::Metal(_) => "Metal",
        },
        device: args.device.to_string(),
        synthetic,
        gated,
        threads: args.threads,
        repetitions: args.repetitions,
        seed,
        fresh_prompts: args.seed.is_none(),
        roofline,
        tests: results,
    };
    match args.format {
        Format::Markdown => println!("{}", markdown(&report)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Csv => print!("{}", csv(&report)),
    }
    Ok(report)
}

/// One timed request's answer, kept for the oracle.
struct Answer {
    /// Index of its test.
    test: usize,
    /// `tg128 repetition 2/5`.
    label: String,
    prompt: Vec<u32>,
    tokens: Vec<u32>,
}

/// Scores every timed answer with `oracle` (teacher-forced: the prompt, then the variant's
/// tokens) and returns each test's agreement, or an error naming the first test below the
/// protocol's `min_agreement`, the repetition and the token where it went astray. The same
/// count as `host run`'s agreement gate, tie margin included.
fn check_answers(
    oracle: &mut Oracle,
    answers: &[Answer],
    tests: &[Test],
    gates: &Gates,
    variant: &str,
) -> Result<Vec<f64>> {
    let bar = crate::progress::progress_bar(answers.len(), "oracle ");
    let mut agreed = vec![0usize; tests.len()];
    let mut total = vec![0usize; tests.len()];
    let mut first_miss: Vec<Option<String>> = vec![None; tests.len()];
    for answer in answers {
        let label = format!("{}'s tokens", answer.label);
        bar.set_message(format!("checking {label}"));
        let scores = oracle.scores(&answer.prompt, &answer.tokens, &label)?;
        let count = Agreement::count(&answer.tokens, &scores, gates.tie_margin);
        agreed[answer.test] += count.agreed;
        total[answer.test] += answer.tokens.len();
        if let (None, Some(d)) = (&first_miss[answer.test], count.first_disagreements.first()) {
            first_miss[answer.test] = Some(format!(
                "first in {}: token {} of {} is id {} where the oracle's choice is id {} ({:.3} \
                 nats more likely)",
                answer.label,
                d.index + 1,
                answer.tokens.len(),
                d.token,
                d.oracle_argmax,
                d.gap
            ));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut agreements = Vec::with_capacity(tests.len());
    for (t, test) in tests.iter().enumerate() {
        // Every timed request emitted the tokens it asked for (generate_timed checks), so a
        // test with none checked is a fault here, never a pass.
        let agreement = match total[t] {
            0 => bail!(
                "{}: no timed tokens to check against the oracle",
                test.name()
            ),
            n => agreed[t] as f64 / n as f64,
        };
        if agreement < gates.min_agreement {
            bail!(
                "variant {variant} failed the agreement gate in {}: {} of the {} tokens of its \
                 timed requests agree with the oracle ({agreement:.4}; the protocol asks at least {} with a tie \
                 margin of {} nats); {}. host bench checks its tokens as host run does, so it \
                 reports no figures for a variant whose answers are not the model's",
                test.name(),
                agreed[t],
                total[t],
                gates.min_agreement,
                gates.tie_margin,
                first_miss[t]
                    .as_deref()
                    .unwrap_or("no single token stands out")
            );
        }
        agreements.push(agreement);
    }
    Ok(agreements)
}

/// `n` token ids below `vocab`, the same for the same (seed, test, repetition).
pub fn random_tokens(seed: u64, test: u64, rep: u64, n: usize, vocab: u32) -> Vec<u32> {
    let mut rng = SplitMix64::new(seed ^ (test << 32) ^ rep.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    (0..n).map(|_| rng.below(vocab as u64) as u32).collect()
}

/// Mean and sample standard deviation.
fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let sd = if xs.len() > 1 {
        (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, sd)
}

/// The vocabulary size: the token embedding's second dimension.
fn vocabulary(view: &ModelView) -> Result<u32> {
    let embd = view
        .tensor("token_embd.weight")
        .context("the model has no token_embd.weight tensor")?;
    let n = embd
        .dims
        .get(1)
        .copied()
        .context("token_embd.weight is not a matrix")?;
    u32::try_from(n).context("the vocabulary does not fit 32 bits")
}

/// llama-bench's model columns.
fn model_info(view: &ModelView, path: &std::path::Path) -> ModelInfo {
    let params: u64 = view
        .tensors
        .iter()
        .map(|t| t.dims.iter().product::<u64>())
        .sum();
    let size_bytes = view.tensors.iter().map(|t| t.size).sum();
    let arch = view.meta_str("general.architecture").unwrap_or("?");
    let size = match params {
        p if p >= 1_000_000_000 => format!("{:.0}B", p as f64 / 1e9),
        p => format!("{:.0}M", p as f64 / 1e6),
    };
    let ftype = view
        .meta_uint("general.file_type")
        .map(file_type_name)
        .unwrap_or_else(|| "?".into());
    ModelInfo {
        path: path.display().to_string(),
        description: format!("{arch} {size} {ftype}"),
        size_bytes,
        params,
    }
}

/// GGUF's `general.file_type` as llama.cpp names it.
fn file_type_name(id: u64) -> String {
    match id {
        0 => "all F32".into(),
        1 => "F16".into(),
        2 => "Q4_0".into(),
        3 => "Q4_1".into(),
        7 => "Q8_0".into(),
        8 => "Q5_0".into(),
        9 => "Q5_1".into(),
        15 => "Q4_K - Medium".into(),
        17 => "Q5_K - Medium".into(),
        18 => "Q6_K".into(),
        32 => "BF16".into(),
        other => format!("file type {other}"),
    }
}

/// The report as llama-bench's markdown table, then the roofline.
pub fn markdown(r: &BenchReport) -> String {
    let mut out = String::from(
        "| model | size | params | backend | threads | test | t/s |\n\
         | --- | ---: | ---: | --- | ---: | ---: | ---: |\n",
    );
    for t in &r.tests {
        out.push_str(&format!(
            "| {} | {:.2} MiB | {:.2} M | {} | {} | {} | {:.2} ± {:.2} |\n",
            r.model.description,
            r.model.size_bytes as f64 / (1 << 20) as f64,
            r.model.params as f64 / 1e6,
            r.backend,
            r.threads,
            t.test,
            t.mean_tok_s,
            t.sd_tok_s
        ));
    }
    out.push_str(&gate_note(r));
    let Some(rl) = &r.roofline else {
        out.push_str(&format!(
            "\nroofline: not measured on {} (the host measures the CPU's memory bandwidth only)",
            r.device
        ));
        return out;
    };
    out.push_str(&format!(
        "\nroofline: a generated token reads {:.2} MiB of weights; the measured read bandwidth \
         ({:.1} GB/s, every core) allows {:.1} t/s",
        rl.bytes_per_token as f64 / (1 << 20) as f64,
        rl.bandwidth_gb_s,
        rl.bound_tok_s
    ));
    for t in &r.tests {
        if let Some(share) = t.roofline_share {
            out.push_str(&format!("; {} reaches {:.1}% of it", t.test, share * 100.0));
        }
    }
    out
}

/// What the figures' tokens were checked against: a line under the table.
fn gate_note(r: &BenchReport) -> String {
    if !r.gated {
        return "\nnot gated: SYNTHETIC MODEL of random weights from a seed; the figures \
                measure speed only\n"
            .into();
    }
    let agreements: Vec<String> = r
        .tests
        .iter()
        .filter_map(|t| Some(format!("{} {:.4}", t.test, t.agreement?)))
        .collect();
    let what = match r.synthetic {
        true => "SYNTHETIC MODEL of secret random weights: its text is noise, but ",
        false => "",
    };
    let prompts = match r.fresh_prompts {
        true => format!("; prompts from a fresh seed, {}", r.seed),
        false => format!(
            ", but the prompts came from --seed {}: predictable, so a variant could have had \
             their answers ready; leave --seed out for figures to set beside another engine's",
            r.seed
        ),
    };
    format!(
        "\ngated: {what}every timed request's tokens were checked against the oracle \
         (agreement: {}){prompts}\n",
        agreements.join(", ")
    )
}

/// The report as CSV, one row per test.
pub fn csv(r: &BenchReport) -> String {
    let mut out = String::from(
        "model,size_bytes,params,backend,threads,test,n_prompt,n_gen,avg_ts,stddev_ts,\
         bytes_per_token,bandwidth_gb_s,bound_ts,roofline_share\n",
    );
    let rl = r.roofline.as_ref();
    for t in &r.tests {
        out.push_str(&format!(
            "\"{}\",{},{},{},{},{},{},{},{:.4},{:.4},{},{},{},{}\n",
            r.model.description,
            r.model.size_bytes,
            r.model.params,
            r.backend,
            r.threads,
            t.test,
            t.n_prompt,
            t.n_gen,
            t.mean_tok_s,
            t.sd_tok_s,
            rl.map(|r| r.bytes_per_token.to_string())
                .unwrap_or_default(),
            rl.map(|r| format!("{:.3}", r.bandwidth_gb_s))
                .unwrap_or_default(),
            rl.map(|r| format!("{:.3}", r.bound_tok_s))
                .unwrap_or_default(),
            t.roofline_share
                .map(|s| format!("{s:.5}"))
                .unwrap_or_default()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tests_follow_llama_bench_names_and_order() {
        let t = tests_of(&[128, 0, 512], &[128]);
        let names: Vec<String> = t.iter().map(|t| t.name()).collect();
        assert_eq!(names, ["pp128", "pp512", "tg128"]);
        assert!(tests_of(&[0], &[0]).is_empty());
        assert_eq!(Test::Prompt(512).shape(), (512, PP_CHECKED_TOKENS));
        assert_eq!(Test::Generate(128).shape(), (TG_PROMPT_TOKENS, 128));
    }

    #[test]
    fn rates_are_timed_from_the_request_to_the_first_token_for_pp_and_the_last_for_tg() {
        // pp512: the first of its 8 tokens 2 s after the request.
        let emits: Vec<u64> = (0..8).map(|i| 2_000_000_000 + i * 10_000_000).collect();
        let pp = Timing::from_arrivals(512, &[1; 8], &emits, 0, 8, 10).unwrap();
        assert!((Test::Prompt(512).rate(&pp) - 256.0).abs() < 1e-9);
        // tg128 whose tokens were all held back to 1.27 s and then sent 10 us apart: 100 t/s
        // counted from the request, where the gaps after the first would read 100,000.
        let emits: Vec<u64> = (0..128).map(|i| 1_270_000_000 + i * 10_000).collect();
        let tg = Timing::from_arrivals(TG_PROMPT_TOKENS, &[1; 128], &emits, 0, 128, 10).unwrap();
        assert!((Test::Generate(128).rate(&tg) - 128.0 / 1.27127).abs() < 1e-6);
        assert!(tg.decode_tok_s > 10_000.0);
    }

    #[test]
    fn random_prompts_are_seeded_and_in_the_vocabulary() {
        let a = random_tokens(1, 0, 1, 512, 49152);
        assert_eq!(a, random_tokens(1, 0, 1, 512, 49152));
        assert_ne!(
            a,
            random_tokens(1, 0, 2, 512, 49152),
            "each repetition draws anew"
        );
        assert_ne!(
            a,
            random_tokens(1, 1, 1, 512, 49152),
            "each test draws anew"
        );
        assert!(a.iter().all(|&t| t < 49152));
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 400, "{}", distinct.len());
    }

    #[test]
    fn mean_and_sd() {
        let (m, s) = mean_sd(&[10.0, 12.0, 14.0]);
        assert!((m - 12.0).abs() < 1e-12 && (s - 2.0).abs() < 1e-12);
        assert_eq!(mean_sd(&[5.0]), (5.0, 0.0));
    }

    fn report() -> BenchReport {
        BenchReport {
            variant: "v".into(),
            model: ModelInfo {
                path: "m.gguf".into(),
                description: "llama 135M Q4_1".into(),
                size_bytes: 85 << 20,
                params: 134_515_008,
            },
            backend: "CPU",
            device: "cpu".into(),
            synthetic: false,
            gated: true,
            threads: 2,
            repetitions: 3,
            seed: 1,
            fresh_prompts: true,
            roofline: Some(Roofline {
                bytes_per_token: 85 << 20,
                bandwidth_gb_s: 8.9,
                bound_tok_s: 100.0,
            }),
            tests: vec![
                TestResult {
                    test: "pp512".into(),
                    n_prompt: 512,
                    n_gen: 0,
                    samples_tok_s: vec![100.0, 110.0, 120.0],
                    mean_tok_s: 110.0,
                    sd_tok_s: 10.0,
                    roofline_share: None,
                    agreement: Some(1.0),
                },
                TestResult {
                    test: "tg128".into(),
                    n_prompt: 0,
                    n_gen: 128,
                    samples_tok_s: vec![25.0],
                    mean_tok_s: 25.0,
                    sd_tok_s: 0.0,
                    roofline_share: Some(0.25),
                    agreement: Some(0.9995),
                },
            ],
        }
    }

    #[test]
    fn markdown_has_llama_bench_columns_and_the_roofline() {
        let md = markdown(&report());
        assert!(
            md.starts_with("| model | size | params | backend | threads | test | t/s |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| llama 135M Q4_1 | 85.00 MiB | 134.52 M | CPU | 2 | pp512 | 110.00 ± 10.00 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("allows 100.0 t/s; tg128 reaches 25.0% of it"),
            "{md}"
        );
        assert!(
            md.contains(
                "gated: every timed request's tokens were checked against the oracle \
                 (agreement: pp512 1.0000, tg128 0.9995); prompts from a fresh seed, 1"
            ),
            "{md}"
        );
        // Prompts from a given seed could have been known ahead, and the table says so.
        let mut given = report();
        given.fresh_prompts = false;
        let md = markdown(&given);
        assert!(
            md.contains("but the prompts came from --seed 1: predictable"),
            "{md}"
        );
    }

    #[test]
    fn csv_has_one_row_per_test() {
        let text = csv(&report());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let header: Vec<&str> = lines[0].split(',').collect();
        let row: Vec<&str> = lines[2].split(',').collect();
        assert_eq!(header.len(), row.len(), "{text}");
        assert_eq!(row[5], "tg128");
        assert_eq!(row[13], "0.25000");
    }

    #[test]
    fn a_gpu_report_has_no_cpu_roofline_and_a_synthetic_one_says_so() {
        let mut r = report();
        r.backend = "CUDA";
        r.device = "cuda:0".into();
        r.synthetic = true;
        r.roofline = None;
        for t in &mut r.tests {
            t.roofline_share = None;
        }
        let md = markdown(&r);
        assert!(md.contains("| CUDA | 2 | tg128 |"), "{md}");
        assert!(md.contains("roofline: not measured on cuda:0"), "{md}");
        assert!(
            md.contains("gated: SYNTHETIC MODEL of secret random weights"),
            "{md}"
        );
        // Random weights from a seed are not gated, and the table says so.
        r.gated = false;
        for t in &mut r.tests {
            t.agreement = None;
        }
        let md = markdown(&r);
        assert!(
            md.contains("not gated: SYNTHETIC MODEL of random weights from a seed"),
            "{md}"
        );
        assert!(!md.contains("\ngated:"), "{md}");
        let text = csv(&r);
        let row: Vec<&str> = text.lines().nth(2).unwrap().split(',').collect();
        assert_eq!(row[3], "CUDA");
        assert!(row[10..].iter().all(|f| f.is_empty()), "{text}");
    }
}
