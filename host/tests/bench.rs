//! `host bench` end to end on the real model: llama-bench's tests, the thread count reaching
//! the variant, the roofline, and every bad input refused by name.

mod common;

use common::{host, model, output};

#[test]
fn benches_the_baseline_with_one_thread() {
    model();
    let (out, stdout, stderr) = output(host().args([
        "bench",
        "variants/baseline",
        "-p",
        "16",
        "-n",
        "8",
        "-r",
        "2",
        "-t",
        "1",
        "--json",
        "-v",
    ]));
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
}

#[test]
fn bad_inputs_are_refused_by_name() {
    for (args, needle) in [
        (vec!["-p", "0", "-n", "0"], "nothing to measure"),
        (vec!["-r", "0"], "--repetitions"),
        (vec!["-t", "0"], "--threads"),
        (vec!["-p", "9000", "-n", "0"], "pp9000 needs 9001 positions"),
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
