//! The experiment log: one row per run appended to `results/results.tsv`, and one JSON file per
//! run with every raw sample.
//!
//! Rows are written with a single `write` on a file opened for appending and then synced, and
//! JSON files are written to a temporary name and renamed, so a crash can lose at most the run
//! in progress, never an earlier row. Appends hold `results.lock` exclusively ([`lock`]), so two
//! commands finishing at once in one checkout never interleave rows or both write the header.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::harness::protocol::Protocol;
use crate::measure::sample::Summary;
use crate::quality::GateReport;

/// Which prompts a run covered: a partial run (`--prompt`) says so in its row.
pub struct Scope<'a> {
    pub prompts: &'a [String],
    pub all_prompts: bool,
}

/// The columns of `results.tsv`, in order.
pub const COLUMNS: [&str; 35] = [
    "time",
    "commit",
    "variant",
    "variant_tree",
    "harness",
    "sandbox",
    "model",
    "machine",
    "device",
    "rounds",
    "max_new_tokens",
    "seed",
    "prompts",
    "prefill_tok_s",
    "decode_tok_s",
    "decode_iqr_pct",
    "ttft_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "peak_rss_mib",
    "checks_passed",
    "checks_baseline",
    "agreement",
    "ppl_ratio",
    "repetition",
    "repetition_baseline",
    "gates",
    "against",
    "against_tree",
    "compare_rounds",
    "decode_ratio",
    "verdict",
    "status",
    "description",
    "json",
];

/// What a comparison adds to its row (`host run` rows leave these columns `-`).
pub struct Compared<'a> {
    /// Variant A as given.
    pub against: &'a str,
    pub against_tree: &'a str,
    pub rounds: u32,
    /// The decode rate's paired statistics (B/A), at the decision's alpha.
    pub decode: Option<&'a crate::stats::significance::Paired>,
    /// KEEP, REVERT, NOISE (SCREEN-... for a screen), or `-` when the comparison failed.
    pub verdict: &'a str,
}

/// Where the run's code and machine came from.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub time: String,
    pub commit: String,
    pub variant_dir: String,
    pub variant_package: String,
    pub variant_tree: String,
    pub harness: String,
    pub model_path: String,
    pub model_sha256: String,
    pub machine: String,
    pub device: String,
    /// What of the harness differed from HEAD (empty: the committed one ran).
    pub harness_modified: Vec<String>,
    /// How the variant code of the measurement was confined ([`crate::sandbox::Level`]).
    pub sandbox: crate::sandbox::Level,
}

/// A one-line description of this machine: host name, CPU model, logical CPUs.
pub fn machine() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{host} ({cpu}, {cpus} CPUs)")
}

/// The first 12 hex digits of a hash: enough to tell runs apart in a table.
fn short(hash: &str) -> String {
    hash.chars().take(12).collect()
}

fn clean(field: &str) -> String {
    field.replace(['\t', '\n', '\r'], " ")
}

/// Writes `value` as pretty JSON to `dir/<stem>.json` (atomically) and returns its path.
pub fn write_json<T: Serialize>(dir: &Path, stem: &str, value: &T) -> Result<PathBuf> {
    let runs = dir.join("runs");
    fs::create_dir_all(&runs).with_context(|| format!("cannot create {}", runs.display()))?;
    let path = runs.join(format!("{stem}.json"));
    let tmp = runs.join(format!(".{stem}.json.tmp"));
    let text = serde_json::to_string_pretty(value)?;
    fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, &path)
        .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    Ok(path)
}

/// The row for one run (`summary` is `None` when the run failed before any figure, `gates`
/// when it was not gated).
#[allow(clippy::too_many_arguments)]
pub fn row(
    p: &Provenance,
    protocol: &Protocol,
    scope: &Scope,
    summary: Option<&Summary>,
    gates: Option<&GateReport>,
    compared: Option<&Compared>,
    status: &str,
    description: &str,
    json: &Path,
) -> Vec<String> {
    let f = |v: Option<f64>, digits: usize| {
        v.map(|v| format!("{v:.digits$}"))
            .unwrap_or_else(|| "-".into())
    };
    let o = summary.map(|s| &s.overall);
    let g = gates.map(|r| &r.overall);
    vec![
        p.time.clone(),
        p.commit.clone(),
        p.variant_dir.clone(),
        short(&p.variant_tree),
        if p.harness_modified.is_empty() {
            short(&p.harness)
        } else {
            // Loud, and never equal to a committed harness's hash.
            format!(
                "modified-{}",
                short(p.harness.trim_start_matches("modified-"))
            )
        },
        p.sandbox.label(),
        short(&p.model_sha256),
        p.machine.clone(),
        p.device.clone(),
        protocol.rounds.to_string(),
        protocol.max_new_tokens.to_string(),
        protocol.seed.to_string(),
        if scope.all_prompts {
            "all".into()
        } else {
            scope.prompts.join(",")
        },
        f(o.and_then(|o| o.prefill_tok_s.map(|s| s.median)), 1),
        f(o.and_then(|o| o.decode_tok_s.map(|s| s.median)), 2),
        f(o.and_then(|o| o.decode_tok_s.map(|s| s.iqr_percent())), 1),
        f(o.and_then(|o| o.ttft_ms.map(|s| s.median)), 1),
        f(o.and_then(|o| o.itl_p50_ms.map(|s| s.median)), 2),
        f(o.and_then(|o| o.itl_p99_ms.map(|s| s.median)), 2),
        f(o.and_then(|o| o.peak_rss_mib.map(|s| s.max)), 1),
        o.map(|o| format!("{}/{}", o.checks_passed, o.checks_total))
            .unwrap_or_else(|| "-".into()),
        g.map(|g| format!("{}/{}", g.reference_checks_passed, g.checks_total))
            .unwrap_or_else(|| "-".into()),
        f(g.map(|g| g.agreement), 4),
        f(g.map(|g| g.perplexity_ratio), 4),
        f(g.map(|g| g.repetition), 3),
        f(g.map(|g| g.reference_repetition), 3),
        match gates {
            None => "-".into(),
            Some(r) if r.passed() => "pass".into(),
            Some(r) => format!(
                "fail: {}",
                r.failures
                    .iter()
                    .map(|f| format!("{} {}", f.prompt, f.gate))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        },
        compared.map_or("-".into(), |c| c.against.to_string()),
        compared.map_or("-".into(), |c| short(c.against_tree)),
        compared.map_or("-".into(), |c| c.rounds.to_string()),
        compared.and_then(|c| c.decode).map_or("-".into(), |d| {
            format!("{:.4} [{:.4}, {:.4}]", d.ratio, d.ci.0, d.ci.1)
        }),
        compared.map_or("-".into(), |c| c.verdict.to_string()),
        status.to_string(),
        description.to_string(),
        json.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    ]
    .iter()
    .map(|s| clean(s))
    .collect()
}

/// Appends `fields` as one row of `dir/results.tsv`, writing the header first if the file is new.
pub fn append_row(dir: &Path, fields: &[String]) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _lock = lock(dir)?;
    let path = dir.join("results.tsv");
    set_aside_old_layout(&path)?;
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {} for appending", path.display()))?;
    let mut text = String::new();
    if file.metadata()?.len() == 0 {
        text.push_str(&COLUMNS.join("\t"));
        text.push('\n');
    }
    text.push_str(&fields.join("\t"));
    text.push('\n');
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot append to {}", path.display()))?;
    file.sync_all()?;
    Ok(path)
}

