//! `host compare` on the real model: A/A comes out NOISE, a slower variant is SLOWER and
//! reverted, a variant that buffers its tokens is never kept, revisions are built once, and bad
//! arguments and crashes are named.

mod common;

use std::path::Path;
use std::process::Output;
use std::sync::{Mutex, MutexGuard};

use common::{build_plain, fixture, host, model, output, records, root, scratch, synth_tiny};

/// One comparison at a time: a comparison measures while another test's comparison would build
/// (the first one in a fresh checkout compiles the oracle) or measure beside it, and on two
/// cores that noise drowns even a 45% slowdown.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `host compare A B` with a test-sized protocol and schedule, results into `results`, the
/// fixtures' mode set to `mode`.
fn compare(
    a: &str,
    b: &str,
    mode: &str,
    results: &Path,
    extra: &[&str],
) -> (Output, String, String) {
    model();
    let mut cmd = host();
    cmd.arg("compare");
    if !a.is_empty() {
        cmd.args([a, b]);
    }
    if [a, b].iter().any(|side| side.contains("fixtures")) {
        // The fixtures and the baseline from a plain cargo build (see common::build_plain).
        build_plain();
        cmd.arg("--no-build");
    }
    cmd.args(["--max-new-tokens", "8", "--prompt", "code"])
        .arg("--results")
        .arg(results)
        .args(extra)
        .env("AUTOINFER_FIXTURE_MODE", mode)
        .env("CARGO_TARGET_DIR", root().join("target"));
    output(&mut cmd)
}

