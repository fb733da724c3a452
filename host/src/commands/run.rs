//! `host run`: score one variant on the real model.
//!
//! Order of work: read the protocol and prompts (cheap errors first), open the model and its
//! tokenizer, draw and tokenize every request, build the variant, then run one worker through
//! the warm-up and the timed rounds. Every outcome, a failure included, ends in a results row.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::commands::finish::{self, quality_phase, Quality, RowFacts};
use crate::commands::setup::{find_root, request_line, timed_request, Overrides, Planned, Setup};
use crate::harness::prompts::Sharing;
use crate::harness::protocol::Protocol;
use crate::ledger::record::Provenance;
use crate::measure::sample::{Sample, Summary};
use crate::progress::{log_line, progress_bar};
use crate::quality::GateReport;
use crate::supervisor::cargo_build::VariantCrate;
use crate::supervisor::oracle::{OracleBuild, OracleCost};
use crate::supervisor::{Spawn, Worker};
use plugin_api::Device;

/// What `host run` was asked to do (see the CLI for each flag's meaning).
#[derive(Debug, Clone)]
pub struct RunArgs {
    pub variant: PathBuf,
    /// Protocol overrides; a `--prompt` selection makes a partial run, recorded as such.
    pub overrides: Overrides,
    pub no_build: bool,
    pub json: bool,
    pub description: String,
    pub verbose: bool,
    pub results: Option<PathBuf>,
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
    /// The memory-bandwidth bound (on the CPU; a GPU's is not measured: null).
    roofline: Option<&'a crate::measure::roofline::Roofline>,
    /// The decode rate above which a request made the run suspect (on the CPU; a GPU's is not
    /// checked): [`crate::measure::roofline::SUSPECT_SLACK`] times the bound.
    suspect_above_tok_s: Option<f64>,
    /// The prompts run (all of prompts/ unless `--prompt` chose some).
    prompts: &'a [String],
    summary: Option<&'a Summary>,
    /// The quality gates, when measuring succeeded.
    gates: Option<&'a GateReport>,
    /// Which baseline scored the run, and what that cost.
    oracle: Option<OracleRecord>,
    samples: &'a [Sample],
    /// The untimed warm-up requests (their instances are fresh too).
    warmups: &'a [Sample],
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
    // Cheap checks first: the variant's manifest, then protocol, prompts and model.
    let variant = VariantCrate::open(&args.variant)?;
    let setup = Setup::open(root.clone(), &args.overrides)?;
    let protocol = &setup.protocol;
    let model = &setup.model;
    // One worker answers every request: nothing may be shared between them.
    let drawn = setup.plan(protocol.rounds, 1, Sharing::PerRequest)?;
    let plan: Vec<&Planned> = drawn
        .warmups
        .iter()
        .chain(&drawn.rounds)
        .flatten()
        .collect();

    let synthetic = model.is_synthetic();
    let ungated = !model.is_gated();
    if synthetic {
        eprintln!("{}", crate::commands::setup::synthetic_banner(!ungated));
    }
    let oracle_device = protocol.gates.oracle_device().map_err(anyhow::Error::msg)?;
    let harness = crate::vcs::harness(&root, &OracleBuild::key_for(&root, oracle_device)?)?;
    if !harness.is_committed() {
        eprintln!("{}", crate::commands::setup::modified_banner(&harness));
    }
    // Built before measuring, so a build never runs beside a timed request; the oracle first,
    // since the variant's build starts from its compiled dependencies (and before either, a
    // bad build time limit is refused).
    let sandbox = crate::commands::setup::build_sandbox(&root)?;
    let oracle_build = OracleBuild::prepare(&root, oracle_device)?;
    let results_dir = args.results.clone().unwrap_or_else(|| root.join("results"));
    let (lib, build) = variant.library_for(args.no_build, setup.device, &sandbox)?;
    let sandbox_level = crate::sandbox::Support::probe().worker_level().and(build);
    if !sandbox_level.is_full() {
        eprintln!(
            "WARNING: variant code is not fully confined: {}",
            sandbox_level.label()
        );
    }

    let provenance = setup.provenance(
        args.variant.display().to_string(),
        &variant.package,
        crate::vcs::tree_hash(&args.variant),
        &harness,
        sandbox_level,
    );
    let stem = format!("{}-{}", provenance.time.replace(':', ""), variant.package);
    let protect = crate::commands::setup::protected_paths(Some(&root), Some(&results_dir));
    let order = setup.order();
    let mut measured = Measured::default();

