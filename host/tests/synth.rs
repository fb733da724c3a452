//! `host synth` end to end: the real binary writes a tiny synthetic model that opens, refuses
//! to overwrite it, refuses unknown shapes by listing the known ones, and (when the baseline
//! is already built) benches on it; `host run` on it says so loudly, gates it when its weights
//! are secret (no --seed) and skips the gates when a seed wrote it.

mod common;

use common::{build_plain, host, model, output, records, run_fixture, scratch, synth_tiny};

#[test]
fn writes_a_tiny_model_and_refuses_to_overwrite_it() {
    // The tokenizer comes from the default model: fetch it first if need be.
    model();
    let dir = scratch("synth");
    let path = dir.join("t.gguf");
    let (out, stdout, stderr) = output(
        host()
            .args(["synth", "--shape", "tiny", "--out"])
            .arg(&path),
    );
    assert!(out.status.success(), "host synth failed:\n{stderr}");
    assert_eq!(stdout.trim(), path.display().to_string(), "{stderr}");
    assert!(stderr.contains("synthetic tiny"), "{stderr}");
    assert!(path.is_file());
    let partial = dir.join("t.gguf.partial");
    assert!(!partial.exists(), "the partial file was left behind");
    // It opens as a Llama model whose tokenizer the host can use.
    let (out, stdout, stderr) = output(host().args(["tokenize", "hello", "--model"]).arg(&path));
    assert!(
        out.status.success(),
        "host tokenize on it failed:\n{stderr}"
    );
    let ids: Vec<u32> = serde_json::from_str(stdout.trim()).expect("token ids as JSON");
    assert!(!ids.is_empty());

    let before = std::fs::read(&path).unwrap();
    let (out, _, stderr) = output(
        host()
            .args(["synth", "--shape", "tiny", "--out"])
            .arg(&path),
    );
    assert!(!out.status.success(), "an existing file was overwritten");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // With --force and another seed it is rewritten, to the same size.
    let (out, _, stderr) = output(
        host()
            .args([
                "synth", "--shape", "tiny", "--seed", "2", "--force", "--out",
            ])
            .arg(&path),
    );
    assert!(out.status.success(), "host synth --force failed:\n{stderr}");
    let after = std::fs::read(&path).unwrap();
    assert_eq!(after.len(), before.len());
    assert_ne!(after, before);

    // A q8_0 file is larger.
    let q8 = dir.join("t8.gguf");
    let (out, _, stderr) = output(
        host()
            .args(["synth", "--shape", "tiny", "--type", "q8_0", "--out"])
            .arg(&q8),
    );
    assert!(
        out.status.success(),
        "host synth --type q8_0 failed:\n{stderr}"
    );
    assert!(std::fs::metadata(&q8).unwrap().len() > after.len() as u64);

    bench_if_built(&path);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `host bench` of the baseline (from a plain cargo build) on the synthetic model.
fn bench_if_built(path: &std::path::Path) {
    build_plain();
    let (out, stdout, stderr) = output(
        host()
            .args(["bench", "variants/baseline", "--model"])
            .arg(path)
            .args(["-p", "16", "-n", "8", "-r", "1", "--no-build", "--json"]),
    );
    assert!(
        out.status.success(),
        "host bench on the synthetic model failed:\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    for t in report["tests"].as_array().expect("tests") {
        let rate = t["mean_tok_s"].as_f64().unwrap();
        assert!(rate > 0.0 && rate.is_finite(), "{t}");
    }
}

#[test]
fn unknown_shapes_and_types_are_refused() {
    let dir = scratch("synth-unknown");
    let path = dir.join("x.gguf");
    let (out, _, stderr) = output(
        host()
            .args(["synth", "--shape", "llama-9000", "--out"])
            .arg(&path),
    );
    assert!(!out.status.success());
    assert!(stderr.contains("llama-9000"), "{stderr}");
    for known in ["llama-3.2-1b", "llama-3.1-8b", "smollm2-135m", "tiny"] {
        assert!(stderr.contains(known), "{known} is not listed:\n{stderr}");
    }
    assert!(!path.exists());
    let (out, _, stderr) = output(host().args(["synth", "--shape", "tiny", "--type", "q4_0"]));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("q4_1") && stderr.contains("q8_0"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `host run variants/baseline` on `path`: one round of 32 tokens of the code prompt.
fn run_baseline_on(
    path: &std::path::Path,
    results: &std::path::Path,
) -> (std::process::Output, String, String) {
    output(
        host()
            .args(["run", "variants/baseline", "--model"])
            .arg(path)
            .args([
                "--rounds",
                "1",
                "--max-new-tokens",
                "32",
                "--prompt",
                "code",
            ])
            .arg("--results")
            .arg(results),
    )
}

/// Without --seed the weights come from a secret key: a run on them is gated against the
/// oracle at the synthetic shape, the baseline passes, and a variant that skips work fails as
/// it would on the real model; so does one that computes each Q4_1 block's minimum from its
/// scale instead of reading it (the drift fixture's `derive-min`: exact on a file whose
/// minimum followed from its scale, as one factor once made both).
#[test]
fn a_run_on_a_secret_synthetic_model_is_gated() {
    let dir = scratch("synth-secret");
    let path = synth_tiny(&dir, "t.gguf", &[]);
    let results = dir.join("results");
    let (out, stdout, stderr) = run_baseline_on(&path, &results);
    assert!(out.status.success(), "host run failed:\n{stderr}");
    assert!(stderr.contains("secret random weights"), "{stderr}");
    assert!(stdout.contains("gates: PASS"), "{stdout}");
    let rows = records(&results);
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0]["status"].as_str(), rows[0]["gates"].as_str()),
        ("ok", "pass"),
        "{:?}",
        rows[0]
    );
    let model = ["--model", path.to_str().unwrap()];
    let short = ["--prompt", "code", "--max-new-tokens", "16"];
    for (n, mode) in ["skip-layers", "derive-min"].into_iter().enumerate() {
        let (out, stdout, stderr) =
            run_fixture("drift", mode, &results, &[&model[..], &short[..]].concat());
        assert!(!out.status.success(), "{mode} passed:\n{stdout}");
        assert!(
            stderr.contains("failed") && stderr.contains("agreement"),
            "{mode}: {stderr}"
        );
        let rows = records(&results);
        assert_eq!(rows.len(), 2 + n);
        assert_eq!(
            rows[1 + n]["status"],
            "rejected",
            "{mode}: {:?}",
            rows[1 + n]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_run_on_a_seeded_synthetic_model_says_so_and_skips_the_gates() {
    let dir = scratch("synth-run");
    let path = synth_tiny(&dir, "t.gguf", &["--seed", "1"]);
    let results = dir.join("results");
    let (out, stdout, stderr) = run_baseline_on(&path, &results);
    assert!(
        out.status.success(),
        "host run on the synthetic model failed:\n{stderr}"
    );
    assert!(
        stderr.matches("SYNTHETIC MODEL").count() >= 2,
        "the banner is not printed before and after:\n{stderr}"
    );
    assert!(stdout.contains("quality gates: skipped"), "{stdout}");
    let rows = records(&results);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["status"], "synthetic", "{:?}", rows[0]);
    let _ = std::fs::remove_dir_all(&dir);
}
