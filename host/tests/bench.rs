//! `host bench` end to end on the real model: llama-bench's tests, the thread count reaching
//! the variant, the roofline, and every bad input refused by name.

mod common;

use common::{host, model, output};

/// The small workload both end-to-end benches run: pp16 and tg8, two timed repetitions each,
/// one thread, the worker's log echoed.
const SMALL: [&str; 9] = ["-p", "16", "-n", "8", "-r", "2", "-t", "1", "-v"];

/// `host bench` of the drift fixture (built once, run with --no-build) in `mode`, on the SMALL
/// workload.
fn drift_bench(mode: &str) -> std::process::Command {
    model();
    common::build_plain();
    let mut cmd = host();
    cmd.arg("bench")
        .arg(common::fixture("drift"))
        .arg("--no-build")
        .args(SMALL)
        .env("AUTOINFER_FIXTURE_MODE", mode)
        .env("CARGO_TARGET_DIR", common::root().join("target"));
    cmd
}

#[test]
fn benches_the_baseline_with_one_thread() {
    model();
    let (out, stdout, stderr) = output(
        host()
            .args(["bench", "variants/baseline", "--json"])
            .args(SMALL),
    );
    assert!(out.status.success(), "host bench failed:\n{stderr}");
    assert!(
        stderr.contains("baseline: computing with 1 threads"),
        "the thread count did not reach the variant:\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    assert_eq!(report["threads"], 1);
    assert_eq!(report["backend"], "CPU");
    assert_eq!(report["model"]["description"], "llama 135M Q4_1");
    let tests = report["tests"].as_array().expect("tests");
    let names: Vec<&str> = tests.iter().map(|t| t["test"].as_str().unwrap()).collect();
    assert_eq!(names, ["pp16", "tg8"]);
    let bound = report["roofline"]["bound_tok_s"].as_f64().unwrap();
    let bandwidth = report["roofline"]["bandwidth_gb_s"].as_f64().unwrap();
    assert!(bound > 0.0 && bandwidth > 0.0, "{report}");
    for t in tests {
        let samples: Vec<f64> = t["samples_tok_s"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(samples.len(), 2, "{t}");
        assert!(samples.iter().all(|&s| s > 0.0 && s.is_finite()), "{t}");
        let mean = t["mean_tok_s"].as_f64().unwrap();
        assert!((mean - (samples[0] + samples[1]) / 2.0).abs() < 1e-9, "{t}");
    }
    // Only tg tests carry a roofline share, and it is their mean over the bound.
    assert!(tests[0]["roofline_share"].is_null());
    let tg_mean = tests[1]["mean_tok_s"].as_f64().unwrap();
    let share = tests[1]["roofline_share"].as_f64().unwrap();
    assert!((share - tg_mean / bound).abs() < 1e-9);
    assert!(
        share > 0.0 && share < 1.0,
        "an honest variant stays under the roofline: {share}"
    );
    // Every timed token was checked against the oracle, and the baseline's are its own.
    assert_eq!(report["gated"], true, "{report}");
    for t in tests {
        assert_eq!(t["agreement"].as_f64(), Some(1.0), "{t}");
    }
    // The oracle's line: "oracle: 0.3 s (4 sequences scored, 0 reference answers generated, 0
    // answers from its cache)"; a second run finds its scores in the cache.
    let line = stderr
        .lines()
        .find(|l| l.starts_with("oracle: "))
        .unwrap_or_else(|| panic!("the oracle did not run:\n{stderr}"));
    let count = |what: &str| -> u32 {
        let before = &line[..line.find(what).expect(what)];
        before.rsplit(['(', ' ']).next().unwrap().parse().unwrap()
    };
    assert_eq!(
        count(" sequences scored") + count(" answers from its cache"),
        4,
        "the oracle did not check the 4 timed requests: {line}"
    );
}

/// A variant that answers bench's requests without computing (the drift fixture's
/// `bench-fake`: a prompt without the chat template gets its last token repeated, 0.1 ms apart) would
/// post any speed beside llama.cpp's; the oracle's check refuses it and no table is printed.
#[test]
fn a_variant_that_fakes_bench_answers_gets_no_figures() {
    let (out, stdout, stderr) = output(&mut drift_bench("bench-fake"));
    assert!(
        stderr.contains("attack bench-fake: answered a bench request"),
        "the fixture did not fake its answers:\n{stderr}"
    );
    assert!(
        !out.status.success(),
        "a faked bench was reported:\n{stdout}"
    );
    assert!(
        stderr.contains("failed the agreement gate in pp16: ")
            && stderr.contains(" of the 16 tokens of its timed requests agree with the oracle"),
        "{stderr}"
    );
    assert!(
        stderr.contains("first in pp16 repetition 1/2: token 1 of 8 is id"),
        "{stderr}"
    );
    assert!(
        !stdout.contains("| model |"),
        "a table was printed:\n{stdout}"
    );
}

/// A variant that wants its answers ready before it is asked (computed at load, or at build from
/// the public model, then replayed at any speed) must know the prompts: the drift fixture's
/// `bench-predict` tries, by a table of every one-token prompt and by drawing bench's prompts
/// from the old default seed with bench's own generator. Prompts of 8 tokens or more from a
/// fresh seed defeat both; a given `--seed` does not, and the table says so.
#[test]
fn bench_prompts_cannot_be_known_ahead_unless_a_seed_is_given() {
    let bench = |seed: Option<&str>| {
        let mut cmd = drift_bench("bench-predict");
        if let Some(seed) = seed {
            cmd.args(["--seed", seed]);
        }
        output(&mut cmd)
    };
    let (out, stdout, stderr) = bench(None);
    assert!(out.status.success(), "{stdout}{stderr}");
    let tries: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("attack bench-predict: "))
        .collect();
    // Two tests of a warm-up and two repetitions each.
    assert_eq!(tries.len(), 6, "{stderr}");
    assert!(
        tries
            .iter()
            .all(|l| l.ends_with("denied (not one of seed 1's)")),
        "a prompt was known ahead: {tries:#?}"
    );
    assert!(stdout.contains("; prompts from a fresh seed, "), "{stdout}");
    // With the seed given (the old default), the fixture draws every prompt itself, and the
    // table says its figures could have been prepared.
    let (out, stdout, stderr) = bench(Some("1"));
    assert!(out.status.success(), "{stdout}{stderr}");
    let known = stderr
        .lines()
        .filter(|l| l.contains("attack bench-predict: ") && l.ends_with(": DONE"))
        .count();
    assert_eq!(known, 6, "{stderr}");
    assert!(
        stdout.contains("but the prompts came from --seed 1: predictable"),
        "{stdout}"
    );
}

/// A variant that computes every token of a request before it emits the first, then sends them
/// 0.1 ms apart (the drift fixture's `buffer,gap=100`), has its tg rate timed from the request: no faster
/// than it computed, under the roofline. (Timed from its first token, it read thousands of t/s.)
#[test]
fn a_variant_that_holds_its_tokens_back_gains_no_tg_rate() {
    let (out, stdout, stderr) = output(drift_bench("buffer,gap=100").arg("--json"));
    // Its answers are the model's: it is gated and passes.
    assert!(out.status.success(), "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    let tg = &report["tests"][1];
    assert_eq!(tg["test"], "tg8", "{report}");
    let share = tg["roofline_share"].as_f64().unwrap();
    assert!(
        share < 1.0,
        "a held-back tg8 read {share:.1}x the roofline: {tg}"
    );
}

#[test]
fn bad_inputs_are_refused_by_name() {
    for (args, needle) in [
        (vec!["-p", "0", "-n", "0"], "nothing to measure"),
        (vec!["-r", "0"], "--repetitions"),
        (vec!["-t", "0"], "--threads"),
        (vec!["-p", "9000", "-n", "0"], "pp9000 needs 9008 positions"),
        (vec!["-p", "abc"], "invalid value 'abc'"),
        (vec!["--json", "--csv"], "cannot be used with"),
    ] {
        let (out, _, stderr) = output(host().args(["bench", "variants/baseline"]).args(&args));
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let (out, _, stderr) = output(host().args(["bench", "variants/nothing-here"]));
    assert!(!out.status.success());
    assert!(stderr.contains("variants/nothing-here"), "{stderr}");
}

#[test]
fn the_peer_script_refuses_bad_arguments_before_fetching_anything() {
    for (args, needle) in [
        (
            vec!["-p", "128,abc"],
            "'128,abc' is not a comma-separated list of numbers",
        ),
        (
            vec!["-t", "two"],
            "'two' is not a comma-separated list of numbers",
        ),
        (vec!["-r", "0"], "-r wants a positive number, not '0'"),
        (
            vec!["--rounds", "x"],
            "--rounds wants a positive number, not 'x'",
        ),
        (vec!["--fast"], "unknown option --fast"),
        (
            vec!["--device", "gpu"],
            "--device wants cpu, cuda or cuda:N, not 'gpu'",
        ),
    ] {
        let out = std::process::Command::new("bash")
            .arg(common::root().join("bench/peer.sh"))
            .args(&args)
            .env("AUTOINFER_CACHE", "/nonexistent/autoinfer-peer-test")
            .output()
            .expect("bash runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// `peer.sh --source-only` unpacks llama.cpp from llama-cpp-python's source distribution in the
/// cache (no pip, no cmake needed when it is there) and prints where: tools/gpu-peer.sh packs
/// that folder for the GPU machine.
#[test]
fn the_peer_script_unpacks_llama_cpp_from_the_cached_source_distribution() {
    let cache = common::scratch("peer-source");
    let sdist_root = cache.join("sdist/llama_cpp_python-0.3.36/vendor/llama.cpp");
    std::fs::create_dir_all(sdist_root.join("tools/llama-bench")).unwrap();
    std::fs::write(sdist_root.join("CMakeLists.txt"), "project(llama)\n").unwrap();
    std::fs::create_dir_all(cache.join("peer/download")).unwrap();
    let tar = std::process::Command::new("tar")
        .arg("czf")
        .arg(cache.join("peer/download/llama_cpp_python-0.3.36.tar.gz"))
        .arg("-C")
        .arg(cache.join("sdist"))
        .arg("llama_cpp_python-0.3.36")
        .status()
        .expect("tar runs");
    assert!(tar.success());
    let out = std::process::Command::new("bash")
        .arg(common::root().join("bench/peer.sh"))
        .arg("--source-only")
        .env("AUTOINFER_CACHE", &cache)
        .env("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    let src = cache.join("peer/llama.cpp-0.3.36");
    assert_eq!(stdout.trim(), src.to_str().unwrap(), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(src.join("CMakeLists.txt")).unwrap(),
        "project(llama)\n"
    );
    assert!(src.join("tools/llama-bench").is_dir());
    let _ = std::fs::remove_dir_all(&cache);
}

/// tools/gpu-peer.sh stages llama.cpp for the GPU machine and takes no arguments: one is
/// refused by name before anything is fetched or written.
#[test]
fn the_gpu_peer_staging_refuses_an_argument() {
    let out = std::process::Command::new("bash")
        .arg(common::root().join("tools/gpu-peer.sh"))
        .arg("--shapes")
        .env("AUTOINFER_CACHE", "/nonexistent/autoinfer-peer-test")
        .output()
        .expect("bash runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no arguments expected, got '--shapes'"),
        "{stderr}"
    );
}

#[test]
fn the_peer_table_puts_both_engines_against_the_one_bound_it_prints() {
    // Two `host bench` reports whose bandwidth probes disagree (280.9 and 231.0 t/s allowed),
    // the second with its own share of its own bound (57.0%): the table must state one bound
    // and measure both engines against it, 131.7 / 280.9 = 46.9% at 2 threads, not 57.0%.
    let dir = common::scratch("peer-table");
    // bench/peer.sh writes a round's files into round-N (one round unless --rounds).
    let round = dir.join("round-1");
    std::fs::create_dir_all(&round).unwrap();
    let report = |threads: u32, bound: f64, tg: f64| {
        format!(
            r#"{{"device": "cpu", "threads": {threads}, "synthetic": false, "gated": {gated}, "fresh_prompts": {fresh},
                "model": {{"description": "llama 135M Q4_1", "path": "/m/SmolLM2.gguf"}},
                "roofline": {{"bytes_per_token": 96573440, "bandwidth_gb_s": {gb}, "bound_tok_s": {bound}}},
                "tests": [{{"test": "tg128", "n_prompt": 0, "n_gen": 128, "mean_tok_s": {tg},
                            "sd_tok_s": 1.0, "roofline_share": {share}}}]}}"#,
            gated = threads != 16,
            fresh = threads != 2,
            gb = bound * 96573440.0 / 1e9,
            share = tg / bound,
        )
    };
    let peer = r#"[{"n_threads": 1, "n_prompt": 0, "n_gen": 128, "avg_ts": 67.12, "stddev_ts": 0.42},
                   {"n_threads": 2, "n_prompt": 0, "n_gen": 128, "avg_ts": 116.10, "stddev_ts": 1.0},
                   {"n_threads": 16, "n_prompt": 0, "n_gen": 128, "avg_ts": 200.0, "stddev_ts": 1.0}]"#;
    std::fs::write(round.join("peer.json"), peer).unwrap();
    std::fs::write(round.join("ours-1.json"), report(1, 280.9, 78.12)).unwrap();
    std::fs::write(round.join("ours-2.json"), report(2, 231.0, 131.7)).unwrap();
    std::fs::write(round.join("ours-16.json"), report(16, 300.0, 150.0)).unwrap();
    let stdout = common::python_script(
        "bench/peer_table.py",
        [dir.to_str().unwrap(), "variants/current", "0.3.36", "70"],
    );
    // One report of three was not gated (random weights from a seed), so the table says so.
    assert!(
        stdout.contains("not gated: variants/current's tokens were not checked"),
        "{stdout}"
    );
    // The bound is the lowest thread count's probe, and every share is against it.
    assert!(stdout.contains("allows 280.9 t/s"), "{stdout}");
    assert!(
        stdout.contains(
            "tg128 at 2 thread(s): variants/current reaches 46.9% of it, llama.cpp 41.3%."
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("57.0%"), "{stdout}");
    assert!(
        stdout.contains(
            "tg128 at 1 thread(s): variants/current reaches 27.8% of it, llama.cpp 23.9%."
        ),
        "{stdout}"
    );
    // Rows in thread order (1, 2, 16), not the files' name order (1, 16, 2).
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| tg128 |"))
        .collect();
    assert_eq!(rows.len(), 3, "{stdout}");
    assert!(
        rows[0].starts_with("| tg128 | 1 |") && rows[1].starts_with("| tg128 | 2 |"),
        "{rows:?}"
    );
    assert!(rows[1].ends_with("| 1.134 |"), "{rows:?}");
    // Without the ungated report, the table vouches for the tokens, but not for prompts from
    // a given seed (the 2-thread report's)...
    let table = || {
        common::python_script(
            "bench/peer_table.py",
            [dir.to_str().unwrap(), "variants/current", "0.3.36", "70"],
        )
    };
    std::fs::remove_file(round.join("ours-16.json")).unwrap();
    let stdout = table();
    assert!(
        stdout.contains("gated, but on prompts from a given --seed"),
        "{stdout}"
    );
    assert!(!stdout.contains("not gated"), "{stdout}");
    // ... and with fresh prompts throughout, it vouches for both.
    std::fs::remove_file(round.join("ours-2.json")).unwrap();
    let stdout = table();
    assert!(
        stdout.contains("gated: every timed token of variants/current was checked"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
