//! Every bad input and every way a variant can fail ends in a clear error that names the thing,
//! a non-zero exit, and (once measuring began) a `failed` row, with earlier rows intact.

mod common;

use std::path::Path;

use common::{build_plain, fixture, host, model, output, records, rows, run_fixture, scratch};

/// `host run variants/current --no-build` with `args`, expecting failure; returns stderr.
fn run_fails(args: &[&str], model_path: &Path) -> String {
    let (out, _, stderr) = output(
        host()
            .args(["run", "variants/current", "--no-build", "--model"])
            .arg(model_path)
            .args(args),
    );
    assert!(!out.status.success(), "must fail: {stderr}");
    stderr
}

#[test]
fn missing_model_file() {
    let err = run_fails(&[], Path::new("/nonexistent/model.gguf"));
    assert!(
        err.contains("/nonexistent/model.gguf") && err.contains("cannot open"),
        "{err}"
    );
}

#[test]
fn file_that_is_not_gguf() {
    let dir = scratch("not-gguf");
    let path = dir.join("model.gguf");
    std::fs::write(&path, "this is plain text, not a model").unwrap();
    let err = run_fails(&[], &path);
    assert!(
        err.contains("model.gguf") && err.contains("is not a GGUF file"),
        "{err}"
    );
}

#[test]
fn truncated_model() {
    let dir = scratch("truncated");
    let path = dir.join("truncated.gguf");
    let bytes = std::fs::read(model()).unwrap();
    for cut in [1_000, 3_000_000, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = run_fails(&[], &path);
        assert!(
            err.contains("truncated.gguf") && err.contains("truncated"),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn model_of_another_architecture() {
    let dir = scratch("arch");
    let path = dir.join("mamba.gguf");
    let mut bytes = std::fs::read(model()).unwrap();
    // general.architecture's value: key, u32 type (8 = string), u64 length 5, then "llama".
    let key = b"general.architecture";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the key is in the file")
        + key.len()
        + 12;
    assert_eq!(&bytes[at..at + 5], b"llama");
    bytes[at..at + 5].copy_from_slice(b"mamba");
    std::fs::write(&path, bytes).unwrap();
    let err = run_fails(&[], &path);
    assert!(
        err.contains("mamba.gguf")
            && err.contains("\"mamba\"")
            && err.contains("Llama-architecture"),
        "{err}"
    );
}

#[test]
fn directory_that_is_not_a_cdylib_crate() {
    let (out, _, err) = output(
        host()
            .args(["run", "--no-build"])
            .arg(fixture("not-cdylib")),
    );
    assert!(!out.status.success());
    assert!(
        err.contains("not-cdylib/Cargo.toml") && err.contains("cdylib"),
        "{err}"
    );
    let (out, _, err) = output(host().args(["run", "/no/such/variant"]));
    assert!(!out.status.success());
    assert!(
        err.contains("/no/such/variant") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn variant_that_does_not_compile_shows_cargos_error() {
    let results = scratch("compile-error");
    let (out, _, err) = run_fixture("compile-error", "", &results, &[]);
    assert!(!out.status.success());
    assert!(
        err.contains("error[E0308]") && err.contains("mismatched types"),
        "cargo's error is shown: {err}"
    );
    assert!(
        err.contains("cargo build of variant") && err.contains("compile-error"),
        "{err}"
    );
    assert!(rows(&results).is_empty(), "nothing was measured, so no row");
}

#[test]
fn variant_built_against_another_plugin_api() {
    let results = scratch("abi");
    let (out, _, err) = run_fixture("abi-mismatch", "", &results, &[]);
    assert!(!out.status.success());
    assert!(err.contains("different plugin-api"), "{err}");
    assert!(
        err.len() < 4000,
        "a short message, not abi_stable's whole report ({} bytes): {err}",
        err.len()
    );
}

/// Runs the `broken` fixture in `mode` and checks the error mentions every one of `needles`,
/// names the variant and the request, and leaves a `failed` row after the earlier ones.
fn broken(mode: &str, needles: &[&str], extra: &[&str]) {
    let results = scratch(&format!("broken-{mode}"));
    // An earlier run's row: a real one, from the suspect fixture (fast, and recorded).
    let (out, _, _) = run_fixture("broken", "no-work", &results, &[]);
    assert!(!out.status.success());
    let earlier = std::fs::read_to_string(results.join("results.tsv")).unwrap();
    assert_eq!(earlier.lines().count(), 2);
    let (out, _, err) = run_fixture("broken", mode, &results, extra);
    assert!(!out.status.success(), "mode {mode} must fail");
    for needle in needles.iter().chain(&["variants/broken"]) {
        assert!(
            err.contains(needle),
            "mode {mode}: {needle:?} missing from: {err}"
        );
    }
    let text = std::fs::read_to_string(results.join("results.tsv")).unwrap();
    assert!(text.starts_with(&earlier), "earlier rows intact: {text}");
    let all = records(&results);
    let last = all.last().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        last["status"], "failed",
        "the failed run is recorded: {last:?}"
    );
}

#[test]
fn variant_that_panics() {
    broken(
        "panic",
        &[
            "panicked in generate",
            "deliberate panic",
            "warm-up request",
        ],
        &[],
    );
}

#[test]
fn variant_that_segfaults() {
    broken(
        "segfault",
        &["SIGSEGV", "crashed during warm-up request"],
        &[],
    );
}

#[test]
fn variant_that_aborts() {
    broken("abort", &["SIGABRT", "crashed during warm-up request"], &[]);
}

#[test]
fn variant_that_hangs() {
    broken(
        "hang",
        &["timed out on warm-up request", "within 3 s"],
        &["--timeout", "3"],
    );
}

#[test]
fn variant_that_emits_one_token_too_few() {
    broken("fewer", &["emitted 31 tokens", "exactly 32"], &[]);
}

#[test]
fn variant_that_emits_past_stop() {
    broken(
        "more",
        &["emitted 1 token(s) after the host said stop"],
        &[],
    );
}

#[test]
fn variant_that_emits_ids_outside_the_vocabulary() {
    broken(
        "out_of_vocab",
        &["outside the vocabulary", "1073741824"],
        &[],
    );
}

#[test]
fn variant_whose_load_fails() {
    broken(
        "load_error",
        &["load() failed", "refuses on purpose", "loading the variant"],
        &[],
    );
}

#[test]
fn malformed_prompt_files_name_the_file_and_field() {
    let root = scratch("prompts");
    std::fs::create_dir_all(root.join("prompts")).unwrap();
    for entry in std::fs::read_dir(common::root().join("prompts")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, root.join("prompts").join(path.file_name().unwrap())).unwrap();
    }
    let current = common::root().join("variants/current");
    let cases = [
        (
            "reasoning.toml",
            "tolerance = 0.5",
            "tolerance = \"half\"",
            "tolerance",
        ),
        (
            "reasoning.toml",
            "2 * speed_out",
            "2 * speed_in",
            "checks[0]",
        ),
        ("code.toml", "template =", "templat =", "templat"),
        (
            "creative.toml",
            "min = 4",
            "min = 4\nmin = 5",
            "duplicate key",
        ),
        ("protocol.toml", "rounds = 3", "rounds = 0", "rounds"),
    ];
    for (file, from, to, needle) in cases {
        let path = root.join("prompts").join(file);
        let original = std::fs::read_to_string(&path).unwrap();
        assert!(original.contains(from), "{file} has {from:?}");
        std::fs::write(&path, original.replacen(from, to, 1)).unwrap();
        let (out, _, err) = output(
            host()
                .current_dir(&root)
                .args(["run", "--no-build"])
                .arg(&current),
        );
        std::fs::write(&path, original).unwrap();
        assert!(!out.status.success(), "{file} with {to:?} must be refused");
        assert!(
            err.contains(file) && err.contains(needle),
            "{file}: {needle:?} missing from: {err}"
        );
    }
}

#[test]
fn variant_faster_than_memory_bandwidth_is_suspect() {
    // The fixture's well-behaved mode emits a token every 100 us without reading a weight:
    // several thousand tok/s, far above 1.5 times what reading ~96 MB per token allows on any
    // CPU, even from a cache that holds the model.
    let results = scratch("suspect");
    let (out, _, err) = run_fixture("broken", "no-work", &results, &[]);
    assert!(!out.status.success(), "a suspect run must not pass: {err}");
    assert!(
        err.contains("recorded as suspect") && err.contains("memory bandwidth allows"),
        "{err}"
    );
    let all = records(&results);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["status"], "suspect", "{:?}", all[0]);
    assert_eq!(
        all[0]["gates"], "-",
        "a suspect run is not gated: {:?}",
        all[0]
    );
}

/// `--no-build` runs the library a build of the package last left in the target directory.
/// A copy of a crate (same package name) elsewhere is refused, naming where that library was
/// built from, instead of being measured under the copy's tree hash.
#[test]
fn no_build_refuses_a_library_built_from_another_directory() {
    build_plain();
    let copy = scratch("no-build-copy").join("drift");
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(fixture("drift"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(copied.success());
    let results = scratch("no-build-copy-results");
    let (out, _, err) = output(
        host()
            .args([
                "run",
                "--no-build",
                "--rounds",
                "1",
                "--max-new-tokens",
                "2",
            ])
            .arg(&copy)
            .arg("--results")
            .arg(&results)
            .env("CARGO_TARGET_DIR", common::root().join("target")),
    );
    assert!(!out.status.success(), "a copy's run must be refused: {err}");
    assert!(
        err.contains("was last built from the crate at")
            && err.contains("fixtures/variants/drift")
            && err.contains(copy.to_str().unwrap()),
        "{err}"
    );
    assert!(records(&results).is_empty(), "nothing measured, no row");
}

/// `--no-build` where cargo cannot run (a GPU machine with no toolchain) and CARGO_TARGET_DIR
/// is unset: the error says to set CARGO_TARGET_DIR, not only that cargo is missing.
#[test]
fn no_build_without_cargo_names_cargo_target_dir() {
    let (out, _, err) = output(
        host()
            .args(["bench", "--no-build", "-p", "0", "-n", "1", "-r", "1"])
            .arg(fixture("drift"))
            .env("CARGO", "/nonexistent/cargo")
            .env_remove("CARGO_TARGET_DIR"),
    );
    assert!(!out.status.success(), "no library can be found: {err}");
    assert!(
        err.contains("cannot run cargo (/nonexistent/cargo)")
            && err.contains("set CARGO_TARGET_DIR"),
        "{err}"
    );
}
