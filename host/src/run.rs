//! `host run`: score one variant on the real model.
//!
//! Order of work: read the protocol and prompts (cheap errors first), open the model and its
//! tokenizer, draw and tokenize every request, build the variant, then run one worker through
//! the warm-up and the timed rounds. Every outcome, a failure included, ends in a results row.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::cargo_build::VariantCrate;
use crate::judge::judge;
use crate::measure::Timing;
use crate::model::Model;
use crate::oracle::{Oracle, OracleBuild, OracleCost};
use crate::prompts::{PromptInstance, PromptSet, PromptSpec};
use crate::protocol::Protocol;
use crate::quality::GateReport;
use crate::record::{self, Provenance};
use crate::report::{Sample, Summary};
use crate::supervisor::Worker;
use crate::tokenize::TextCodec;
use crate::wire::{Reply, Request};

/// What `host run` was asked to do (see the CLI for each flag's meaning).
#[derive(Debug, Clone)]
pub struct RunArgs {
    pub variant: PathBuf,
    pub model: Option<PathBuf>,
    pub rounds: Option<u32>,
    pub max_new_tokens: Option<u32>,
    pub seed: Option<u64>,
    pub timeout_s: Option<f64>,
    pub no_build: bool,
    pub json: bool,
    pub description: String,
    pub verbose: bool,
    pub results: Option<PathBuf>,
    /// Only these prompts (all when empty): a partial run, recorded as such.
    pub prompts: Vec<String>,
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

/// Resolves the model: `--model`, else the default one (fetched when missing, hash-checked).
pub fn open_model(path: Option<&Path>) -> Result<Model> {
    match path {
        Some(p) => Ok(Model::open(p)?),
        None => {
            let p = crate::fetch::default_model()?;
            let model = Model::open(&p)?;
            let sha = model.sha256();
            if sha != crate::fetch::DEFAULT_MODEL_SHA256 {
                bail!(
                    "the cached default model {} has SHA-256 {sha}, not {}; delete it and run again to refetch",
                    p.display(),
                    crate::fetch::DEFAULT_MODEL_SHA256
                );
            }
            Ok(model)
        }
    }
}

/// One request to send: which prompt, which round, its text and ids.
struct Planned<'a> {
    spec: &'a PromptSpec,
    round: Option<u32>,
    instance: PromptInstance,
    ids: Vec<u32>,
}

/// Everything a run's JSON file holds.
#[derive(Serialize)]
struct RunRecord<'a> {
    schema: u32,
    provenance: &'a Provenance,
    protocol: &'a Protocol,
    status: &'a str,
    error: Option<String>,
    description: &'a str,
    load_ms: f64,
    roofline: &'a crate::physics::Roofline,
    /// The prompts run (all of prompts/ unless `--prompt` chose some).
    prompts: &'a [String],
    summary: Option<&'a Summary>,
    /// The quality gates, when measuring succeeded.
    gates: Option<&'a GateReport>,
    /// Which baseline scored the run, and what that cost.
    oracle: Option<OracleRecord>,
    samples: &'a [Sample],
}

/// The oracle's identity and cost, as recorded.
#[derive(Serialize)]
struct OracleRecord {
    commit: String,
    key: String,
    cost: Option<OracleCost>,
}