    // Measured on the CPU only: a GPU may beat the CPU's bound honestly, so nothing would use it.
    let roofline = (setup.device == Device::Cpu)
        .then(|| crate::measure::roofline::Roofline::for_model(model.view));
    let outcome = measure(args, &setup, &lib, &plan, &protect, &mut measured);
    let Measured {
        mut samples,
        warmups,
        load_ms,
    } = measured;
    let summary = outcome.is_ok().then(|| Summary::of(&samples, &order));
    let fastest = samples
        .iter()
        .map(|s| s.timing.decode_tok_s)
        .fold(0.0, f64::max);
    // The bound is the CPU's: a GPU may beat it honestly.
    let suspect = roofline.as_ref().is_some_and(|r| r.is_suspect(fastest));
    let mut outcome = outcome;
    let Quality {
        gates,
        oracle: oracle_cost,
    } = quality_phase(
        &setup,
        &oracle_build,
        &protect,
        args.verbose,
        &mut samples,
        !suspect && !ungated,
        "the answers",
        &mut outcome,
    );
    let (status, error) = finish::status(&outcome, suspect, ungated, gates.as_ref());
    let record = RunRecord {
        schema: 1,
        provenance: &provenance,
        protocol,
        status: status.as_str(),
        error,
        description: &args.description,
        load_ms,
        roofline: roofline.as_ref(),
        suspect_above_tok_s: roofline.as_ref().map(|r| r.suspect_above()),
        prompts: &order,
        summary: summary.as_ref(),
        gates: gates.as_ref(),
        oracle: Some(OracleRecord {
            commit: oracle_build.commit.clone(),
            key: oracle_build.key.clone(),
            cost: oracle_cost.clone(),
        }),
        samples: &samples,
        warmups: &warmups,
    };
    let recorded = finish::record(
        &results_dir,
        &stem,
        &record,
        &setup,
        &RowFacts {
            provenance: &provenance,
            summary: summary.as_ref(),
            gates: gates.as_ref(),
            compared: None,
            status,
            description: &args.description,
        },
    )?;
    outcome?;
    if let Some(r) = roofline.as_ref().filter(|_| suspect) {
        bail!(
            "variant {} {}: the run is recorded as suspect, not as a result",
            args.variant.display(),
            r.excess(fastest)
        );
    }
    let summary = summary.expect("a successful run has a summary");
    if args.json {
        let both =
            serde_json::json!({ "summary": &summary, "gates": &gates, "synthetic": synthetic });
        println!("{}", serde_json::to_string_pretty(&both)?);
    } else {
        println!("{}", summary.render());
        match &gates {
            Some(gates) => println!("{}", gates.render()),
            None => {
                println!("quality gates: skipped (synthetic model: random weights from a seed)")
            }
        }
    }
    match &roofline {
        Some(r) => eprintln!(
            "decode roofline: {:.0} tok/s ({:.1} MB of weights per token at {:.1} GB/s; suspect above {:.0}); fastest request {fastest:.2} tok/s",
            r.bound_tok_s,
            r.bytes_per_token as f64 / 1e6,
            r.bandwidth_gb_s,
            r.suspect_above(),
        ),
        None => eprintln!(
            "decode roofline: not checked on {} (the host measures the CPU's memory bandwidth only); fastest request {fastest:.2} tok/s",
            setup.device
        ),
    }
    recorded.report(oracle_cost.as_ref());
    if !harness.is_committed() {
        eprintln!("{}", crate::commands::setup::modified_banner(&harness));
    }
    if synthetic {
        eprintln!("{}", crate::commands::setup::synthetic_banner(!ungated));
    }
    if ungated {
        return Ok(summary);
    }
    let gates = gates.expect("a successful run that is not suspect nor ungated has been gated");
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

/// What measuring produced, failed or not.
#[derive(Default)]
struct Measured {
    samples: Vec<Sample>,
    warmups: Vec<Sample>,
    load_ms: f64,
}

/// The measured part: one worker, the warm-up, then every timed request.
fn measure(
    args: &RunArgs,
    setup: &Setup,
    lib: &Path,
    plan: &[&Planned],
    protect: &[PathBuf],
    out: &mut Measured,
) -> Result<()> {
    let name = args.variant.display().to_string();
    let mut worker = Worker::spawn(&Spawn {
        variant: &name,
        lib,
        model: &setup.model.path,
        timeout: setup.timeout(),
        echo_log: args.verbose,
        load: setup.load_request(),
        protect,
    })?;
    out.load_ms = worker.load_ms;

    let bar = progress_bar(plan.len(), "");
    for (i, planned) in plan.iter().enumerate() {
        let label = planned.label(setup.protocol.rounds);
        bar.set_message(label.clone());
        let sample = timed_request(
            setup,
            &mut worker,
            &name,
            planned,
            &label,
            setup.protocol.max_new_tokens,
        )?;
        let line = format!(
            "[{}/{}] {}",
            i + 1,
            plan.len(),
            request_line(&sample, &label)
        );
        log_line(&bar, line);
        bar.inc(1);
        if planned.round.is_some() {
            out.samples.push(sample);
        } else {
            out.warmups.push(sample);
        }
    }
    bar.finish_and_clear();
    Ok(())
}