/// The JSON record of a results row (its `json` column names the file under `runs/`).
fn record_of(
    results: &Path,
    row: &std::collections::BTreeMap<String, String>,
) -> serde_json::Value {
    let json = results.join("runs").join(&row["json"]);
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

/// Each pair's two worker lives from a comparison's record, in the order they started: (side,
/// started, ended), in seconds from the start of measuring.
fn worker_lives(record: &serde_json::Value) -> Vec<[(char, f64, f64); 2]> {
    let workers = record["workers"].as_array().expect("workers in the record");
    let life = |w: &serde_json::Value| {
        let side = w["side"].as_str().and_then(|s| s.chars().next()).unwrap();
        (
            side,
            w["started_s"].as_f64().unwrap(),
            w["ended_s"].as_f64().unwrap(),
        )
    };
    let mut lives: Vec<[(char, f64, f64); 2]> = Vec::new();
    for (i, pair) in workers.chunks(2).enumerate() {
        assert_eq!(pair.len(), 2, "two workers a pair: {workers:?}");
        assert!(pair.iter().all(|w| w["pair"] == i), "pair {i}: {pair:?}");
        let (mut x, mut y) = (life(&pair[0]), life(&pair[1]));
        if y.1 < x.1 {
            std::mem::swap(&mut x, &mut y);
        }
        assert_ne!(x.0, y.0, "one worker per side: {pair:?}");
        lives.push([x, y]);
    }
    lives
}

fn drift() -> String {
    fixture("drift").display().to_string()
}

/// On a synthetic model written without `--seed` (secret weights) a comparison is gated as on
/// the real model: a B that skips every third layer is REVERTED by the agreement gate, where on
/// a seeded file it was NOISE and never judged.
#[test]
fn a_comparison_on_a_secret_synthetic_model_is_gated() {
    let _one_at_a_time = serial();
    // The model outside the results directory, which no worker may read.
    let dir = scratch("compare-secret-synth");
    let path = synth_tiny(&dir, "t.gguf", &[]);
    let results = dir.join("results");
    let (out, stdout, err) = compare(
        "variants/baseline",
        &drift(),
        "skip-layers",
        &results,
        &[
            "--model",
            path.to_str().unwrap(),
            "--looks",
            "1",
            "--rounds-per-look",
            "2",
        ],
    );
    assert_eq!(out.status.code(), Some(4), "REVERT: {stdout}{err}");
    assert!(err.contains("secret random weights"), "{err}");
    assert!(
        stdout.contains("agreement"),
        "the failed gate is named: {stdout}"
    );
    let row = &records(&results)[0];
    assert_eq!(
        (row["verdict"].as_str(), row["status"].as_str()),
        ("REVERT", "rejected"),
        "{row:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_variant_against_itself_is_noise() {
    let _one_at_a_time = serial();
    let results = scratch("compare-aa");
    // Turns of 50 ms: each 8-token request is several turns long.
    let schedule = ["--looks", "2", "--rounds-per-look", "2", "--turn-ms", "50"];
    let mut noise = 0;
    for _ in 0..4 {
        let (out, stdout, err) = compare(
            "variants/baseline",
            "variants/baseline",
            "",
            &results,
            &schedule,
        );
        assert!(
            matches!(out.status.code(), Some(0 | 3 | 4)),
            "the comparison must run: {err}"
        );
        assert!(!err.contains("pairs: one worker at a time"), "{err}");
        // A false KEEP (decode FASTER by chance) is one of the false verdicts bounded below;
        // one in four can happen (about 1.5% a comparison), so it is counted, not forbidden.
        if out.status.code() != Some(3) {
            eprintln!("an A/A comparison was not NOISE:\n{stdout}");
        }
        if out.status.code() == Some(3) {
            assert!(stdout.contains("verdict: NOISE"), "{stdout}");
            noise += 1;
        }
        assert!(err.contains("an A/A comparison"), "{err}");
    }
    // Each comparison's false-verdict rate (KEEP, REVERT or a guarded figure decided) is at
    // most 5% by construction; 2 of 4 would be a 1-in-70 event even at that rate. (Forbidding
    // any false KEEP at all made this test fail about once in 17 runs, by design.)
    assert!(
        noise >= 3,
        "only {noise} of 4 A/A comparisons came out NOISE"
    );
    let rows = records(&results);
    assert_eq!(rows.len(), 4);
    for row in &rows {
        assert_eq!(row["against"], "variants/baseline");
        assert_eq!(row["against_tree"], row["variant_tree"]);
        assert_eq!(row["status"], "ok");
        // The same variant on both sides answers alike, and both counts are over the answers
        // the gates judged, the untimed round's included.
        assert_eq!(row["checks_passed"], row["checks_baseline"], "{row:?}");
        if row["verdict"] == "NOISE" {
            // It runs every look, unless futility ended it: decode can then in all likelihood
            // end neither FASTER nor SLOWER (chances below the protocol's 1%).
            let record = record_of(&results, row);
            let decode = &record["figures"][0];
            assert_eq!(decode["figure"], "decode_tok_s");
            let futile = ["chance_faster_at_end", "chance_slower_at_end"]
                .iter()
                .all(|k| decode[k].as_f64().is_some_and(|c| c < 0.01));
            match row["compare_rounds"].as_str() {
                "4" => {}
                "2" => assert!(futile, "stopped at look 1 without futility: {decode}"),
                other => panic!("{other} rounds: not a look's end"),
            }
            // A NOISE may be kept as simpler, so the gates judge 3 rounds of B's answers even
            // when measuring ended after 2: B answered round 3 untimed, and it was scored.
            let untimed = record["untimed_answers"].as_array().unwrap();
            if row["compare_rounds"] == "2" {
                assert_eq!(untimed.len(), 1, "one prompt, one round");
                assert_eq!(untimed[0]["round"], 2);
                assert!(untimed[0]["quality"].is_object(), "scored: {}", untimed[0]);
            } else {
                assert!(untimed.is_empty());
            }
        }
        assert!(row["decode_ratio"].contains('['), "{row:?}");
    }
    // The JSON holds every pair, both sides, each two pairs one A B and one B A (which first
    // is drawn).
    let record = record_of(&results, &rows[0]);
    let orders: Vec<&str> = record["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["order"].as_str().unwrap())
        .collect();
    assert!(orders.len() >= 2, "{orders:?}");
    for block in orders.chunks(2) {
        assert!(
            matches!(block, ["AB", "BA"] | ["BA", "AB"] | ["AB"] | ["BA"]),
            "{orders:?}"
        );
    }
    // The two requests of a pair took turns: each side was stopped while the other ran, and
    // for no longer than the other ran (plus the switching), and that time is in no timing.
    for pair in record["pairs"].as_array().unwrap() {
        let side = |s: &str, k: &str| pair[s][k].as_f64().unwrap();
        let total = |s: &str| pair[s]["timing"]["total_ms"].as_f64().unwrap();
        for (me, other) in [("a", "b"), ("b", "a")] {
            let paused = side(me, "paused_ms");
            assert!(
                paused > 0.0 && paused <= total(other) * 1.05 + 50.0,
                "{me} paused {paused} ms while {other} ran {} ms: {pair}",
                total(other)
            );
        }
    }
    // Taking turns, both workers start and warm up first, in the pair's order (so that which
    // one started first says nothing of its side), and then live at the same time.
    for (pair, [first, second]) in worker_lives(&record).iter().enumerate() {
        assert!(second.1 < first.2, "pair {pair}: {first:?} {second:?}");
        let order = record["pairs"][pair]["order"].as_str().unwrap();
        assert_eq!(order.chars().next(), Some(first.0), "pair {pair}");
        assert_eq!(record["warmups"][pair]["order"], order, "pair {pair}");
    }
    // A look every 2 pairs (one prompt, 2 rounds a look), wherever it stopped.
    assert_eq!(record["looks"].as_array().unwrap().len(), orders.len() / 2);
    std::fs::remove_dir_all(&results).unwrap();
}

#[test]
fn a_slower_variant_is_slower_and_reverted() {
    let _one_at_a_time = serial();
    // The drift fixture's `sleep` mode: the baseline's code and answers, 20 ms more per token.
    let results = scratch("compare-slow");
    let (out, stdout, err) = compare(
        "variants/baseline",
        &drift(),
        "sleep",
        &results,
        &[
            "--prompt",
            "explanation",
            "--looks",
            "2",
            "--rounds-per-look",
            "3",
            // One request after the other, the other way of measuring a pair.
            "--turn-ms",
            "0",
        ],
    );
    assert_eq!(out.status.code(), Some(4), "REVERT exits 4: {stdout}{err}");
    let decode = stdout
        .lines()
        .find(|l| l.starts_with("decode tok/s"))
        .unwrap();
    assert!(decode.ends_with("SLOWER"), "{stdout}");
    // Each prompt's own ratio follows the table ("name ratio (pairs)", comma-separated): every
    // prompt here is slower.
    let ratios: Vec<f64> = stdout
        .lines()
        .find(|l| l.starts_with("by prompt: decode tok/s B/A"))
        .and_then(|l| l.split("all): ").nth(1))
        .unwrap_or_default()
        .split(", ")
        .map(|each| {
            let ratio = each.split_whitespace().nth(1);
            ratio.and_then(|r| r.parse().ok()).unwrap_or(f64::NAN)
        })
        .collect();
    assert!(
        !ratios.is_empty() && ratios.iter().all(|r| *r < 1.0),
        "{ratios:?}: {stdout}"
    );
    assert!(
        stdout.contains("verdict: REVERT") && stdout.contains("decode tok/s is SLOWER"),
        "{stdout}"
    );
    let row = &records(&results)[0];
    assert_eq!(
        (row["verdict"].as_str(), row["status"].as_str()),
        ("REVERT", "ok")
    );
    let record = record_of(&results, row);
    assert_eq!(record["protocol"]["compare"]["turn_ms"], 0);
    assert!(
        err.contains("pairs: one worker at a time, each ended before the other side's starts"),
        "{err}"
    );
    // One request after the other, one worker at a time (as on a GPU): each pair's second
    // worker started only after the first had ended, the first being the one its order names.
    let lives = worker_lives(&record);
    assert_eq!(lives.len(), record["pairs"].as_array().unwrap().len());
    assert_eq!(
        lives.len(),
        record["warmups"].as_array().unwrap().len(),
        "a warm-up a pair"
    );
    for (pair, [first, second]) in lives.iter().enumerate() {
        assert!(
            first.2 <= second.1,
            "pair {pair} overlapped: {first:?} {second:?}"
        );
        let order = record["pairs"][pair]["order"].as_str().unwrap();
        assert_eq!(order.chars().next(), Some(first.0), "pair {pair}");
        // Its warm-ups ran in the same order, each just before its side's timed request.
        assert_eq!(record["warmups"][pair]["order"], order, "pair {pair}");
    }
    for pair in record["pairs"].as_array().unwrap() {
        assert_eq!(pair["a"]["paused_ms"], 0.0, "never stopped: {pair}");
        assert_eq!(pair["b"]["paused_ms"], 0.0, "never stopped: {pair}");
    }
    std::fs::remove_dir_all(&results).unwrap();
}

#[test]
fn a_variant_that_buffers_its_tokens_is_never_kept() {
    let _one_at_a_time = serial();
    // The drift fixture's `buffer` mode: correct answers, every token held back and emitted at
    // the end. Its tokens reach the supervisor together, in one read: no decode time can be
    // measured, and the comparison fails naming B rather than crediting it.
    let results = scratch("compare-buffer");
    let (out, stdout, err) = compare(
        "variants/baseline",
        &drift(),
        "buffer",
        &results,
        &["--looks", "2", "--rounds-per-look", "2"],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failure exits 1: {stdout}{err}"
    );
    assert!(
        err.contains(&format!("variant B ({})", drift())) && err.contains("in one instant"),
        "{err}"
    );
    let row = &records(&results)[0];
    assert_eq!(
        (row["verdict"].as_str(), row["status"].as_str()),
        ("-", "failed")
    );
    std::fs::remove_dir_all(&results).unwrap();
}

/// The drift fixture's `prefix` attack in a comparison: B keeps the KV cache of the prompt its
/// worker's warm-up request started with and prefills its timed request from the part the two
/// share, so that part of its prefill is done before the clock starts. Before every prompt
/// began with a nonce, the two shared the chat template, its default system message and the
/// instruction's head (a quarter of a short prompt; B's prefill read about 1.5x A's), and a rule
/// that kept a prefill win on its own (d040bff) would have kept it. Now they share at most the
/// first digits of their nonces, so the rule that counts prefill again has nothing to keep.
#[test]
fn a_prefix_cached_from_the_warm_up_is_never_kept() {
    let _one_at_a_time = serial();
    let results = scratch("compare-prefix");
    let (out, stdout, err) = compare(
        "variants/baseline",
        &drift(),
        "prefix",
        &results,
        &["--looks", "1", "--rounds-per-look", "8", "--verbose"],
    );
    assert!(
        matches!(out.status.code(), Some(3 | 4)),
        "the comparison runs and is not kept: {stdout}{err}"
    );
    // The attack is live (each request reports), and finds at most the first digits of a
    // nonce to reuse (two nonces start alike one time in 16; three tokens alike, one in
    // thousands). With the nonce after the template's head, every timed request reused its 3.
    let reused: Vec<usize> = err
        .lines()
        .filter_map(|l| l.split("attack prefix: reused ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect();
    assert!(reused.len() >= 16, "a report per request: {err}");
    assert!(
        reused.iter().all(|&n| n <= 2),
        "more than a nonce's first digits reused: {reused:?}"
    );
    // So B's prefill is A's, within the noise of 8 short pairs (it read 1.5x with the shared
    // system message).
    let record = record_of(&results, &records(&results)[0]);
    let prefill = record["figures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["figure"] == "prefill_tok_s")
        .unwrap();
    let ratio = prefill["at_95"]["ratio"].as_f64().unwrap();
    assert!(ratio < 1.15, "prefill B/A {ratio}:\n{stdout}");
    let row = &records(&results)[0];
    assert_ne!(row["verdict"], "KEEP", "{stdout}");
    // Eight rounds: a NOISE (which may be kept as simpler) has all eight of B's answers
    // scored, a REVERT three picked at random.
    assert_scored_rounds(&record, 8);
    std::fs::remove_dir_all(&results).unwrap();
}

/// A variant that answers about one request in four with made-up tokens (15 ms apart, twice the
/// baseline's pace here, under the roofline), hoping they
/// land in rounds the oracle does not score: nothing reads SLOWER, so the comparison may be
/// kept, every round of B is scored, and the agreement gate refuses the keep. (With 3 of 6
/// rounds scored at random, a draw that missed every faked answer let it through.)
#[test]
fn a_variant_that_fakes_a_few_answers_is_caught_in_whichever_round() {
    let _one_at_a_time = serial();
    let results = scratch("compare-fake-some");
    // Seed 7's instances have B fake at least one timed answer (checked below).
    let (out, stdout, err) = compare(
        "variants/baseline",
        &drift(),
        "fake-one-in=4",
        &results,
        &["--looks", "1", "--rounds-per-look", "6", "--seed", "7"],
    );
    let row = &records(&results)[0];
    assert_ne!(row["verdict"], "KEEP", "{stdout}{err}");
    let record = record_of(&results, row);
    // The faked answers among the timed ones: one token repeated.
    let faked: Vec<u64> = record["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|pair| {
            let tokens = pair["b"]["tokens"].as_array().unwrap();
            tokens.windows(2).all(|w| w[0] == w[1])
        })
        .map(|pair| pair["round"].as_u64().unwrap())
        .collect();
    assert!(!faked.is_empty(), "no timed answer was faked: {stdout}");
    assert!(faked.len() < 6, "every answer was faked: {faked:?}");
    assert_scored_rounds(&record, 6);
    assert!(
        out.status.code() == Some(4) && stdout.contains("gates: FAIL"),
        "the faked answers in rounds {faked:?} were not caught:\n{stdout}"
    );
    std::fs::remove_dir_all(&results).unwrap();
}

/// The rounds whose answers of B the oracle scored, from a comparison's record of `rounds`
/// measured rounds: every one when nothing was SLOWER (the comparison may be kept), else 3.
/// (Not for a comparison recorded as suspect, which is never kept either.)
fn assert_scored_rounds(record: &serde_json::Value, rounds: u64) {
    assert_ne!(
        record["status"], "suspect",
        "a suspect comparison: {}",
        record["status"]
    );
    let scored: Vec<u64> = record["scored_rounds"]
        .as_array()
        .expect("scored_rounds")
        .iter()
        .map(|r| r.as_u64().unwrap())
        .collect();
    let slower = record["figures"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["verdict"] == "Slower");
    if slower {
        assert_eq!(scored.len(), 3, "{scored:?}");
        assert!(scored.iter().all(|&r| r < rounds), "{scored:?}");
    } else {
        assert_eq!(
            scored,
            (0..rounds).collect::<Vec<_>>(),
            "every round scored"
        );
    }
}

#[test]
fn no_arguments_compare_the_committed_current_and_build_both_every_time() {
    // Both sides are built for every comparison, in the one build place, so that no library is
    // older than the other (README, "What remains out of reach").
    let _one_at_a_time = serial();
    let results = scratch("compare-rev");
    let schedule = ["--looks", "1", "--rounds-per-look", "2"];
    for _ in 0..2 {
        let (out, stdout, stderr) = compare("", "", "", &results, &schedule);
        assert!(
            matches!(out.status.code(), Some(0 | 3 | 4)),
            "{stdout}{stderr}"
        );
        assert!(
            stderr.contains("building HEAD:variants/current")
                && stderr.contains("building both sides in the one build place"),
            "A is built again: {stderr}"
        );
        let builds = stderr
            .lines()
            .filter(|l| l.contains("Compiling current v"))
            .count();
        assert_eq!(builds, 2, "both sides compiled, each once: {stderr}");
    }
    let rows = records(&results);
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row["against"], "HEAD:variants/current");
        assert_eq!(row["variant"], "variants/current");
    }
    std::fs::remove_dir_all(&results).unwrap();
}

#[test]
fn bad_arguments_are_named_and_leave_no_row() {
    let _one_at_a_time = serial();
    let results = scratch("compare-bad");
    for (args, needle) in [
        (vec!["variants/baseline"], "two variants (A B) or none"),
        (
            vec!["nosuchrev:variants/current", "variants/current"],
            "\"nosuchrev\" is not a commit",
        ),
        (
            vec!["HEAD:variants/nothing", "variants/current"],
            "has no variants/nothing",
        ),
        (
            vec!["variants/nothing", "variants/current"],
            "variant directory variants/nothing does not exist",
        ),
        (
            vec!["variants/baseline", "variants/current", "--rounds", "3"],
            "no --rounds",
        ),
        (
            vec!["variants/baseline", "variants/current", "--looks", "0"],
            "compare.looks",
        ),
        (
            vec!["variants/baseline", "variants/current", "--prompt", "nope"],
            "nope",
        ),
        (
            vec![
                "variants/baseline",
                "variants/current",
                "--screen",
                "--prompt",
                "code",
            ],
            "--screen sets the prompts, tokens and looks",
        ),
        (
            vec![
                "variants/baseline",
                "variants/current",
                "--screen",
                "--looks",
                "2",
            ],
            "drop --looks",
        ),
    ] {
        let mut cmd = host();
        cmd.arg("compare")
            .args(&args)
            .arg("--results")
            .arg(&results);
        let (out, _, err) = output(&mut cmd);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?} should say {needle:?}: {err}"
        );
    }
    assert!(
        records(&results).is_empty(),
        "refused before measuring: no row"
    );
    std::fs::remove_dir_all(&results).unwrap();
}

#[test]
fn a_screen_uses_its_own_prompts_and_is_recorded_as_a_screen() {
    let _one_at_a_time = serial();
    // The drift fixture's `sleep` mode (20 ms more per token) through `--screen`: the four
    // short prompts at 32 tokens, at most 3 rounds, and a verdict that names itself a screen.
    build_plain();
    let results = scratch("compare-screen");
    let mut cmd = host();
    cmd.args(["compare", "variants/baseline"])
        .arg(drift())
        .args(["--no-build", "--screen", "--results"])
        .arg(&results)
        .env("AUTOINFER_FIXTURE_MODE", "sleep")
        .env("CARGO_TARGET_DIR", root().join("target"));
    let (out, stdout, err) = output(&mut cmd);
    assert_eq!(
        out.status.code(),
        Some(4),
        "a slower B exits 4: {stdout}{err}"
    );
    assert!(stdout.contains("verdict: SCREEN-REVERT"), "{stdout}");
    assert!(stdout.contains("a screen is never kept"), "{stdout}");
    assert!(
        err.contains("screen: prompts code, creative, explanation, reasoning"),
        "{err}"
    );
    let row = &records(&results)[0];
    assert_eq!(row["verdict"], "SCREEN-REVERT");
    assert_eq!(row["prompts"], "code,creative,explanation,reasoning");
    assert_eq!(row["max_new_tokens"], "32");
    let rounds: u32 = row["compare_rounds"].parse().unwrap();
    assert!((1..=3).contains(&rounds), "{row:?}");
    std::fs::remove_dir_all(&results).unwrap();
}

#[test]
fn a_crash_of_b_is_named_and_recorded() {
    let _one_at_a_time = serial();
    let results = scratch("compare-crash");
    let broken = fixture("broken").display().to_string();
    let (out, _, err) = compare("variants/baseline", &broken, "panic", &results, &[]);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("B ({broken})")) && err.contains("panicked"),
        "{err}"
    );
    let row = &records(&results)[0];
    assert_eq!(
        (row["status"].as_str(), row["verdict"].as_str()),
        ("failed", "-")
    );
    std::fs::remove_dir_all(&results).unwrap();
}

