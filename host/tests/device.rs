//! `--device` end to end on a machine without a GPU: every way a device request can fail is
//! refused by name, before or at load time, and never silently runs on the CPU.

mod common;

use common::{fixture, host, model, output, run_fixture, scratch};

#[test]
fn a_baseline_built_without_cuda_refuses_cuda_naming_the_feature() {
    model();
    // The CPU build, as every other test has it.
    let (out, _, stderr) = output(host().args([
        "bench",
        "variants/baseline",
        "-p",
        "0",
        "-n",
        "2",
        "-r",
        "1",
        "-t",
        "1",
    ]));
    assert!(out.status.success(), "the CPU bench failed:\n{stderr}");
    let (out, _, stderr) = output(host().args([
        "bench",
        "variants/baseline",
        "--device",
        "cuda",
        "--no-build",
        "-p",
        "0",
        "-n",
        "2",
        "-r",
        "1",
    ]));
    assert!(!out.status.success(), "a CPU build ran on cuda:\n{stderr}");
    assert!(
        stderr.contains("cannot run on cuda:0")
            && stderr.contains("built without CUDA support")
            && stderr.contains("`cuda` cargo feature"),
        "{stderr}"
    );
}

#[test]
fn a_cpu_only_variant_refuses_a_gpu() {
    model();
    let results = scratch("device-cpu-only");
    // Built for the CPU first (the fixture declares no `cuda` feature to build with).
    let (out, _, stderr) = run_fixture("broken", "no-work", &results, &[]);
    assert!(
        stderr.contains("suspect") || out.status.success(),
        "the fixture did not run:\n{stderr}"
    );
    let (out, _, stderr) = run_fixture(
        "broken",
        "no-work",
        &results,
        &["--no-build", "--device", "cuda:1"],
    );
    assert!(!out.status.success());
    assert!(
        stderr.contains("runs on the CPU only and cannot run on cuda:1"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&results);
}

#[test]
fn a_gpu_build_of_a_variant_without_the_feature_is_refused_before_cargo_runs() {
    model();
    let results = scratch("device-no-feature");
    let (out, _, stderr) = output(
        host()
            .args(["run", "--device", "cuda", "--rounds", "1", "--results"])
            .arg(&results)
            .arg(fixture("drift")),
    );
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot be built for cuda:0")
            && stderr.contains("declares no `cuda` feature"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&results);
}

#[test]
fn unknown_devices_are_refused_by_name() {
    for (args, needle) in [
        (
            vec!["bench", "variants/baseline", "--device", "gpu"],
            "unknown device \"gpu\"",
        ),
        (
            vec!["run", "variants/baseline", "--device", "cuda:x"],
            "device ordinal \"x\"",
        ),
        (
            vec!["compare", "--device", "cpu:1"],
            "the CPU takes no ordinal",
        ),
    ] {
        let (out, _, stderr) = output(host().args(&args));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
