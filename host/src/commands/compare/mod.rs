//! `host compare A B`: a paired, interleaved head-to-head that says KEEP, REVERT or NOISE only
//! after a statistical test.
//!
//! Order of work: resolve and build both variants ([`Side`]: a directory, or `REV:PATH` built
//! from git by [`crate::supervisor::revision`]) and the quality oracle. Then every round draws
//! one instance per prompt, and each instance is a [`Pair`]: two fresh workers, one per
//! variant, each warmed up by a short request, answer it, one pair of every two A first and the
//! other B first, which one drawn at random ([`figures::PairOrders`]), so that drift in the
//! machine hits both alike and no worker can work out its side from its pair's place: on the
//! CPU at once, taking turns; on a GPU one after the other, never two alive at once ([`pair`]).
//! After every `rounds_per_look` rounds the paired log-ratios of each [`Figure`] are tested
//! ([`crate::stats::significance`]), one per pair; measuring stops as soon as the keep rule's outcome would in all likelihood not
//! change ([`measuring_done`]: anything SLOWER, or decode decided and every guarded figure
//! shown not SLOWER beyond the noise threshold or unlikely to end SLOWER), or when the
//! schedule or the time budget ends. B's answers then go through the quality gates, and
//! [`keep_rule::decide`] applies the keep rule. `--screen` runs the same on the protocol's
//! `[screen]` subset and is never kept.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

pub mod figures;
pub mod keep_rule;
mod pair;

use crate::commands::finish::{self, quality_phase, Quality, RowFacts};
use crate::commands::setup::{find_root, request_line, timed_request, Overrides, Plan, Setup};
use crate::harness::prompts::Sharing;
use crate::harness::protocol::{CompareRules, Protocol};
use crate::ledger::record::{self, Provenance};
use crate::measure::sample::{Sample, Summary};
use crate::quality::GateReport;
use crate::stats::significance::{LookSchedule, Verdict};
use crate::supervisor::build_place::BuildSandbox;
use crate::supervisor::cargo_build::VariantCrate;
use crate::supervisor::oracle::{OracleBuild, OracleCost};
use crate::supervisor::revision::{Committed, VariantArg};
use crate::supervisor::{Spawn, Worker};
use figures::{
    by_prompt, look, look_line, measuring_done, render, render_by_prompt, Figure, FigureCall,
    FigureResult, Horizon, Pair, PairOrders, TESTS,
};
pub use keep_rule::Outcome;
use pair::{PairCtx, WorkerLife};
use plugin_api::Device;

/// What `host compare` was asked to do (see the CLI for each flag's meaning).
#[derive(Debug, Clone, Default)]
pub struct CompareArgs {
    /// A and B as given; both absent means `HEAD:variants/current` against the working tree.
    pub a: Option<String>,
    pub b: Option<String>,
    pub overrides: Overrides,
    pub looks: Option<u32>,
    pub rounds_per_look: Option<u32>,
    pub max_seconds: Option<f64>,
    pub noise_threshold: Option<f64>,
    pub turn_ms: Option<u32>,
    /// `--screen`: the protocol's `[screen]` prompts, tokens and looks; never kept.
    pub screen: bool,
    pub no_build: bool,
    pub json: bool,
    pub description: String,
    pub verbose: bool,
    pub results: Option<PathBuf>,
}

/// One side of the comparison, resolved and built.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// As the user gave it.
    pub arg: String,
    pub package: String,
    /// Content hash of the variant's files.
    pub tree: String,
    /// The commit it was taken from, for a revision.
    pub commit: Option<String>,
    /// How its build was confined.
    pub build: crate::sandbox::Level,
    #[serde(skip)]
    pub lib: PathBuf,
}

/// A side as given, checked, before its build.
enum Planned {
    Dir(PathBuf, VariantCrate),
    Revision(Committed),
}

impl Planned {
    /// Reads `arg` (a directory or `REV:PATH`) and checks it names a variant crate.
    fn new(root: &Path, arg: &str) -> Result<Planned> {
        Ok(match VariantArg::parse(arg) {
            VariantArg::Dir(dir) => {
                let variant = VariantCrate::open(&dir).map_err(|e| {
                    anyhow::anyhow!("{e} (a variant is a directory or a revision REV:PATH, e.g. HEAD:variants/current)")
                })?;
                Planned::Dir(dir, variant)
            }
            VariantArg::Revision { rev, path } => Planned::Revision(
                Committed::find(root, &rev, &path).with_context(|| format!("variant {arg}"))?,
            ),
        })
    }

    /// Builds it (or, with `no_build`, finds its earlier build).
    fn build(
        self,
        arg: &str,
        no_build: bool,
        device: Device,
        sandbox: &BuildSandbox,
    ) -> Result<Side> {
        match self {
            Planned::Dir(dir, variant) => {
                let (lib, build) = variant.library_for(no_build, device, sandbox)?;
                Ok(Side {
                    arg: arg.to_string(),
                    package: variant.package,
                    tree: crate::vcs::tree_hash(&dir),
                    commit: None,
                    build,
                    lib,
                })
            }
            Planned::Revision(committed) => {
                let lib = if no_build {
                    committed.cached(device)?
                } else {
                    eprintln!("building {arg} (commit {})", &committed.commit[..12]);
                    committed.build(device, Some(sandbox))?
                };
                Ok(Side {
                    arg: arg.to_string(),
                    package: committed.package,
                    tree: committed.tree,
                    commit: Some(committed.commit),
                    build: crate::sandbox::Support::probe().build_level(),
                    lib,
                })
            }
        }
    }
}

/// Both sides, checked first and then built in an order drawn at random: together with
/// building both the same way in one place ([`crate::supervisor::build_place`]), nothing a
/// build can see (its paths, whether it came first, its age) tells the reference from the
/// candidate.
fn build_sides(
    root: &Path,
    (a_arg, b_arg): (&str, &str),
    no_build: bool,
    device: Device,
    sandbox: &BuildSandbox,
) -> Result<(Side, Side)> {
    let a = Planned::new(root, a_arg).with_context(|| format!("variant A ({a_arg})"))?;
    let b = Planned::new(root, b_arg).with_context(|| format!("variant B ({b_arg})"))?;
    let build_a = |a: Planned| {
        a.build(a_arg, no_build, device, sandbox)
            .with_context(|| format!("variant A ({a_arg})"))
    };
    let build_b = |b: Planned| {
        b.build(b_arg, no_build, device, sandbox)
            .with_context(|| format!("variant B ({b_arg})"))
    };
    let a_first = crate::stats::rng::fresh_seed() & 1 == 0;
    if !no_build {
        eprintln!(
            "building both sides in the one build place, in an order drawn at random: {}",
            if a_first { "A, then B" } else { "B, then A" }
        );
    }
    Ok(if a_first {
        let a = build_a(a)?;
        (a, build_b(b)?)
    } else {
        let b = build_b(b)?;
        (build_a(a)?, b)
    })
}

/// `host stage`: builds the revisions `a_arg` and `b_arg` for `device` as a comparison builds
/// its two sides ([`build_sides`]) and copies both libraries into `out` under the names
/// `--no-build` finds them by ([`Committed::cached`]), for a machine with no cargo.
pub fn stage(a_arg: &str, b_arg: &str, device: Device, out: &Path) -> Result<()> {
    let root = find_root(&std::env::current_dir()?)?;
    for (side, arg) in [("A", a_arg), ("B", b_arg)] {
        if !matches!(VariantArg::parse(arg), VariantArg::Revision { .. }) {
            bail!(
                "host stage: variant {side} ({arg}) is not a revision: stage two revisions \
                 (REV:PATH), e.g. HEAD:variants/current and a commit of the working tree"
            );
        }
    }
    // The oracle's build, for the device the protocol gives it, is what the variants' builds
    // start from, as in a comparison.
    let protocol = Protocol::load(&root.join("prompts/protocol.toml"))?;
    let sandbox = crate::commands::setup::build_sandbox(&root)?;
    OracleBuild::prepare(
        &root,
        protocol.gates.oracle_device().map_err(anyhow::Error::msg)?,
    )?;
    let (a, b) = build_sides(&root, (a_arg, b_arg), false, device, &sandbox)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot make {}", out.display()))?;
    for side in [&a, &b] {
        let name = side
            .lib
            .file_name()
            .context("a built library has a file name")?;
        let to = out.join(name);
        std::fs::copy(&side.lib, &to)
            .with_context(|| format!("cannot copy {} to {}", side.lib.display(), to.display()))?;
        eprintln!("staged {} as {}", side.arg, to.display());
    }
    if a.lib.file_name() == b.lib.file_name() {
        eprintln!(
            "A and B have one build key (the same variant, plugin-api, manifest and lock file): \
             one library serves both"
        );
    }
    Ok(())
}

