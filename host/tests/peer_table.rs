//! `bench/peer_table.py` with `bench/peer.sh --rounds`: the median of the rounds' own ratios,
//! which is what a claim against llama.cpp rests on when the machine's speed moves between
//! runs. (One round's table, its bound and its gating: `tests/bench.rs`.)

mod common;

use std::path::Path;
use std::process::Command;

/// One round's files as llama-bench (`-o json`) and `host bench --json` write them, at one
/// thread: pp512 and tg128, llama.cpp at `peer` t/s and ours at `ours` t/s for both tests.
fn write_round(dir: &Path, peer: f64, ours: f64, bandwidth: f64) {
    std::fs::create_dir_all(dir).unwrap();
    let peer_rows = serde_json::json!([
        {"n_threads": 1, "n_prompt": 512, "n_gen": 0, "avg_ts": peer, "stddev_ts": 1.0, "backends": "CPU"},
        {"n_threads": 1, "n_prompt": 0, "n_gen": 128, "avg_ts": peer, "stddev_ts": 1.0, "backends": "CPU"},
    ]);
    let report = serde_json::json!({
        "threads": 1,
        "device": "cpu",
        "model": {"description": "llama 135M Q4_1", "path": "/cache/model.gguf"},
        "gated": true,
        "fresh_prompts": true,
        "synthetic": false,
        "roofline": {"bytes_per_token": 100_000_000u64, "bandwidth_gb_s": bandwidth, "bound_tok_s": 0.0},
        "tests": [
            {"test": "pp512", "n_prompt": 512, "n_gen": 0, "mean_tok_s": ours, "sd_tok_s": 2.0},
            {"test": "tg128", "n_prompt": 0, "n_gen": 128, "mean_tok_s": ours, "sd_tok_s": 2.0},
        ],
    });
    std::fs::write(dir.join("peer.json"), peer_rows.to_string()).unwrap();
    std::fs::write(dir.join("ours-1.json"), report.to_string()).unwrap();
}

/// The script's output on `work`, and whether it succeeded.
fn table(work: &Path) -> (bool, String) {
    let out = Command::new("python3")
        .arg(common::root().join("bench/peer_table.py"))
        .args([
            work.as_os_str(),
            "v".as_ref(),
            "0.3.36".as_ref(),
            "9".as_ref(),
        ])
        .output()
        .expect("python3 runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn several_rounds_give_the_median_of_their_own_ratios() {
    let work = common::scratch("peer-table-rounds");
    // Ratios 1.2, 2.0 and 1.25. The machine was slow for llama.cpp in round 2 only; the median
    // of the ratios is 1.25, where the ratio of the medians (150 / 100) would be 1.5.
    write_round(&work.join("round-1"), 100.0, 120.0, 10.0);
    write_round(&work.join("round-2"), 75.0, 150.0, 12.0);
    write_round(&work.join("round-3"), 160.0, 200.0, 8.0);
    let (ok, text) = table(&work);
    assert!(ok, "{text}");
    assert!(
        text.contains("| tg128 | 1 | 100.00 | 150.00 | 1.250 [1.200, 2.000] |"),
        "{text}"
    );
    assert!(
        text.contains(
            "| tg128 | 1 | 120.0 / 100.0 = 1.200 | 150.0 / 75.0 = 2.000 | 200.0 / 160.0 = 1.250 |"
        ),
        "{text}"
    );
    assert!(text.contains("3 rounds"), "{text}");
    // The bound from the median probe (10 GB/s), its range named.
    assert!(
        text.contains("10.0 GB/s (median of 3 rounds' probes, 8.0-12.0)"),
        "{text}"
    );
}

#[test]
fn a_round_without_its_files_is_named() {
    let work = common::scratch("peer-table-missing");
    write_round(&work.join("round-1"), 100.0, 120.0, 10.0);
    std::fs::create_dir_all(work.join("round-2")).unwrap();
    let (ok, text) = table(&work);
    assert!(!ok, "a round without files must fail: {text}");
    assert!(
        text.contains("round-2 lacks peer.json or an ours-THREADS.json"),
        "{text}"
    );
}