/// The drift fixture's `triples` mode: correct answers at the same decode rate, but the tokens
/// after the first are held back and leave three at a time, so every third gap between tokens is
/// tripled. The decode rate averages that away; the ITL p99 guard must not, and reverts it.
/// (With `pairs`, every other gap doubled, CI's noisiest machine once put the ratio's decision
/// interval at [1.013, 3.115] in six pairs: the stall was seen, p = 6.1e-3, but the interval's
/// end lay inside the guard's ±10% band, so it read NOISE. A tripled gap leaves room.)
#[test]
fn a_variant_that_sends_its_tokens_in_bursts_is_reverted_by_the_itl_guard() {
    let _one_at_a_time = serial();
    let results = scratch("compare-bursts");
    let (out, stdout, err) = compare(
        "variants/baseline",
        &drift(),
        "triples",
        &results,
        &["--looks", "1", "--rounds-per-look", "6"],
    );
    assert_eq!(out.status.code(), Some(4), "a REVERT: {stdout}{err}");
    let line = |figure: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(figure))
            .unwrap_or_default()
            .to_string()
    };
    // The ITL guard names the stall: the gaps' tail about tripled. Whether the decode rate also
    // reads SLOWER is left to chance here (the stall leaves it as it was, as the unit test
    // `measure::tests::a_stall_every_other_token_keeps_the_rate_and_doubles_the_gaps` shows
    // exactly, but six noisy pairs may still call it at the decode test's alpha; CI once did,
    // at 0.912), so the test asserts what the guard must do, not what noise must not.
    let itl = line("ITL p99 ms");
    assert!(itl.ends_with("SLOWER"), "{stdout}");
    let ratio: f64 = itl
        .split_whitespace()
        .nth(5)
        .and_then(|r| r.parse().ok())
        .unwrap_or_default();
    assert!(ratio > 2.0, "ITL p99 B/A {ratio}, a tripled gap: {stdout}");
    assert!(stdout.contains("ITL p99 ms is SLOWER"), "{stdout}");
    let row = &records(&results)[0];
    assert_eq!(row["verdict"], "REVERT", "{stdout}");
    // A REVERT cannot be kept: three of its six rounds were scored, for the record.
    let record = record_of(&results, row);
    assert_scored_rounds(&record, 6);
    std::fs::remove_dir_all(&results).unwrap();
}

/// `host stage` builds two revisions as a comparison builds its sides and leaves their
/// libraries under the names `host compare --no-build` looks for; a side that is not a revision
/// is refused by name.
#[test]
fn stage_builds_two_revisions_for_a_machine_without_cargo() {
    let _one_at_a_time = serial();
    let out = scratch("stage");
    let stage = |a: &str, b: &str| {
        output(
            host()
                .current_dir(root())
                .args(["stage", a, b, "--out", out.to_str().unwrap()]),
        )
    };
    let (status, _, stderr) = stage("HEAD:variants/current", "HEAD:variants/baseline");
    assert!(status.status.success(), "{stderr}");
    assert!(
        stderr.contains("building both sides in the one build place"),
        "{stderr}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names[0].starts_with("baseline-") && names[1].starts_with("current-"),
        "{names:?}"
    );
    for name in &names {
        assert!(
            root()
                .join("target/autoinfer-git/built")
                .join(name)
                .is_file(),
            "{name} is where --no-build looks"
        );
    }
    let (status, _, stderr) = stage("variants/current", "HEAD:variants/current");
    assert!(!status.status.success());
    assert!(
        stderr.contains("variant A (variants/current) is not a revision"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}