/// Everything a comparison's JSON file holds.
#[derive(Serialize)]
struct CompareRecord<'a> {
    schema: u32,
    kind: &'static str,
    /// B's provenance (the row is B's); A is `against`.
    provenance: &'a Provenance,
    against: &'a Side,
    candidate: &'a Side,
    protocol: &'a Protocol,
    schedule: &'a LookSchedule,
    status: &'a str,
    error: Option<String>,
    outcome: Option<Outcome>,
    reasons: &'a [String],
    description: &'a str,
    rounds: u32,
    seconds: f64,
    figures: &'a [FigureResult],
    /// Every look's figures, in order: how the decision came about.
    looks: &'a [Vec<FigureResult>],
    gates: Option<&'a GateReport>,
    /// The rounds whose answers of B the oracle scored.
    scored_rounds: &'a [u32],
    /// B's untimed answers to the rounds after the last measured one, for the gates alone (a
    /// comparison that could be kept but ended before `gates.scored_rounds` rounds), with
    /// their quality.
    untimed_answers: &'a [Sample],
    oracle: Option<OracleCost>,
    pairs: &'a [Pair],
    /// The untimed warm-ups of each pair's workers (their instances are fresh too).
    warmups: &'a [Pair],
    /// When each pair's two workers lived: on a GPU (or with `turn_ms` 0) one after the other.
    workers: &'a [WorkerLife],
}

/// The two variants of a comparison and what their workers must not reach.
struct Sides<'a> {
    a: &'a Side,
    b: &'a Side,
    protect: &'a [PathBuf],
}

/// What measuring produced, failed or not.
#[derive(Default)]
struct Measured {
    pairs: Vec<Pair>,
    /// The warm-up requests (not counted), each pair's, kept for the record.
    warmups: Vec<Pair>,
    workers: Vec<WorkerLife>,
    looks: Vec<Vec<FigureResult>>,
    rounds: u32,
    seconds: f64,
}

/// Everything a comparison is set up from, before its first timed request: the protocol, both
/// variants built, the oracle built, and where the result goes.
struct Prepared {
    setup: Setup,
    rules: CompareRules,
    schedule: LookSchedule,
    a_arg: String,
    b_arg: String,
    a: Side,
    b: Side,
    oracle_build: OracleBuild,
    provenance: Provenance,
    results_dir: PathBuf,
    stem: String,
    protect: Vec<PathBuf>,
    /// On a synthetic model written from a seed: nothing gated, never kept.
    ungated: bool,
}

/// Checks the arguments and the harness, opens the protocol, prompts and model, and builds the
/// oracle and both variants (every build before any timed request).
fn prepare(args: &CompareArgs) -> Result<Prepared> {
    let root = find_root(&std::env::current_dir()?)?;
    if args.overrides.rounds.is_some() {
        bail!("host compare takes no --rounds: it adds rounds until it can decide; bound it with --looks, --rounds-per-look or --max-seconds");
    }
    let (a_arg, b_arg) = match (&args.a, &args.b) {
        (Some(a), Some(b)) => (a.clone(), b.clone()),
        (None, None) => (
            format!("HEAD:{}", crate::harness::CURRENT),
            crate::harness::CURRENT.to_string(),
        ),
        _ => bail!("host compare takes two variants (A B) or none (HEAD:variants/current against the working tree)"),
    };
    let mut setup = Setup::open(root.clone(), &screen_overrides(args)?)?;
    if args.screen {
        let screen = &setup.protocol.screen;
        eprintln!(
            "screen: prompts {}, {} tokens, at most {} looks of {} round(s); its verdict is \
             recorded as SCREEN-... and is never kept",
            screen.prompts.join(", "),
            screen.max_new_tokens,
            screen.looks,
            screen.rounds_per_look
        );
    }
    apply_rules(&mut setup.protocol.compare, args, setup.device)?;
    if setup.protocol.compare.turn_ms == 0 {
        let why = match setup.device {
            Device::Cpu => "--turn-ms 0",
            _ => "on a GPU, where a stopped worker's queued kernels would run on",
        };
        eprintln!("pairs: one worker at a time, each ended before the other side's starts ({why})");
    }
    if args.screen {
        // A screen's few looks are its whole budget, and its stated error rates were simulated
        // without futility stopping.
        setup.protocol.compare.futility_chance = 0.0;
    }
    let oracle_device = setup
        .protocol
        .gates
        .oracle_device()
        .map_err(anyhow::Error::msg)?;
    // Only the committed harness measures a comparison (its verdict may be kept).
    let harness = crate::vcs::harness(&root, &OracleBuild::key_for(&root, oracle_device)?)?;
    if !harness.is_committed() {
        bail!("host compare refuses to measure: {}", harness.describe());
    }
    let rules = setup.protocol.compare.clone();
    let schedule = LookSchedule::new(
        rules.alpha,
        rules.looks,
        rules.rounds_per_look,
        rules.spending_gamma,
        &TESTS,
    );

    // Builds before any timed request.
    let ungated = !setup.model.is_gated();
    if setup.model.is_synthetic() {
        eprintln!("{}", crate::commands::setup::synthetic_banner(!ungated));
    }
    // The oracle first: the variants' builds start from its compiled dependencies.
    let sandbox = crate::commands::setup::build_sandbox(&root)?;
    let oracle_build = OracleBuild::prepare(&root, oracle_device)?;
    let results_dir = args.results.clone().unwrap_or_else(|| root.join("results"));
    let (a, b) = build_sides(
        &root,
        (&a_arg, &b_arg),
        args.no_build,
        setup.device,
        &sandbox,
    )?;
    if a.tree == b.tree {
        eprintln!(
            "A and B hold the same files (tree {}): an A/A comparison",
            &a.tree[..12]
        );
    }

    // Both sides' builds and their workers: the comparison is only as confined as the least.
    let sandbox_level = crate::sandbox::Support::probe()
        .worker_level()
        .and(a.build.clone())
        .and(b.build.clone());
    if !sandbox_level.is_full() {
        eprintln!(
            "WARNING: variant code is not fully confined: {}",
            sandbox_level.label()
        );
    }
    let provenance = setup.provenance(
        b_arg.clone(),
        &b.package,
        b.tree.clone(),
        &harness,
        sandbox_level,
    );
    let stem = format!("{}-compare-{}", provenance.time.replace(':', ""), b.package);
    let protect = crate::commands::setup::protected_paths(Some(&root), Some(&results_dir));

    Ok(Prepared {
        setup,
        rules,
        schedule,
        a_arg,
        b_arg,
        a,
        b,
        oracle_build,
        provenance,
        results_dir,
        stem,
        protect,
        ungated,
    })
}

