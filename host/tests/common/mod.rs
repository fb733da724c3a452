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

/// Runs the checkout's Python script `script` (a path from the root) with `args`, asserts that
/// it succeeded, and returns its stdout.
pub fn python_script<I, S>(script: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new("python3")
        .arg(root().join(script))
        .args(args)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
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

/// The kernel's Landlock ABI version (0 without Landlock): what confinement a run can get.
pub fn landlock_abi() -> i64 {
    // SAFETY: the documented version query of landlock_create_ruleset.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    }
    .max(0)
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

/// The fixtures' workspace members: built once per test binary by [`build_plain`], and run with
/// `--no-build` (the host's own confined builds are tested by e2e.rs and sandbox.rs).
pub const PREBUILT_FIXTURES: [&str; 3] = ["broken", "abi-mismatch", "drift"];

/// `cargo build --release` of the fixtures' workspace and of the checkout's variants, into the
/// main target directory, once per test binary: the libraries `--no-build` loads.
pub fn build_plain() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        for args in [
            vec![
                "--manifest-path",
                "host/tests/fixtures/variants/Cargo.toml",
                "--workspace",
            ],
            vec!["-p", "baseline", "-p", "current"],
        ] {
            let status = Command::new(&cargo)
                .args(["build", "--release", "--quiet"])
                .args(&args)
                .current_dir(root())
                .env("CARGO_TARGET_DIR", root().join("target"))
                .env_remove("AUTOINFER_FIXTURE_MODE")
                .status()
                .expect("cargo runs");
            assert!(status.success(), "cargo build {args:?} failed");
        }
    });
}

/// Writes a tiny synthetic model to `dir/name` (`extra`: more `host synth` options, say
/// `--seed 1`; without one its weights are secret, so runs on it are gated); returns its path.
#[allow(dead_code)] // not every test binary writes one
pub fn synth_tiny(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    model();
    let path = dir.join(name);
    let (out, _, stderr) = output(
        host()
            .args(["synth", "--shape", "tiny", "--out"])
            .arg(&path)
            .args(extra),
    );
    assert!(out.status.success(), "host synth failed:\n{stderr}");
    path
}

/// A tiny synthetic model (`host synth --shape tiny --seed 1`), written once per test binary:
/// fast to run on, with no quality gates (written from a seed; for the timing attacks).
pub fn tiny_model() -> &'static Path {
    static TINY: OnceLock<PathBuf> = OnceLock::new();
    TINY.get_or_init(|| {
        let name = format!("autoinfer-test-tiny-{}.gguf", std::process::id());
        synth_tiny(&std::env::temp_dir(), &name, &["--seed", "1", "--force"])
    })
}

/// Tokens a fixture run asks for unless the test says otherwise: the fixtures emit one every
/// millisecond or more, so 32 give a decode window of 31 ms or more, wide enough that a
/// supervisor descheduled for a few ms on a loaded machine does not receive them all in one read
/// (with 4 tokens, a CI machine once saw all of them "in one instant").
pub const FIXTURE_TOKENS: &str = "32";

/// `host run` on fixture `name` in `mode`: short protocol (one round, [`FIXTURE_TOKENS`]
/// tokens unless `extra` says otherwise), results into `results`. A prebuilt fixture runs with
/// `--no-build`.
pub fn run_fixture(
    name: &str,
    mode: &str,
    results: &Path,
    extra: &[&str],
) -> (Output, String, String) {
    let mut cmd = host();
    cmd.args(["run"]).arg(fixture(name));
    if !extra.contains(&"--rounds") {
        cmd.args(["--rounds", "1"]);
    }
    if PREBUILT_FIXTURES.contains(&name) {
        build_plain();
        if !extra.contains(&"--no-build") {
            cmd.arg("--no-build");
        }
    }
    if !extra.contains(&"--max-new-tokens") {
        cmd.args(["--max-new-tokens", FIXTURE_TOKENS]);
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
