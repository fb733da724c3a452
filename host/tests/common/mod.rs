//! Helpers shared by the end-to-end tests: the real `host` binary, the real model, the fixtures.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root (the checkout).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ is in the workspace")
        .to_path_buf()
}

/// A `host` command run from the checkout's root.
pub fn host() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_host"));
    cmd.current_dir(root());
    cmd
}

/// Runs `cmd` and returns its output with stdout and stderr as text.
pub fn output(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("the host binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// The default model's path, fetched once if the cache lacks it.
pub fn model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let (out, stdout, stderr) = output(host().arg("model"));
        assert!(out.status.success(), "host model failed: {stderr}");
        PathBuf::from(stdout.trim())
    })
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("autoinfer-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// The directory of a fixture variant under host/tests/fixtures/variants.
pub fn fixture(name: &str) -> PathBuf {
    root().join("host/tests/fixtures/variants").join(name)
}

/// `host run` on a fixture variant: short protocol (one round, 4 tokens unless `extra` says
/// otherwise), results into `results`, and the fixture
/// workspace sharing the main target directory (so abi_stable is compiled once).
pub fn run_fixture(
    name: &str,
    mode: &str,
    results: &Path,
    extra: &[&str],
) -> (Output, String, String) {
    let mut cmd = host();
    cmd.args(["run"]).arg(fixture(name)).args(["--rounds", "1"]);
    if !extra.contains(&"--max-new-tokens") {
        cmd.args(["--max-new-tokens", "4"]);
    }
    cmd.arg("--results")
        .arg(results)
        .args(extra)
        .env("AUTOINFER_FIXTURE_MODE", mode)
        .env("CARGO_TARGET_DIR", root().join("target"));
    output(&mut cmd)
}

/// The rows of `results/results.tsv` as maps from column name to field.
pub fn records(results: &Path) -> Vec<std::collections::BTreeMap<String, String>> {
    let text = std::fs::read_to_string(results.join("results.tsv")).unwrap_or_default();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split('\t').collect();
    lines
        .map(|l| {
            header
                .iter()
                .zip(l.split('\t'))
                .map(|(h, f)| (h.to_string(), f.to_string()))
                .collect()
        })
        .collect()
}

/// `host run` of the `drift` fixture (the baseline's code, changed by `mode`) on two short
/// prompts, one round of 16 tokens: enough for the gates to judge, at a test's cost.
pub fn run_drift(mode: &str, results: &Path) -> (Output, String, String) {
    run_fixture(
        "drift",
        mode,
        results,
        &[
            "--prompt",
            "code",
            "--prompt",
            "explanation",
            "--max-new-tokens",
            "16",
        ],
    )
}

/// The rows of `results/results.tsv` (header excluded).
pub fn rows(results: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(results.join("results.tsv")).unwrap_or_default();
    text.lines()
        .skip(1)
        .map(|l| l.split('\t').map(String::from).collect())
        .collect()
}
