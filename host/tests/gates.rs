//! The quality gates on the real model: variants whose output drifts from the baseline's are
//! rejected with the right reason, and correct ones pass, however they are timed.

mod common;

use common::{model, records, run_drift, run_fixture, scratch};

/// Checks that `run` (a `host run`'s output) was rejected by the quality gates, for each of
/// `gates` among others, and returns the run's row.
fn rejected(
    run: (std::process::Output, String, String),
    results: &std::path::Path,
    gates: &[&str],
) -> std::collections::BTreeMap<String, String> {
    let (out, stdout, err) = run;
    assert!(!out.status.success(), "must be rejected: {stdout}{err}");
    assert!(
        err.contains("quality gate(s)") && stdout.contains("gates: FAIL"),
        "{stdout}\n{err}"
    );
    for gate in gates {
        assert!(
            err.contains(&format!(": {gate} ")) && err.contains("the threshold"),
            "the {gate} gate should fail, naming its figure and threshold: {err}"
        );
    }
    let rows = records(results);
    assert_eq!(rows.len(), 1);
    let row = rows[0].clone();
    assert_eq!(row["status"], "rejected", "{row:?}");
    assert!(row["gates"].starts_with("fail: "), "{row:?}");
    row
}

/// The `broken` fixture in `mode` on the code prompt, 16 tokens.
fn broken_on_code(mode: &str, results: &std::path::Path) -> (std::process::Output, String, String) {
    model();
    run_fixture(
        "broken",
        mode,
        results,
        &["--prompt", "code", "--max-new-tokens", "16"],
    )
}

#[test]
fn random_tokens_fail_agreement_and_perplexity() {
    let results = scratch("gate-random");
    let run = broken_on_code("random", &results);
    let row = rejected(run, &results, &["agreement", "perplexity ratio"]);
    let agreement: f64 = row["agreement"].parse().unwrap();
    assert!(agreement < 0.2, "random ids rarely match: {row:?}");
    assert!(row["ppl_ratio"].parse::<f64>().unwrap() > 100.0, "{row:?}");
}

#[test]
fn one_token_repeated_fails_agreement_and_repetition() {
    let results = scratch("gate-repeat");
    let run = broken_on_code("repeat", &results);
    let row = rejected(run, &results, &["agreement", "repetition rise"]);
    // 16 equal tokens: 12 of their 13 4-grams repeat the first.
    assert_eq!(row["repetition"], "0.923", "{row:?}");
}

#[test]
fn skipping_a_third_of_the_layers_fails_agreement() {
    model();
    let results = scratch("gate-skip");
    let row = rejected(run_drift("skip-layers", &results), &results, &["agreement"]);
    assert!(row["agreement"].parse::<f64>().unwrap() < 0.9, "{row:?}");
}

/// Runs the drift fixture in `mode`, expects every gate to pass, and returns the run's row.
fn passes(mode: &str) -> std::collections::BTreeMap<String, String> {
    model();
    let results = scratch(&format!("gate-{mode}"));
    let (out, stdout, err) = run_drift(mode, &results);
    assert!(out.status.success(), "{stdout}\n{err}");
    assert!(stdout.contains("gates: PASS"), "{stdout}");
    let row = records(&results)[0].clone();
    assert_eq!(
        (row["status"].as_str(), row["gates"].as_str()),
        ("ok", "pass")
    );
    row
}

#[test]
fn correct_but_slow_passes_every_gate() {
    let row = passes("sleep");
    assert_eq!(row["agreement"], "1.0000", "{row:?}");
    assert_eq!(row["ppl_ratio"], "1.0000", "{row:?}");
    // 20 ms of sleep before each of 16 emits caps decoding at 50 tokens/s.
    let decode: f64 = row["decode_tok_s"].parse().unwrap();
    assert!(decode < 50.0, "the sleep shows in the decode rate: {row:?}");
}

#[test]
fn reordered_float_sums_pass_every_gate() {
    passes("reorder");
}