/// Runs `host compare`; returns the outcome (the caller turns it into the exit status).
pub fn compare(args: &CompareArgs) -> Result<Outcome> {
    let p = prepare(args)?;
    let order = p.setup.order();
    let mut measured = Measured::default();
    let sides = Sides {
        a: &p.a,
        b: &p.b,
        protect: &p.protect,
    };
    // Every instance of the longest comparison, drawn now: none repeats, the warm-ups of each
    // pair's new workers included. Each timed request goes to a fresh worker: they may share a
    // document (the oracle then computes it once).
    let max_rounds = p.schedule.max_rounds();
    let prompts = p.setup.prompts.prompts.len() as u32;
    let plan = p
        .setup
        .plan(max_rounds, max_rounds * prompts, Sharing::PerRun)?;
    let mut outcome = measure(args, &p, &plan, &sides, &mut measured);
    let figures = measured.looks.last().cloned().unwrap_or_default();

    let suspect = check_roofline(&p, &measured.pairs, &mut outcome);

    let b_samples: Vec<Sample> = measured.pairs.iter().map(|pair| pair.b.clone()).collect();
    let may_keep = outcome.is_ok() && suspect.is_none() && !p.ungated && keepable(&figures);
    // A comparison that may be kept has every timed answer of B scored: one left unscored could
    // be a faked one whose speed counted in the verdict. Any other has `scored_rounds` rounds
    // scored, picked at random now (after measuring, by the supervisor, so a variant cannot know
    // which of its answers count): the gates are then a record, at a cost that does not grow.
    let scored_rounds = scored_rounds_of(
        measured.rounds,
        may_keep,
        p.setup.protocol.gates.scored_rounds,
        crate::stats::rng::fresh_seed(),
    );
    let mut judged_samples: Vec<Sample> = b_samples
        .iter()
        .filter(|s| scored_rounds.contains(&s.round))
        .cloned()
        .collect();
    // A comparison that may be kept but ended before the gates' rounds were measured: B answers
    // the missing rounds untimed, so a keep is always judged on at least as much text as the
    // gates were calibrated for.
    if may_keep {
        match untimed_answers(args, &p, &plan, measured.rounds) {
            Ok(answers) => judged_samples.extend(answers),
            Err(e) => outcome = Err(e),
        }
    }
    let Quality {
        gates,
        oracle: oracle_cost,
    } = quality_phase(
        &p.setup,
        &p.oracle_build,
        &p.protect,
        args.verbose,
        &mut judged_samples,
        suspect.is_none() && !p.ungated,
        "B's answers",
        &mut outcome,
    );
    let mut untimed = Vec::new();
    for judged in judged_samples {
        match measured
            .pairs
            .iter_mut()
            .find(|pair| pair.round == judged.round && pair.prompt == judged.prompt)
        {
            Some(pair) => pair.b.quality = judged.quality.clone(),
            None => untimed.push(judged),
        }
    }
    let decided = outcome
        .as_ref()
        .ok()
        .map(|()| outcome_of(&figures, gates.as_ref(), suspect.as_deref(), p.ungated));
    let (status, error) = finish::status(&outcome, suspect.is_some(), p.ungated, gates.as_ref());
    let reasons = decided.as_ref().map(|d| d.1.clone()).unwrap_or_default();
    let verdict = decided.as_ref().map(|d| d.0);
    let record = CompareRecord {
        schema: 1,
        kind: "compare",
        provenance: &p.provenance,
        against: &p.a,
        candidate: &p.b,
        protocol: &p.setup.protocol,
        schedule: &p.schedule,
        status: status.as_str(),
        error,
        outcome: verdict,
        reasons: &reasons,
        description: &args.description,
        rounds: measured.rounds,
        seconds: measured.seconds,
        figures: &figures,
        looks: &measured.looks,
        gates: gates.as_ref(),
        scored_rounds: &scored_rounds,
        untimed_answers: &untimed,
        oracle: oracle_cost.clone(),
        pairs: &measured.pairs,
        warmups: &measured.warmups,
        workers: &measured.workers,
    };
    let summary = (!b_samples.is_empty()).then(|| Summary::of(&b_samples, &order));
    let decode = figures.iter().find(|f| f.figure == Figure::DecodeTokS);
    let recorded = finish::record(
        &p.results_dir,
        &p.stem,
        &record,
        &p.setup,
        &RowFacts {
            provenance: &p.provenance,
            summary: summary.as_ref(),
            gates: gates.as_ref(),
            compared: Some(&record::Compared {
                against: &p.a_arg,
                against_tree: &p.a.tree,
                rounds: measured.rounds,
                decode: decode.and_then(|d| d.decision.as_ref()),
                verdict: verdict.map(|v| v.recorded(args.screen)),
            }),
            status,
            description: &args.description,
        },
    )?;
    outcome?;
    let (verdict, reasons) = decided.expect("a comparison that measured has an outcome");

    print_report(
        args,
        &p,
        &measured,
        &figures,
        gates.as_ref(),
        (verdict, &reasons),
    )?;
    recorded.report(oracle_cost.as_ref());
    Ok(verdict)
}

/// Whether the timing leaves a keep possible: nothing SLOWER (a KEEP, or a NOISE that the
/// simplicity rule may keep).
fn keepable(figures: &[FigureResult]) -> bool {
    !figures.is_empty() && figures.iter().all(|f| f.verdict != Verdict::Slower)
}

/// B's answers, untimed, to the instances of rounds `measured..gates.scored_rounds` (the
/// plan's, as the comparison would have drawn them), from one fresh worker: what the gates
/// need when measuring ended early. Their times are never looked at.
fn untimed_answers(
    args: &CompareArgs,
    p: &Prepared,
    plan: &Plan,
    measured: u32,
) -> Result<Vec<Sample>> {
    let want = p.setup.protocol.gates.scored_rounds;
    if measured >= want {
        return Ok(Vec::new());
    }
    let max_rounds = p.schedule.max_rounds();
    let rounds = measured..want.min(max_rounds);
    eprintln!(
        "measuring ended after {measured} round(s): B answers rounds {}-{} untimed, so that the \
         gates judge {want} rounds",
        rounds.start + 1,
        rounds.end
    );
    let name_b = format!("B ({})", p.b.arg);
    let mut worker = Worker::spawn(&Spawn {
        variant: &name_b,
        lib: &p.b.lib,
        model: &p.setup.model.path,
        timeout: p.setup.timeout(),
        echo_log: args.verbose,
        load: p.setup.load_request(),
        protect: &p.protect,
    })?;
    let mut answers = Vec::new();
    for round in rounds {
        for planned in &plan.rounds[round as usize] {
            let label = format!("{} (untimed, for the gates)", planned.label(max_rounds));
            let answer = timed_request(
                &p.setup,
                &mut worker,
                &name_b,
                planned,
                &label,
                p.setup.protocol.max_new_tokens,
            )?;
            eprintln!("untimed: {label}");
            answers.push(answer);
        }
    }
    Ok(answers)
}

/// The roofline check on what was measured: B well above the memory-bandwidth bound
/// ([`crate::measure::roofline::SUSPECT_SLACK`] times) is suspect (its reason in words); A
/// above it makes the comparison fail, since nothing can be compared with a suspect reference.
/// Only on the CPU, whose bound the host measures (a GPU may beat it).
fn check_roofline(p: &Prepared, pairs: &[Pair], outcome: &mut Result<()>) -> Option<String> {
    if p.setup.device != Device::Cpu {
        return None;
    }
    let roofline = crate::measure::roofline::Roofline::for_model(p.setup.model.view);
    let fastest = |pick: fn(&Pair) -> &Sample| {
        pairs
            .iter()
            .map(|p| pick(p).timing.decode_tok_s)
            .fold(0.0, f64::max)
    };
    let (fastest_a, fastest_b) = (fastest(|p| &p.a), fastest(|p| &p.b));
    if outcome.is_ok() && roofline.is_suspect(fastest_a) {
        *outcome = Err(anyhow::anyhow!(
            "A ({}) {}: the reference side is suspect, so nothing can be compared with it",
            p.a_arg,
            roofline.excess(fastest_a)
        ));
    }
    roofline
        .is_suspect(fastest_b)
        .then(|| format!("B {} (suspect)", roofline.excess(fastest_b)))
}