/// Takes `dir/results.lock` exclusively (waiting while another process holds it); the lock is
/// released when the returned file is dropped, or when the process ends however it ends.
pub fn lock(dir: &Path) -> Result<fs::File> {
    let path = dir.join("results.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the ledger's lock {}", path.display()))?;
    file.lock()
        .with_context(|| format!("cannot lock the ledger's lock {}", path.display()))?;
    Ok(file)
}

/// The rows of `dir/results.tsv`, each as column name → field (none when the file is absent).
pub fn read_rows(dir: &Path) -> Result<Vec<std::collections::BTreeMap<String, String>>> {
    let path = dir.join("results.tsv");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split('\t').collect();
    Ok(lines
        .map(|l| {
            header
                .iter()
                .zip(l.split('\t'))
                .map(|(h, f)| (h.to_string(), f.to_string()))
                .collect()
        })
        .collect())
}

/// A `results.tsv` whose header is not today's [`COLUMNS`] (written by an older host) is renamed
/// to `results-<its header's hash>.tsv` so that rows of two layouts never share a file.
fn set_aside_old_layout(path: &Path) -> Result<()> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    let header = text.lines().next().unwrap_or("");
    if header.is_empty() || header == COLUMNS.join("\t") {
        return Ok(());
    }
    let hash = crate::hashing::sha256_hex(header.as_bytes());
    let aside = path.with_file_name(format!("results-{}.tsv", &hash[..8]));
    fs::rename(path, &aside).with_context(|| {
        format!(
            "{} has an older column layout and cannot be moved aside",
            path.display()
        )
    })?;
    eprintln!(
        "note: {} had an older column layout; it was moved to {}",
        path.display(),
        aside.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With `AUTOINFER_LEDGER_CHILD` set, this test is the child of
    /// `a_second_process_waits_for_the_ledger_lock`: it says it is ready, then appends a row.
    #[test]
    fn a_second_process_waits_for_the_ledger_lock() {
        if let Some(dir) = std::env::var_os("AUTOINFER_LEDGER_CHILD") {
            println!("ready");
            let fields: Vec<String> = (0..COLUMNS.len()).map(|i| format!("child{i}")).collect();
            append_row(Path::new(&dir), &fields).unwrap();
            return;
        }
        let dir = std::env::temp_dir().join(format!("autoinfer-lock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let held = lock(&dir).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ledger::record::tests::a_second_process_waits_for_the_ledger_lock",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("AUTOINFER_LEDGER_CHILD", &dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("ready") {
            line.clear();
            let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            assert!(n > 0, "the child ended before it was ready");
        }
        // The child is at the lock: while it is held, nothing of its row may appear.
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child did not wait"
        );
        assert!(!dir.join("results.tsv").exists());
        drop(held);
        assert!(child.wait().unwrap().success());
        let text = fs::read_to_string(dir.join("results.tsv")).unwrap();
        assert_eq!(
            text.lines().count(),
            2,
            "one header and the child's row: {text}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn appends_rows_under_one_header() {
        let dir = std::env::temp_dir().join(format!("autoinfer-record-{}", std::process::id()));
        let row = |s: &str| {
            (0..COLUMNS.len())
                .map(|i| format!("{s}{i}"))
                .collect::<Vec<_>>()
        };
        append_row(&dir, &row("a")).unwrap();
        let path = append_row(&dir, &row("b")).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("time\tcommit"));
        assert!(lines[1].starts_with("a0\ta1"));
        assert_eq!(lines[2].split('\t').count(), COLUMNS.len());
        assert_eq!(clean("b\tc\nd"), "b c d");
        // A file of another layout is set aside, not appended to.
        fs::write(&path, "time\tcommit\nx\ty\n").unwrap();
        append_row(&dir, &row("c")).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        let rows = read_rows(&dir).unwrap();
        assert_eq!((rows.len(), rows[0]["time"].as_str()), (1, "c0"));
        let aside: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("results-"))
            .collect();
        assert_eq!(aside.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