/// Runs `host run`; returns the summary on success.
pub fn run(args: &RunArgs) -> Result<Summary> {
    let cwd = std::env::current_dir()?;
    let root = find_root(&cwd).or_else(|_| find_root(&args.variant))?;
    let prompts_dir = root.join("prompts");
    let mut protocol = Protocol::load(&prompts_dir.join("protocol.toml"))?;
    if let Some(r) = args.rounds {
        protocol.rounds = r;
    }
    if let Some(n) = args.max_new_tokens {
        protocol.max_new_tokens = n;
    }
    if let Some(s) = args.seed {
        protocol.seed = s;
    }
    if let Some(t) = args.timeout_s {
        protocol.request_timeout_s = t;
    }
    protocol
        .check()
        .map_err(|m| anyhow::anyhow!("command-line override: {m}"))?;
    let prompts = PromptSet::load(&prompts_dir)?
        .select(&args.prompts)
        .map_err(anyhow::Error::msg)?;
    let variant = VariantCrate::open(&args.variant)?;

    let model = open_model(args.model.as_deref())?;
    let codec = TextCodec::from_model(model.view)
        .with_context(|| format!("model {}", model.path.display()))?;

    // Warm-ups draw from rounds counted down from u64::MAX, so they never repeat a timed one.
    let warmups = (0..protocol.warmup_requests as u64).map(|i| {
        (
            &prompts.prompts[i as usize % prompts.prompts.len()],
            None,
            u64::MAX - i,
        )
    });
    let timed = (0..protocol.rounds).flat_map(|r| {
        prompts
            .prompts
            .iter()
            .map(move |spec| (spec, Some(r), r as u64))
    });
    let plan = warmups
        .chain(timed)
        .map(|(spec, round, draw)| {
            let instance = spec.draw(protocol.seed, draw);
            let ids = codec.encode(&codec.render_chat(&instance.user_text)?)?;
            Ok(Planned {
                spec,
                round,
                instance,
                ids,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let lib = if args.no_build {
        variant.built_library()?
    } else {
        variant.build()?
    };
    // Built before measuring, so a build never runs beside a timed request.
    let oracle_build = OracleBuild::prepare(&root)?;

    let provenance = Provenance {
        time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        commit: crate::vcs::describe_commit(&root),
        variant_dir: args.variant.display().to_string(),
        variant_package: variant.package.clone(),
        variant_tree: crate::vcs::tree_hash(&args.variant),
        harness: crate::vcs::harness_hash(&root, &oracle_build.key),
        model_path: model.path.display().to_string(),
        model_sha256: model.sha256().to_string(),
        machine: record::machine(),
        device: "cpu".into(),
    };
    let stem = format!("{}-{}", provenance.time.replace(':', ""), variant.package);
    let results_dir = args.results.clone().unwrap_or_else(|| root.join("results"));
    let order: Vec<String> = prompts.prompts.iter().map(|p| p.name.clone()).collect();
    let mut samples = Vec::new();
    let mut load_ms = 0.0;

    let roofline = crate::physics::Roofline::new(model.view, crate::physics::measure_bandwidth());
    let outcome = measure(
        args,
        &protocol,
        &codec,
        &model,
        &lib,
        &plan,
        &mut samples,
        &mut load_ms,
    );
    let summary = outcome.is_ok().then(|| Summary::of(&samples, &order));
    let fastest = samples
        .iter()
        .map(|s| s.timing.decode_tok_s)
        .fold(0.0, f64::max);
    let suspect = roofline.is_suspect(fastest);
    let mut outcome = outcome;
    let mut gates = None;
    let mut oracle_cost = None;
    if outcome.is_ok() && !suspect {
        let mut oracle = Oracle::new(
            oracle_build.clone(),
            &model.path,
            model.sha256(),
            Duration::from_secs_f64(protocol.request_timeout_s),
            args.verbose,
        );
        let judged = judge(
            &mut oracle,
            &mut samples,
            &codec,
            &prompts,
            &protocol,
            &order,
        );
        oracle_cost = Some(oracle.finish());
        match judged {
            Ok(report) => gates = Some(report),
            Err(e) => outcome = Err(e.context("the quality oracle failed")),
        }
    }
    let rejected = gates.as_ref().is_some_and(|g| !g.passed());
    let (status, error) = match &outcome {
        Ok(()) if suspect => ("suspect", None),
        Ok(()) if rejected => ("rejected", None),
        Ok(()) => ("ok", None),
        Err(e) => ("failed", Some(format!("{e:#}"))),
    };
    let record = RunRecord {
        schema: 1,
        provenance: &provenance,
        protocol: &protocol,
        status,
        error,
        description: &args.description,
        load_ms,
        roofline: &roofline,
        prompts: &order,
        summary: summary.as_ref(),
        gates: gates.as_ref(),
        oracle: Some(OracleRecord {
            commit: oracle_build.commit.clone(),
            key: oracle_build.key.clone(),
            cost: oracle_cost.clone(),
        }),
        samples: &samples,
    };
    let json = record::write_json(&results_dir, &stem, &record)?;
    let row = record::row(
        &provenance,
        &protocol,
        &record::Scope {
            prompts: &order,
            all_prompts: args.prompts.is_empty(),
        },
        summary.as_ref(),
        gates.as_ref(),
        status,
        &args.description,
        &json,
    );
    let tsv = record::append_row(&results_dir, &row)?;
    outcome?;
    if suspect {
        bail!(
            "variant {} decoded at {fastest:.1} tok/s, above the {:.0} tok/s that memory bandwidth allows: \
             the run is recorded as suspect, not as a result",
            args.variant.display(),
            roofline.bound_tok_s
        );
    }
    let summary = summary.expect("a successful run has a summary");
    let gates = gates.expect("a successful run that is not suspect has been gated");
    if args.json {
        let both = serde_json::json!({ "summary": &summary, "gates": &gates });
        println!("{}", serde_json::to_string_pretty(&both)?);
    } else {
        println!("{}", summary.render());
        println!("{}", gates.render());
    }
    if let Some(cost) = &oracle_cost {
        eprintln!("{}", crate::judge::describe_cost(cost));
    }
    eprintln!(
        "decode roofline: {:.0} tok/s ({:.1} MB of weights per token at {:.1} GB/s); fastest request {fastest:.2} tok/s",
        roofline.bound_tok_s,
        roofline.bytes_per_token as f64 / 1e6,
        roofline.bandwidth_gb_s,
    );
    eprintln!(
        "recorded: {} (row appended), {}",
        tsv.display(),
        json.display()
    );
    if !gates.passed() {
        bail!(
            "variant {} failed {} quality gate(s); it is recorded as rejected:\n  {}",
            args.variant.display(),
            gates.failures.len(),
            gates
                .failures
                .iter()
                .map(|f| f.message.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
    Ok(summary)
}

/// A progress bar on stderr when it is a terminal (hidden otherwise), `prefix` before the bar.
pub fn progress_bar(len: usize, prefix: &str) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(len as u64)
    } else {
        ProgressBar::hidden()
    };
    let template =
        format!("{{spinner}} {prefix}[{{bar:30}}] {{pos}}/{{len}} {{msg}} ({{elapsed}})");
    bar.set_style(
        ProgressStyle::with_template(&template)
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

/// The measured part: one worker, the warm-up, then every timed request.
#[allow(clippy::too_many_arguments)]
fn measure(
    args: &RunArgs,
    protocol: &Protocol,
    codec: &TextCodec,
    model: &Model,
    lib: &Path,
    plan: &[Planned],
    samples: &mut Vec<Sample>,
    load_ms: &mut f64,
) -> Result<()> {
    let timeout = Duration::from_secs_f64(protocol.request_timeout_s);
    let name = args.variant.display().to_string();
    let mut worker = Worker::spawn(&name, lib, &model.path, timeout, args.verbose)?;
    *load_ms = worker.load_ms;

    let tty = std::io::stderr().is_terminal();
    let bar = progress_bar(plan.len(), "");
    for (i, planned) in plan.iter().enumerate() {
        let label = match planned.round {
            Some(r) => format!(
                "prompt {:?} round {}/{}",
                planned.instance.prompt,
                r + 1,
                protocol.rounds
            ),
            None => format!("warm-up request ({:?})", planned.instance.prompt),
        };
        bar.set_message(label.clone());
        let request = Request::Generate {
            prompt: planned.ids.clone(),
            max_new_tokens: protocol.max_new_tokens,
        };
        let reply = worker.request(&request, &label, timeout)?;
        let Reply::Generated {
            tokens,
            emit_ns,
            overflow,
            peak_rss_kib,
        } = reply
        else {
            bail!("variant {name}: the worker answered {label} with something other than tokens");
        };
        let timing = Timing::from_emits(
            planned.ids.len(),
            &tokens,
            &emit_ns,
            overflow,
            protocol.max_new_tokens as usize,
            codec.vocab_size,
        )
        .with_context(|| format!("variant {name} failed {label}"))?;
        let line = format!(
            "[{}/{}] {label}: {} prompt tokens, prefill {:.1} tok/s, decode {:.2} tok/s",
            i + 1,
            plan.len(),
            timing.prompt_tokens,
            timing.prefill_tok_s,
            timing.decode_tok_s
        );
        if tty {
            bar.println(line);
        } else {
            eprintln!("{line}");
        }
        bar.inc(1);
        let Some(round) = planned.round else { continue };
        let eos_at = tokens.iter().position(|&t| t == codec.eos_id);
        let text = codec.decode(&tokens[..eos_at.unwrap_or(tokens.len())])?;
        let checks = planned.spec.evaluate(&planned.instance, &text);
        let repetition = crate::quality::repeated_ngram_share(
            &tokens[..eos_at.unwrap_or(tokens.len())],
            crate::quality::REPETITION_N,
        );
        samples.push(Sample {
            prompt_ids: planned.ids.clone(),
            quality: None,
            prompt: planned.instance.prompt.clone(),
            round,
            instance: planned.instance.clone(),
            timing,
            peak_rss_kib,
            tokens,
            eos_at,
            text,
            repetition,
            checks,
        });
    }
    bar.finish_and_clear();
    Ok(())
}
