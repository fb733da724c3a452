//! Ctrl-C and SIGTERM during a measurement: every worker stops, what was measured is recorded
//! with the status `interrupted`, the host exits 130, and no process is left behind.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{build_plain, fixture, host, records, root, scratch, tiny_model};

/// The PIDs of `pid`'s children now (every thread's, from /proc).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out
}

/// Whether process `pid` still exists (a zombie counts as gone: it runs nothing).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
            state != Some('Z')
        })
        .unwrap_or(false)
}

/// Starts `cmd` in a process group of its own, waits until its stderr shows `after` and it has
/// a worker, sends `signal` to `target` ("host" or "group", as a terminal's Ctrl-C does), and
/// returns its exit code, its stderr and the workers it had.
fn interrupt(mut cmd: Command, after: &str, signal: &str, target: &str) -> (i32, String, Vec<u32>) {
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("the host binary runs");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    let started = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(line) if line.contains(after) => break,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("no {after:?} within 300 s: {}", reader.join().unwrap());
            }
        }
    }
    // The next request's workers are up within moments of the line that ended the last one.
    let mut workers = children(pid);
    while workers.is_empty() && started.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(20));
        workers = children(pid);
    }
    assert!(!workers.is_empty(), "the host has no worker to stop");
    let to = match target {
        "group" => format!("-{pid}"),
        _ => pid.to_string(),
    };
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), "--", &to])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait works") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the host did not stop within 60 s of SIG{signal}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = reader.join().expect("the reader ends with the host");
    (status.code().unwrap_or(-1), err, workers)
}

/// The JSON record a row names.
fn record_of(
    results: &Path,
    row: &std::collections::BTreeMap<String, String>,
) -> serde_json::Value {
    let text = std::fs::read_to_string(results.join("runs").join(&row["json"]))
        .expect("the row's JSON record exists");
    serde_json::from_str(&text).expect("the record is JSON")
}

/// Checks what every interrupted command must leave: exit 130, the word in its message, no
/// worker alive, and one row with the status `interrupted`; returns that row's JSON record.
fn assert_interrupted(results: &Path, code: i32, err: &str, workers: &[u32]) -> serde_json::Value {
    assert_eq!(code, 130, "an interrupted command exits 130: {err}");
    assert!(err.contains("interrupted"), "{err}");
    for pid in workers {
        assert!(!alive(*pid), "worker {pid} outlived the host: {err}");
    }
    let rows = records(results);
    assert_eq!(rows.len(), 1, "one row: {rows:?}");
    assert_eq!(rows[0]["status"], "interrupted", "{:?}", rows[0]);
    record_of(results, &rows[0])
}

#[test]
fn sigterm_during_a_run_records_what_was_measured_and_stops_the_worker() {
    build_plain();
    let results = scratch("interrupt-run");
    let mut cmd = host();
    cmd.arg("run")
        .arg(fixture("drift"))
        .args(["--no-build", "--rounds", "50", "--max-new-tokens", "32"])
        .arg("--model")
        .arg(tiny_model())
        .arg("--results")
        .arg(&results)
        .env("AUTOINFER_FIXTURE_MODE", "sleep")
        .env("CARGO_TARGET_DIR", root().join("target"));
    let (code, err, workers) = interrupt(cmd, "round 2/50", "TERM", "host");
    let record = assert_interrupted(&results, code, &err, &workers);
    let samples = record["samples"].as_array().expect("samples are recorded");
    assert!(
        samples.len() >= 2,
        "the requests of round 1 and more are kept: {}",
        samples.len()
    );
}

#[test]
fn ctrl_c_during_a_comparison_records_its_pairs_and_stops_both_workers() {
    build_plain();
    let results = scratch("interrupt-compare");
    let mut cmd = host();
    cmd.arg("compare")
        .arg("variants/baseline")
        .arg(fixture("drift"))
        .args([
            "--no-build",
            "--prompt",
            "code",
            "--max-new-tokens",
            "32",
            "--looks",
            "6",
            "--rounds-per-look",
            "4",
        ])
        .arg("--model")
        .arg(tiny_model())
        .arg("--results")
        .arg(&results)
        .env("AUTOINFER_FIXTURE_MODE", "sleep")
        .env("CARGO_TARGET_DIR", root().join("target"));
    // The second pair's B request: its two workers are up.
    let (code, err, workers) = interrupt(cmd, "B prompt \"code\" round 2", "INT", "group");
    let record = assert_interrupted(&results, code, &err, &workers);
    let pairs = record["pairs"].as_array().expect("pairs are recorded");
    assert!(!pairs.is_empty(), "the measured pairs are kept");
}