/// The comparison's answer on stdout: the table per figure, the gates and the verdict line (or
/// the same as JSON with `--json`).
fn print_report(
    args: &CompareArgs,
    p: &Prepared,
    measured: &Measured,
    figures: &[FigureResult],
    gates: Option<&GateReport>,
    (verdict, reasons): (Outcome, &[String]),
) -> Result<()> {
    if args.json {
        let out = serde_json::json!({
            "outcome": verdict,
            "reasons": reasons,
            "rounds": measured.rounds,
            "pairs": measured.pairs.len(),
            "seconds": measured.seconds,
            "figures": figures,
            "decode_by_prompt": by_prompt(&measured.pairs, Figure::DecodeTokS),
            "gates": gates,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{}",
            render(
                figures,
                &p.a_arg,
                &p.b_arg,
                &p.schedule,
                measured.looks.len() as u32,
                p.rules.noise_threshold
            )
        );
        println!(
            "{}",
            render_by_prompt(
                Figure::DecodeTokS,
                &by_prompt(&measured.pairs, Figure::DecodeTokS)
            )
        );
        if let Some(g) = gates {
            println!("{}", g.render());
        }
        println!(
            "verdict: {} — {} ({} pairs over {} rounds, {:.0} s)",
            verdict.recorded(args.screen).label(),
            reasons.join("; "),
            measured.pairs.len(),
            measured.rounds,
            measured.seconds
        );
        if args.screen {
            println!("a screen is never kept: run `host compare` on the full protocol to decide");
        }
    }
    Ok(())
}

/// The keep rule ([`keep_rule::decide`], or its form for an ungated synthetic model) on what
/// this comparison measured.
fn outcome_of(
    figures: &[FigureResult],
    gates: Option<&GateReport>,
    suspect: Option<&str>,
    ungated: bool,
) -> (Outcome, Vec<String>) {
    let calls: Vec<FigureCall> = figures.iter().map(FigureResult::call).collect();
    match ungated {
        true => keep_rule::decide_synthetic(&calls),
        false => keep_rule::decide(&calls, gates.map(|g| g.failures.as_slice()), suspect),
    }
}

/// The overrides of `args`, asking for the protocol's screen when `--screen` is given;
/// refuses a screen combined with flags that would change what a screen is.
fn screen_overrides(args: &CompareArgs) -> Result<Overrides> {
    let clashes: Vec<&str> = [
        (!args.overrides.prompts.is_empty(), "--prompt"),
        (args.overrides.max_new_tokens.is_some(), "--max-new-tokens"),
        (args.looks.is_some(), "--looks"),
        (args.rounds_per_look.is_some(), "--rounds-per-look"),
    ]
    .into_iter()
    .filter_map(|(given, flag)| given.then_some(flag))
    .collect();
    if args.screen && !clashes.is_empty() {
        bail!(
            "--screen sets the prompts, tokens and looks from prompts/protocol.toml's [screen]; \
             drop {}",
            clashes.join(", ")
        );
    }
    Ok(Overrides {
        screen: args.screen,
        ..args.overrides.clone()
    })
}

/// The measured rounds whose answers of B the oracle scores: all of them when the comparison
/// may be kept (`may_keep`), else `k` picked at random by `seed`.
fn scored_rounds_of(rounds: u32, may_keep: bool, k: u32, seed: u64) -> Vec<u32> {
    match may_keep {
        true => (0..rounds).collect(),
        false => pick_rounds(rounds, k, seed),
    }
}

/// `k` of the rounds `0..rounds` (all when there are no more), drawn with `seed`, in order.
fn pick_rounds(rounds: u32, k: u32, seed: u64) -> Vec<u32> {
    let mut all: Vec<u32> = (0..rounds).collect();
    let mut rng = crate::stats::rng::SplitMix64::new(seed);
    for i in 0..k.min(rounds) as usize {
        let j = i + rng.below((all.len() - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(k.min(rounds) as usize);
    all.sort_unstable();
    all
}

/// Applies the command-line overrides of `[compare]` and checks the result. On a GPU there
/// are no turns (see [`PairCtx::one_at_a_time`]): `turn_ms` becomes 0, and `--turn-ms` above 0
/// is refused.
fn apply_rules(rules: &mut CompareRules, args: &CompareArgs, device: Device) -> Result<()> {
    if let Some(v) = args.looks {
        rules.looks = v;
    }
    if let Some(v) = args.rounds_per_look {
        rules.rounds_per_look = v;
    }
    if let Some(v) = args.max_seconds {
        rules.max_seconds = v;
    }
    if let Some(v) = args.noise_threshold {
        rules.noise_threshold = v;
    }
    if let Some(v) = args.turn_ms {
        rules.turn_ms = v;
    }
    if device != Device::Cpu {
        if args.turn_ms.is_some_and(|v| v > 0) {
            bail!(
                "--turn-ms: on a GPU the two sides of a pair never run at once (work a stopped \
                 worker queued on the GPU would run on during the other's turn), so there are no \
                 turns; drop --turn-ms"
            );
        }
        rules.turn_ms = 0;
    }
    rules
        .check()
        .map_err(|m| anyhow::anyhow!("command-line override: {m}"))
}

/// The measured part: both workers, the warm-ups, then rounds until a stop.
fn measure(
    args: &CompareArgs,
    p: &Prepared,
    plan: &Plan,
    sides: &Sides,
    out: &mut Measured,
) -> Result<()> {
    let (setup, schedule, rules) = (&p.setup, &p.schedule, &p.rules);
    let (a, b) = (sides.a, sides.b);
    let name_a = format!("A ({})", a.arg);
    let name_b = format!("B ({})", b.arg);

    let prompts = setup.prompts.prompts.len();
    let max_rounds = schedule.max_rounds();
    let warmups_per_pair = setup.protocol.warmup_requests as usize;
    let total = 2 * (warmups_per_pair + 1) * prompts * max_rounds as usize;
    let bar = crate::progress::progress_bar(total, "");
    let log = |line: String| crate::progress::log_line(&bar, line);
    let started = Instant::now();
    let mut orders = PairOrders::new(crate::stats::rng::fresh_seed);
    let mut interval = String::from("no look yet");
    let new_tokens = setup.protocol.max_new_tokens;
    for round in 0..max_rounds {
        for planned in &plan.rounds[round as usize] {
            let label = planned.label(max_rounds);
            let order = orders.of(out.pairs.len());
            let ctx = PairCtx {
                pair: out.pairs.len(),
                clock: started,
                args,
                setup,
                sides,
                names: [&name_a, &name_b],
                bar: &bar,
                interval: &interval,
                label: &label,
                warmups: &plan.warmups[out.pairs.len()],
                warmup_tokens: rules.warmup_new_tokens,
            };
            // `apply_rules` has made `turn_ms` 0 on a GPU.
            let measured = if rules.turn_ms > 0 {
                ctx.in_turns(planned, order, new_tokens, rules.turn_ms)?
            } else {
                ctx.one_at_a_time(planned, order, new_tokens)?
            };
            out.workers.extend(measured.lives);
            for (prompt, warm_a, warm_b) in measured.warmups {
                out.warmups.push(Pair {
                    round,
                    prompt,
                    order: measured.warmup_order,
                    a: warm_a,
                    b: warm_b,
                });
            }
            let (sa, sb) = (measured.a, measured.b);
            for (which, s) in [('A', &sa), ('B', &sb)] {
                log(format!("{which} {}", request_line(s, &label)));
                bar.inc(1);
            }
            out.pairs.push(Pair {
                round,
                prompt: planned.instance.prompt.clone(),
                order,
                a: sa,
                b: sb,
            });
        }
        out.rounds = round + 1;
        out.seconds = started.elapsed().as_secs_f64();
        if !schedule.looks_after(round + 1) {
            continue;
        }
        let number = schedule.look_number(round + 1);
        let alpha_at = |f: Figure, look: u32| {
            schedule
                .alpha_at(f.test(), look)
                .expect("every figure's test is in TESTS, and looks_after keeps the look in range")
        };
        let horizon = Horizon {
            pairs: max_rounds as usize * prompts,
            alpha: &|f| alpha_at(f, schedule.looks),
        };
        let figures = look(
            &out.pairs,
            |f| alpha_at(f, number),
            &horizon,
            rules.noise_threshold,
            setup.protocol.seed ^ round as u64,
        );
        if let Some(d) = figures.iter().find(|f| f.figure == Figure::DecodeTokS) {
            interval = format!("decode B/A {}", d.call().change());
        }
        log(look_line(
            &figures,
            number,
            schedule.looks,
            round + 1,
            rules.noise_threshold,
        ));
        let done = measuring_done(
            &figures,
            rules.noise_threshold,
            rules.guard_stop_chance,
            rules.futility_chance,
        );
        out.looks.push(figures);
        if done || out.seconds >= rules.max_seconds {
            break;
        }
    }
    bar.finish_and_clear();
    if out.looks.is_empty() {
        bail!("the comparison ended before its first look");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::figures::*;
    use super::*;
    use crate::harness::protocol::CompareRules;
    use crate::stats::significance::Paired;

    fn result(figure: Figure, verdict: Verdict, settled: bool) -> FigureResult {
        FigureResult {
            figure,
            better: figure.better(),
            guarded: figure != Figure::DecodeTokS,
            a_median: Some(1.0),
            b_median: Some(1.0),
            decision: Paired::of(&[0.05, 0.06, 0.04], 0.01, 1),
            at_95: None,
            verdict,
            settled,
            chance_slower_at_end: None,
            chance_faster_at_end: None,
        }
    }

    /// The alpha of a test comparison's last look.
    fn end_alpha(_: Figure) -> f64 {
        0.01
    }

    /// A test comparison that could run to 60 pairs.
    const HORIZON: Horizon<'static> = Horizon {
        pairs: 60,
        alpha: &end_alpha,
    };

    fn figures(decode: Verdict, guarded: Verdict) -> Vec<FigureResult> {
        vec![
            result(Figure::DecodeTokS, decode, false),
            result(Figure::PrefillTokS, Verdict::Noise, true),
            result(Figure::TtftMs, guarded, false),
            result(Figure::PeakRssMib, Verdict::Noise, true),
            result(Figure::ItlP99Ms, Verdict::Noise, true),
        ]
    }

    fn gates(fail: bool) -> GateReport {
        let thresholds = crate::harness::protocol::Gates {
            tie_margin: 0.001,
            min_agreement: 0.999,
            max_perplexity_ratio: 1.1,
            max_check_drop: 0.34,
            max_repetition_rise: 0.2,
            oracle_device: "cpu".into(),
            scored_rounds: 3,
        };
        let mut report = GateReport::decide(&[], &[], &thresholds);
        if fail {
            report.failures.push(crate::quality::GateFailure {
                prompt: "code".into(),
                gate: "agreement".into(),
                figure: 0.5,
                threshold: 0.999,
                message: "prompt \"code\": agreement 0.5 is below the threshold".into(),
            });
        }
        report
    }

    /// `host keep` applies the rule to a record read back: the figures as `host compare` writes
    /// them must read as the same calls, and the rule must say the same of them.
    #[test]
    fn recorded_figures_read_back_as_the_calls_the_rule_made() {
        for (decode, guarded) in [
            (Verdict::Faster, Verdict::Noise),
            (Verdict::Noise, Verdict::Slower),
        ] {
            let results = figures(decode, guarded);
            let json = serde_json::to_string(&results).unwrap();
            let read: Vec<FigureCall> = serde_json::from_str(&json).unwrap();
            let calls: Vec<FigureCall> = results.iter().map(FigureResult::call).collect();
            // (serde_json's float parsing may move the last bit of the ratio: words only)
            let key = |c: &FigureCall| (c.figure, c.verdict, c.settled, c.change());
            assert_eq!(
                read.iter().map(key).collect::<Vec<_>>(),
                calls.iter().map(key).collect::<Vec<_>>()
            );
            let report = gates(false);
            let failures = serde_json::to_string(&report.failures).unwrap();
            let failures: Vec<crate::quality::GateFailure> =
                serde_json::from_str(&failures).unwrap();
            assert_eq!(
                keep_rule::decide(&read, Some(&failures), None).0,
                outcome_of(&results, Some(&report), None, false).0
            );
        }
        let nan =
            r#"[{"prompt": "p", "gate": "g", "figure": null, "threshold": 1.1, "message": "m"}]"#;
        let read: Vec<crate::quality::GateFailure> = serde_json::from_str(nan).unwrap();
        assert!(
            read[0].figure.is_nan(),
            "a non-finite figure, written as null, reads back"
        );
    }

    #[test]
    fn the_keep_rule() {
        let gates_pass = gates(false);
        let keep = outcome_of(
            &figures(Verdict::Faster, Verdict::Noise),
            Some(&gates_pass),
            None,
            false,
        );
        assert_eq!(keep.0, Outcome::Keep, "{keep:?}");
        // A guarded figure slower: revert, naming it.
        let (o, why) = outcome_of(
            &figures(Verdict::Faster, Verdict::Slower),
            Some(&gates_pass),
            None,
            false,
        );
        assert_eq!(o, Outcome::Revert);
        assert!(
            why.iter().any(|w| w.contains("TTFT ms is SLOWER")),
            "{why:?}"
        );
        // Faster on average but with a longer tail between tokens: revert, naming it.
        let mut stalls = figures(Verdict::Faster, Verdict::Noise);
        stalls[4] = result(Figure::ItlP99Ms, Verdict::Slower, false);
        let (o, why) = outcome_of(&stalls, Some(&gates_pass), None, false);
        assert_eq!(o, Outcome::Revert);
        assert!(
            why.iter().any(|w| w.contains("ITL p99 ms is SLOWER")),
            "{why:?}"
        );
        // Decode slower: revert.
        let (o, _) = outcome_of(
            &figures(Verdict::Slower, Verdict::Noise),
            Some(&gates_pass),
            None,
            false,
        );
        assert_eq!(o, Outcome::Revert);
        // Nothing decided: noise.
        let (o, _) = outcome_of(
            &figures(Verdict::Noise, Verdict::Noise),
            Some(&gates_pass),
            None,
            false,
        );
        assert_eq!(o, Outcome::Noise);
        // Prefill FASTER with decode not SLOWER: a keep of its own, saying so; with decode
        // SLOWER, a revert.
        let prefill_won = |decode| {
            let mut f = figures(decode, Verdict::Noise);
            f[1] = result(Figure::PrefillTokS, Verdict::Faster, false);
            outcome_of(&f, Some(&gates_pass), None, false)
        };
        let (o, why) = prefill_won(Verdict::Noise);
        assert_eq!(o, Outcome::Keep);
        assert!(why[0].starts_with("prefill is FASTER"), "{why:?}");
        assert_eq!(prefill_won(Verdict::Slower).0, Outcome::Revert);
        // Faster but suspect, or not gated: revert.
        let (o, why) = outcome_of(
            &figures(Verdict::Faster, Verdict::Noise),
            None,
            Some("suspect"),
            false,
        );
        assert_eq!((o, why[0].as_str()), (Outcome::Revert, "suspect"));
        let (o, _) = outcome_of(&figures(Verdict::Faster, Verdict::Noise), None, None, false);
        assert_eq!(o, Outcome::Revert, "an ungated B is never kept");
        let (o, why) = outcome_of(&figures(Verdict::Faster, Verdict::Noise), None, None, true);
        assert_eq!(o, Outcome::Noise, "a synthetic model never earns a KEEP");
        assert!(why.iter().any(|w| w.contains("FASTER")), "{why:?}");
        let (o, _) = outcome_of(&figures(Verdict::Faster, Verdict::Slower), None, None, true);
        assert_eq!(o, Outcome::Revert);
        let (o, _) = outcome_of(&figures(Verdict::Faster, Verdict::Noise), None, None, false);
        assert_eq!(o, Outcome::Revert);
        // Faster but a failed gate: revert.
        let failing = gates(true);
        let (o, why) = outcome_of(
            &figures(Verdict::Faster, Verdict::Noise),
            Some(&failing),
            None,
            false,
        );
        assert_eq!(o, Outcome::Revert);
        assert!(why.iter().any(|w| w.contains("quality gate")), "{why:?}");
        assert_eq!(
            [Outcome::Keep, Outcome::Revert, Outcome::Noise].map(Outcome::exit_code),
            [0, 4, 3]
        );
    }

    fn sample(decode: f64, ttft: f64, rss: u64) -> Sample {
        Sample {
            prompt: "p".into(),
            round: 0,
            instance: crate::harness::prompts::PromptInstance {
                prompt: "p".into(),
                user_text: String::new(),
                nonce: String::new(),
                values: Default::default(),
            },
            timing: crate::measure::Timing {
                prompt_tokens: 100,
                new_tokens: 8,
                ttft_ms: ttft,
                prefill_tok_s: 100.0 / (ttft / 1e3),
                decode_tok_s: decode,
                total_ms: ttft + 7.0 * 1e3 / decode,
                itl_ms: vec![1e3 / decode; 7],
            },
            peak_rss_kib: rss,
            cpu_ms: 0.0,
            paused_ms: 0.0,
            tokens: vec![],
            eos_at: None,
            text: String::new(),
            repetition: 0.0,
            checks: vec![],
            prompt_ids: vec![],
            quality: None,
        }
    }

    /// A figure whose decision interval is `ci` (as B/A), with the verdict and settledness
    /// that interval implies at a 1% noise threshold.
    fn with_interval(figure: Figure, ci: (f64, f64)) -> FigureResult {
        let decision = Paired {
            n: 4,
            ratio: (ci.0 * ci.1).sqrt(),
            ci,
            ci_bootstrap: ci,
            p: if ci.0 > 1.0 || ci.1 < 1.0 { 1e-6 } else { 0.5 },
            alpha: 0.01,
            sd: 0.1,
        };
        FigureResult {
            verdict: decision.verdict(figure.better(), 0.01),
            settled: decision.within(0.01),
            at_95: Some(decision.clone()),
            decision: Some(decision),
            ..result(figure, Verdict::Noise, false)
        }
    }

    #[test]
    fn measuring_stops_when_the_keep_rule_can_no_longer_change() {
        let same = (0.995, 1.005);
        let faster = (1.05, 1.10);
        let unknown = (0.97, 1.04);
        let case = |decode, prefill, ttft, rss| {
            let figures = [
                with_interval(Figure::DecodeTokS, decode),
                with_interval(Figure::PrefillTokS, prefill),
                with_interval(Figure::TtftMs, ttft),
                with_interval(Figure::PeakRssMib, rss),
            ];
            measuring_done(&figures, 0.01, 0.0, 0.0)
        };
        // Decode FASTER, prefill shown no worse than 1% slower though not decided (the case
        // that once ran all 12 rounds): stop.
        assert!(case(faster, (0.995, 1.03), (0.97, 1.005), same));
        // Decode FASTER, prefill could still be 3% slower: go on.
        assert!(!case(faster, unknown, (0.96, 1.03), same));
        // Memory could still be 2% larger: go on.
        assert!(!case(faster, same, same, (0.99, 1.02)));
        // Decode undecided: go on, however settled the guards.
        assert!(!case(unknown, same, same, same));
        // Decode the same within the band and nothing can block: stop (NOISE either way).
        assert!(case(same, same, same, same));
        // Anything SLOWER: stop (REVERT whatever comes next).
        assert!(case(unknown, (0.90, 0.95), (1.05, 1.11), same));
        assert!(case(unknown, same, same, (1.02, 1.04)));
        // A time (lower is better) shown no worse: its upper end inside the band.
        assert!(case(faster, (0.999, 1.2), (0.8, 1.009), same));
        // The tail between tokens is a guard like the others.
        let tail = |itl| {
            [
                with_interval(Figure::DecodeTokS, faster),
                with_interval(Figure::PrefillTokS, same),
                with_interval(Figure::TtftMs, same),
                with_interval(Figure::PeakRssMib, same),
                with_interval(Figure::ItlP99Ms, itl),
            ]
        };
        assert!(!measuring_done(&tail((0.95, 1.10)), 0.01, 0.0, 0.0));
        assert!(measuring_done(&tail((1.02, 1.10)), 0.01, 0.0, 0.0));
        assert!(measuring_done(&tail((0.90, 1.005)), 0.01, 0.0, 0.0));

        // Curtailment: a guard that is not shown no worse stops the measuring only when its
        // chance of ending SLOWER is below the stop chance.
        let with_chance = |chance: f64| {
            let mut prefill = with_interval(Figure::PrefillTokS, unknown);
            prefill.chance_slower_at_end = Some(chance);
            let mut ttft = with_interval(Figure::TtftMs, (0.96, 1.03));
            ttft.chance_slower_at_end = Some(chance);
            [
                with_interval(Figure::DecodeTokS, faster),
                prefill,
                ttft,
                with_interval(Figure::PeakRssMib, same),
            ]
        };
        assert!(measuring_done(&with_chance(0.001), 0.01, 0.01, 0.0));
        assert!(!measuring_done(&with_chance(0.02), 0.01, 0.01, 0.0));
        assert!(
            !measuring_done(&with_chance(0.001), 0.01, 0.0, 0.0),
            "0 never curtails"
        );

        // Futility: undecided decode stops the measuring (as NOISE) only when both its chance
        // of ending FASTER and of ending SLOWER are below the futility chance.
        let hopeless = |faster: f64, slower: f64| {
            let mut decode = with_interval(Figure::DecodeTokS, unknown);
            decode.chance_faster_at_end = Some(faster);
            decode.chance_slower_at_end = Some(slower);
            [
                decode,
                with_interval(Figure::PrefillTokS, same),
                with_interval(Figure::TtftMs, same),
                with_interval(Figure::PeakRssMib, same),
            ]
        };
        assert!(measuring_done(&hopeless(0.002, 0.0), 0.01, 0.01, 0.01));
        assert!(!measuring_done(&hopeless(0.05, 0.0), 0.01, 0.01, 0.01));
        assert!(
            !measuring_done(&hopeless(0.002, 0.3), 0.01, 0.01, 0.01),
            "a decode that may still end SLOWER is pinned down"
        );
        assert!(
            !measuring_done(&hopeless(0.0, 0.0), 0.01, 0.01, 0.0),
            "0 waits for decode to be decided"
        );

        // Decode settled but not FASTER: prefill can still win a KEEP, so measuring goes on
        // while it is undecided and has a chance of ending FASTER above the futility chance.
        let prefill_open = |faster: f64| {
            let mut prefill = with_interval(Figure::PrefillTokS, (0.998, 1.08));
            prefill.chance_faster_at_end = Some(faster);
            prefill.chance_slower_at_end = Some(0.0);
            [
                with_interval(Figure::DecodeTokS, same),
                prefill,
                with_interval(Figure::TtftMs, same),
                with_interval(Figure::PeakRssMib, same),
            ]
        };
        assert!(!measuring_done(&prefill_open(0.4), 0.01, 0.01, 0.01));
        assert!(measuring_done(&prefill_open(0.004), 0.01, 0.01, 0.01));
        assert!(
            case(same, faster, (0.90, 0.95), same),
            "prefill FASTER: a keep"
        );
        assert!(
            case(faster, (0.998, 1.08), same, same),
            "with decode FASTER, prefill is only a guard"
        );
    }

    /// Spreads of one pair's log-ratios as measured on the 2-vCPU VM with the pair's requests
    /// taking turns (30 A/A pairs of variants/baseline, 2026-12-02): decode 0.016; prefill
    /// 0.128 for the short prompts (80 tokens, half a second) and 0.011 for the long one.
    const DECODE_SD: f64 = 0.016;
    const PREFILL_SD_SHORT: f64 = 0.128;
    const PREFILL_SD_LONG: f64 = 0.011;
    /// The spread of one pair's ITL p99 log-ratio: 0.32 over 20 A/A pairs of variants/current
    /// with turns on the 2-vCPU VM, 2026-12-02 (heavy-tailed: two pairs at +0.79 and -0.84).
    const ITL_P99_SD: f64 = 0.32;

    /// The protocol's own `[compare]` rules, which the simulations follow.
    fn default_rules() -> CompareRules {
        Protocol::shipped().compare
    }

    /// The look schedule of `rules`.
    fn schedule_of(rules: &CompareRules) -> LookSchedule {
        LookSchedule::new(
            rules.alpha,
            rules.looks,
            rules.rounds_per_look,
            rules.spending_gamma,
            &TESTS,
        )
    }

    /// One simulated comparison under `rules`: a round is 4 short prompts (80 tokens) and the
    /// long one (1,680), each one independent pair; decode log-ratios around ln(`decode`) with
    /// [`DECODE_SD`], prefill's around ln(`prefill`) with the short and long spreads (weighted
    /// by prompt tokens, as `host compare` does), the ITL tail's around -ln(`decode`) (the gaps
    /// shrink as decode speeds up) with [`ITL_P99_SD`], memory identical. It stops by
    /// `measuring_done` and is decided by the keep rule with passing gates. Returns the outcome
    /// and the rounds measured.
    fn simulate_comparison(
        rng: &mut crate::stats::rng::SplitMix64,
        (rules, schedule): (&CompareRules, &LookSchedule),
        (decode, prefill): (f64, f64),
    ) -> (Outcome, u32) {
        use crate::stats::significance::gaussian;
        let end = |f: Figure| schedule.alpha_at(f.test(), schedule.looks).unwrap();
        let horizon = Horizon {
            pairs: schedule.max_rounds() as usize * 5,
            alpha: &end,
        };
        let (mut d, mut p, mut w, mut itl) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut figures = Vec::new();
        for round in 1..=schedule.max_rounds() {
            for (tokens, sd) in [
                (80.0, PREFILL_SD_SHORT),
                (80.0, PREFILL_SD_SHORT),
                (80.0, PREFILL_SD_SHORT),
                (80.0, PREFILL_SD_SHORT),
                (1680.0, PREFILL_SD_LONG),
            ] {
                d.push(decode.ln() + DECODE_SD * gaussian(rng));
                p.push(prefill.ln() + sd * gaussian(rng));
                w.push(tokens);
                itl.push(-decode.ln() + ITL_P99_SD * gaussian(rng));
            }
            if !schedule.looks_after(round) {
                continue;
            }
            let look = schedule.look_number(round);
            let ttft: Vec<f64> = p.iter().map(|x| -x).collect();
            let rss = vec![0.0; p.len()];
            let ones = vec![1.0; p.len()];
            figures = [
                (Figure::DecodeTokS, &d, &ones),
                (Figure::PrefillTokS, &p, &w),
                (Figure::TtftMs, &ttft, &w),
                (Figure::PeakRssMib, &rss, &ones),
                (Figure::ItlP99Ms, &itl, &ones),
            ]
            .iter()
            .map(|&(f, logs, weights)| {
                let alpha = schedule.alpha_at(f.test(), look).unwrap();
                figure_result(
                    f,
                    (logs, weights),
                    alpha,
                    &horizon,
                    rules.noise_threshold,
                    Paired::weighted_t_only,
                )
            })
            .collect();
            if measuring_done(
                &figures,
                rules.noise_threshold,
                rules.guard_stop_chance,
                rules.futility_chance,
            ) {
                return (
                    outcome_of(&figures, Some(&gates(false)), None, false).0,
                    round,
                );
            }
        }
        (
            outcome_of(&figures, Some(&gates(false)), None, false).0,
            schedule.max_rounds(),
        )
    }

    /// Shares of KEEP and REVERT, and the median and 90th percentile of the rounds, over
    /// `trials` simulated comparisons under `rules`.
    fn campaign(
        rules: &CompareRules,
        (decode, prefill): (f64, f64),
        trials: usize,
    ) -> (f64, f64, u32, u32) {
        let mut rng = crate::stats::rng::SplitMix64::new(17);
        let schedule = schedule_of(rules);
        let runs: Vec<(Outcome, u32)> = (0..trials)
            .map(|_| simulate_comparison(&mut rng, (rules, &schedule), (decode, prefill)))
            .collect();
        let share = |o: Outcome| runs.iter().filter(|r| r.0 == o).count() as f64 / trials as f64;
        let mut rounds: Vec<u32> = runs.iter().map(|r| r.1).collect();
        rounds.sort();
        (
            share(Outcome::Keep),
            share(Outcome::Revert),
            rounds[trials / 2],
            rounds[trials * 9 / 10],
        )
    }

    #[test]
    fn the_default_protocol_decides_in_a_round_or_two() {
        // 1,000 simulated comparisons per case under prompts/protocol.toml's [compare], with
        // the spreads measured with turns. Printed for protocol.toml, program.md and README
        // (run with --nocapture).
        let rules = default_rules();
        let case = |decode: f64, prefill: f64| {
            let (keep, revert, median, p90) = campaign(&rules, (decode, prefill), 1000);
            eprintln!(
                "decode B/A {decode}, prefill B/A {prefill}: KEEP {keep:.3} REVERT {revert:.3}, \
                 rounds median {median}, 90th percentile {p90}"
            );
            (keep, revert, median, p90)
        };
        // A variant against itself: never kept, and over in a round or two (futility).
        let aa = case(1.0, 1.0);
        assert!(aa.0 <= 0.01 && aa.1 <= 0.05 && aa.2 <= 2, "{aa:?}");
        // A 10% decode gain: kept, at look 1 as a rule.
        let big = case(1.10, 1.0);
        assert!(big.0 >= 0.99 && big.2 == 1 && big.3 <= 2, "{big:?}");
        // 5% either way: kept, or reverted, at least 95% of the time, in about 2 rounds.
        let gain = case(1.05, 1.0);
        assert!(gain.0 >= 0.95 && gain.2 <= 2, "{gain:?}");
        let loss = case(0.95, 1.0);
        assert!(loss.1 >= 0.95 && loss.2 <= 2, "{loss:?}");
        // A decode gain that costs 5% of prefill is reverted.
        let trade = case(1.10, 0.95);
        assert!(trade.1 >= 0.95, "{trade:?}");
        // 2%: within the default budget of 12 rounds, most of the time.
        let small = case(1.02, 1.0);
        assert!(small.0 >= 0.8, "{small:?}");
        // A prefill gain that leaves decode alone: kept on its own.
        let prefill = case(1.0, 1.10);
        assert!(prefill.0 >= 0.95 && prefill.2 <= 3, "{prefill:?}");
        let prefill_small = case(1.0, 1.05);
        assert!(prefill_small.0 >= 0.9, "{prefill_small:?}");
    }

    #[test]
    fn a_look_line_shows_each_figures_running_ratio_and_interval() {
        let mut prefill = with_interval(Figure::PrefillTokS, (0.97, 1.04));
        prefill.chance_slower_at_end = Some(0.0042);
        let mut rss = with_interval(Figure::PeakRssMib, (0.995, 1.005));
        rss.chance_slower_at_end = Some(0.0);
        let mut decode = with_interval(Figure::DecodeTokS, (1.05, 1.10));
        decode.chance_faster_at_end = Some(0.9);
        let figures = [decode.clone(), prefill, rss];
        let line = look_line(&figures, 2, 6, 4, 0.01);
        assert!(line.starts_with("look 2/6 after 4 rounds"), "{line}");
        assert!(
            line.contains("decode tok/s 1.075 [1.050, 1.100] FASTER"),
            "{line}"
        );
        assert!(
            line.contains("prefill tok/s 1.004 [0.970, 1.040] NOISE (ends SLOWER: 0.4%)"),
            "{line}"
        );
        // A guard shown within the band needs no chance.
        assert!(line.ends_with("1.000 [0.995, 1.005] SAME"), "{line}");
        // Undecided decode says how likely it still is to end FASTER.
        decode.verdict = Verdict::Noise;
        decode.chance_faster_at_end = Some(0.0031);
        let line = look_line(&[decode], 1, 6, 2, 0.01);
        assert!(line.contains("NOISE (ends FASTER: 0.3%)"), "{line}");
    }

    #[test]
    fn the_scored_rounds_are_a_random_subset() {
        assert_eq!(
            pick_rounds(2, 3, 1),
            vec![0, 1],
            "fewer rounds than asked: all"
        );
        let picks: Vec<Vec<u32>> = (0..50).map(|seed| pick_rounds(12, 3, seed)).collect();
        for p in &picks {
            assert_eq!(p.len(), 3);
            assert!(p.windows(2).all(|w| w[0] < w[1]) && p[2] < 12, "{p:?}");
        }
        let distinct: std::collections::HashSet<&Vec<u32>> = picks.iter().collect();
        assert!(
            distinct.len() > 30,
            "seeds pick different rounds: {distinct:?}"
        );
    }

    #[test]
    fn a_comparison_that_may_be_kept_has_every_round_scored() {
        for seed in 0..20 {
            assert_eq!(
                scored_rounds_of(7, true, 3, seed),
                (0..7).collect::<Vec<u32>>()
            );
            assert_eq!(scored_rounds_of(7, false, 3, seed), pick_rounds(7, 3, seed));
        }
        assert_eq!(scored_rounds_of(2, true, 3, 1), vec![0, 1]);
    }

    #[test]
    fn every_pair_is_one_observation() {
        // Two rounds of two prompts: B 10% then 20% faster in round 0, 0% and 10% in round 1.
        let pair = |round, b| Pair {
            round,
            prompt: "p".into(),
            order: Order::AB,
            a: sample(20.0, 500.0, 200_000),
            b: sample(b, 500.0, 200_000),
        };
        let pairs = [pair(0, 22.0), pair(0, 24.0), pair(1, 20.0), pair(1, 22.0)];
        let (logs, weights) = pair_logs(&pairs, Figure::DecodeTokS);
        let expect = [1.1f64.ln(), 1.2f64.ln(), 0.0, 1.1f64.ln()];
        assert_eq!((logs.len(), weights), (4, vec![1.0; 4]));
        for (m, e) in logs.iter().zip(expect) {
            assert!((m - e).abs() < 1e-12, "{logs:?}");
        }
        let figures = look(&pairs, |_| 0.05, &HORIZON, 0.01, 1);
        assert_eq!(figures[0].decision.as_ref().map(|d| d.n), Some(4));
        // ITL p99 is the inverse of the decode rate here (every gap alike): B's is lower.
        let (itl, _) = pair_logs(&pairs, Figure::ItlP99Ms);
        for (m, e) in itl.iter().zip(expect) {
            assert!((m + e).abs() < 1e-12, "{itl:?}");
        }
    }

    #[test]
    fn a_pair_without_gaps_says_nothing_of_the_itl() {
        // A one-token answer has no gap between tokens, so no ITL percentile: that pair is
        // left out of the ITL test (and only of it) rather than poisoning it with NaN.
        let mut lone = sample(20.0, 500.0, 200_000);
        lone.timing.itl_ms.clear();
        let pair = |a: Sample, b: f64| Pair {
            round: 0,
            prompt: "p".into(),
            order: Order::AB,
            a,
            b: sample(b, 500.0, 200_000),
        };
        let pairs = [
            pair(sample(20.0, 500.0, 200_000), 22.0),
            pair(lone, 22.0),
            pair(sample(20.0, 500.0, 200_000), 21.0),
        ];
        assert_eq!(pair_logs(&pairs, Figure::ItlP99Ms).0.len(), 2);
        assert_eq!(pair_logs(&pairs, Figure::DecodeTokS).0.len(), 3);
        let figures = look(&pairs, |_| 0.05, &HORIZON, 0.01, 1);
        let itl = figures
            .iter()
            .find(|f| f.figure == Figure::ItlP99Ms)
            .unwrap();
        assert_eq!(itl.decision.as_ref().map(|d| d.n), Some(2));
        assert!(itl.decision.as_ref().is_some_and(|d| d.ratio.is_finite()));
    }

    #[test]
    fn looks_pair_the_figures() {
        // B decodes 10% faster with a little jitter, prefill identical, memory identical.
        let pairs: Vec<Pair> = (0..8)
            .map(|i| {
                let jitter = 1.0 + 0.002 * (i % 3) as f64;
                Pair {
                    round: i,
                    prompt: "p".into(),
                    order: if i % 2 == 0 { Order::AB } else { Order::BA },
                    a: sample(20.0, 500.0, 200_000),
                    b: sample(22.0 * jitter, 500.0, 200_000),
                }
            })
            .collect();
        let figures = look(&pairs, |_| 0.05 / 15.0, &HORIZON, 0.01, 1);
        let by = |f: Figure| figures.iter().find(|r| r.figure == f).unwrap();
        assert_eq!(by(Figure::DecodeTokS).verdict, Verdict::Faster);
        assert!((by(Figure::DecodeTokS).decision.as_ref().unwrap().ratio - 1.102).abs() < 0.01);
        for f in [Figure::PrefillTokS, Figure::TtftMs, Figure::PeakRssMib] {
            assert_eq!(by(f).verdict, Verdict::Noise);
            assert!(by(f).settled, "{f:?} is identical on both sides");
        }
        // Every gap is 1/decode here, so B's tail is 9% shorter: not beyond the tail's ±10%
        // band, so no verdict (where decode's 1% band gives one).
        let tail = by(Figure::ItlP99Ms);
        assert!((tail.decision.as_ref().unwrap().ratio - 1.0 / 1.102).abs() < 0.01);
        assert!(tail.verdict == Verdict::Noise && tail.guarded);
        assert!(figures
            .iter()
            .filter(|f| f.figure != Figure::ItlP99Ms)
            .all(FigureResult::decided));
        let table = render(
            &figures,
            "a",
            "b",
            &LookSchedule::new(0.05, 6, 2, -1.0, &TESTS),
            3,
            0.01,
        );
        assert!(
            table.contains("FASTER") && table.contains("SAME"),
            "{table}"
        );
        assert!(table.contains("at look 3 of 6"), "{table}");
    }

    #[test]
    fn each_prompt_shows_its_own_ratio_while_the_test_pools_them() {
        // Two prompts: "short" 4% faster in both of its pairs, "long" 20% slower in one and 10%
        // in the other; a pair whose figure is not positive on one side says nothing.
        let pair = |round: u32, prompt: &str, a: f64, b: f64| Pair {
            round,
            prompt: prompt.into(),
            order: Order::AB,
            a: sample(a, 500.0, 200_000),
            b: sample(b, 500.0, 200_000),
        };
        let pairs = vec![
            pair(0, "short", 100.0, 104.0),
            pair(0, "long", 50.0, 40.0),
            pair(1, "long", 50.0, 45.0),
            pair(1, "short", 100.0, 104.0),
            pair(2, "long", 0.0, 45.0),
        ];
        let rows = by_prompt(&pairs, Figure::DecodeTokS);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].prompt.as_str(), rows[0].pairs), ("short", 2));
        assert!((rows[0].ratio - 1.04).abs() < 1e-9, "{rows:?}");
        assert_eq!((rows[1].prompt.as_str(), rows[1].pairs), ("long", 2));
        assert!(
            (rows[1].ratio - (0.8f64 * 0.9).sqrt()).abs() < 1e-9,
            "{rows:?}"
        );
        let line = render_by_prompt(Figure::DecodeTokS, &rows);
        assert!(
            line.starts_with("by prompt: decode tok/s B/A")
                && line.contains("short 1.040 (2), long 0.849 (2)"),
            "{line}"
        );
        assert!(by_prompt(&[], Figure::DecodeTokS).is_empty());
    }

    /// A GPU comparison has no turns: the protocol's turn_ms becomes 0 (its pairs run one
    /// worker at a time) and an explicit `--turn-ms` above 0 is refused; the CPU keeps both.
    #[test]
    fn a_gpu_comparison_runs_one_worker_at_a_time() {
        let shipped = default_rules().turn_ms;
        assert!(shipped > 0, "the shipped protocol takes turns on the CPU");
        let plain = CompareArgs::default();
        let mut rules = default_rules();
        apply_rules(&mut rules, &plain, Device::Cpu).unwrap();
        assert_eq!(rules.turn_ms, shipped);
        for gpu in [Device::Cuda(0), Device::Metal(0)] {
            let mut rules = default_rules();
            apply_rules(&mut rules, &plain, gpu).unwrap();
            assert_eq!(rules.turn_ms, 0, "{gpu:?}");
            let zero = CompareArgs {
                turn_ms: Some(0),
                ..CompareArgs::default()
            };
            apply_rules(&mut default_rules(), &zero, gpu).unwrap();
            let turns = CompareArgs {
                turn_ms: Some(100),
                ..CompareArgs::default()
            };
            let err = apply_rules(&mut default_rules(), &turns, gpu).unwrap_err();
            assert!(err.to_string().contains("drop --turn-ms"), "{err}");
        }
        let turns = CompareArgs {
            turn_ms: Some(100),
            ..CompareArgs::default()
        };
        let mut rules = default_rules();
        apply_rules(&mut rules, &turns, Device::Cpu).unwrap();
        assert_eq!(rules.turn_ms, 100);
    }
}
