//! One line of `results/results.tsv`, typed: [`ResultsRow`], with the run's [`Status`] and the
//! comparison's [`Verdict`] as enums, read and written with serde (csv, tab-separated, no
//! quoting). Reading checks the header against [`COLUMNS`] and every field against its type, so a
//! row nothing wrote (a hand edit, an older host's layout) is an error that names its line.
//!
//! Rows are written with a single `write` on a file opened for appending and then synced, while
//! holding `results.lock` ([`lock`]): two commands finishing at once in one checkout never
//! interleave rows or both write the header, and a crash can lose at most the row in progress.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

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

/// How a run or comparison ended, as its row records it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Measured and, on the real model, passed every gate.
    #[default]
    Ok,
    /// A quality gate failed.
    Rejected,
    /// Faster than the memory-bandwidth roofline allows: not a result.
    Suspect,
    /// On a synthetic model written from a seed: no gates, never kept.
    Synthetic,
    /// A build, a worker or the oracle failed (the JSON record holds the error).
    Failed,
    /// Stopped by Ctrl-C or SIGTERM; what was measured until then is recorded.
    Interrupted,
}

impl Status {
    /// The word in the row.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Rejected => "rejected",
            Status::Suspect => "suspect",
            Status::Synthetic => "synthetic",
            Status::Failed => "failed",
            Status::Interrupted => "interrupted",
        }
    }
}

/// A comparison's verdict as recorded: a full comparison's, or a screen's (never kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    #[serde(rename = "KEEP")]
    Keep,
    #[serde(rename = "REVERT")]
    Revert,
    #[serde(rename = "NOISE")]
    Noise,
    #[serde(rename = "SCREEN-KEEP")]
    ScreenKeep,
    #[serde(rename = "SCREEN-REVERT")]
    ScreenRevert,
    #[serde(rename = "SCREEN-NOISE")]
    ScreenNoise,
}

impl Verdict {
    /// The word in the row (`KEEP`, `SCREEN-NOISE`, ...).
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Keep => "KEEP",
            Verdict::Revert => "REVERT",
            Verdict::Noise => "NOISE",
            Verdict::ScreenKeep => "SCREEN-KEEP",
            Verdict::ScreenRevert => "SCREEN-REVERT",
            Verdict::ScreenNoise => "SCREEN-NOISE",
        }
    }

    /// A screen's verdict: a first look, never kept and never drawn as an experiment.
    pub fn is_screen(self) -> bool {
        matches!(
            self,
            Verdict::ScreenKeep | Verdict::ScreenRevert | Verdict::ScreenNoise
        )
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// `-` in the row for `None` (a run, or a comparison that failed before its verdict).
mod dash {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => v.serialize(s),
            None => s.serialize_str("-"),
        }
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: serde::de::DeserializeOwned,
    {
        let text = String::deserialize(d)?;
        if text == "-" {
            return Ok(None);
        }
        T::deserialize(serde::de::value::StrDeserializer::<D::Error>::new(&text)).map(Some)
    }
}

/// One row of `results.tsv`: one `host run` or `host compare`. The columns are [`COLUMNS`], in
/// this order; figures are kept as the text the row shows (`-` when absent).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResultsRow {
    pub time: String,
    pub commit: String,
    pub variant: String,
    pub variant_tree: String,
    pub harness: String,
    pub sandbox: String,
    pub model: String,
    pub machine: String,
    pub device: String,
    pub rounds: String,
    pub max_new_tokens: String,
    pub seed: String,
    pub prompts: String,
    pub prefill_tok_s: String,
    pub decode_tok_s: String,
    pub decode_iqr_pct: String,
    pub ttft_ms: String,
    pub itl_p50_ms: String,
    pub itl_p99_ms: String,
    pub peak_rss_mib: String,
    pub checks_passed: String,
    pub checks_baseline: String,
    pub agreement: String,
    pub ppl_ratio: String,
    pub repetition: String,
    pub repetition_baseline: String,
    pub gates: String,
    pub against: String,
    pub against_tree: String,
    pub compare_rounds: String,
    pub decode_ratio: String,
    #[serde(with = "dash")]
    pub verdict: Option<Verdict>,
    pub status: Status,
    pub description: String,
    pub json: String,
}

impl ResultsRow {
    /// The row with every text field's tabs and line breaks made spaces, so it stays one line.
    pub fn cleaned(mut self) -> ResultsRow {
        for field in [
            &mut self.time,
            &mut self.commit,
            &mut self.variant,
            &mut self.machine,
            &mut self.device,
            &mut self.prompts,
            &mut self.gates,
            &mut self.against,
            &mut self.description,
            &mut self.json,
        ] {
            *field = clean(field);
        }
        self
    }

    /// The row as one line of the file (no line break).
    fn line(&self) -> Result<String> {
        let mut writer = csv::WriterBuilder::new()
            .delimiter(b'\t')
            .has_headers(false)
            .quote_style(csv::QuoteStyle::Never)
            .from_writer(Vec::new());
        writer.serialize(self)?;
        let bytes = writer.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(String::from_utf8(bytes)?.trim_end_matches('\n').to_string())
    }
}

/// Tabs and line breaks as spaces.
fn clean(field: &str) -> String {
    field.replace(['\t', '\n', '\r'], " ")
}

/// Appends `row` to `dir/results.tsv`, writing the header first if the file is new.
pub fn append_row(dir: &Path, row: &ResultsRow) -> Result<PathBuf> {
    let line = row.clone().cleaned().line()?;
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
    text.push_str(&line);
    text.push('\n');
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot append to {}", path.display()))?;
    file.sync_all()?;
    Ok(path)
}

/// Takes `dir/results.lock` exclusively (waiting while another process holds it); the lock is
/// released when the returned file is dropped, or when the process ends however it ends.
fn lock(dir: &Path) -> Result<fs::File> {
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

/// The rows of `dir/results.tsv` (none when the file is absent). Its header must be
/// [`COLUMNS`] and every row must parse; an error names the file and the line.
pub fn read_rows(dir: &Path) -> Result<Vec<ResultsRow>> {
    let path = dir.join("results.tsv");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let header = text.lines().next().unwrap_or("");
    if header != COLUMNS.join("\t") {
        bail!(
            "{} has other columns than this host writes (an older host's file?): move it aside, \
             or append a row, which moves it to results-<hash>.tsv",
            path.display()
        );
    }
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .quoting(false)
        .has_headers(true)
        .from_reader(text.as_bytes());
    reader
        .deserialize::<ResultsRow>()
        .enumerate()
        .map(|(i, row)| {
            row.with_context(|| format!("{} line {}: not a results row", path.display(), i + 2))
        })
        .collect()
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

    fn sample(time: &str) -> ResultsRow {
        ResultsRow {
            time: time.into(),
            verdict: Some(Verdict::Keep),
            status: Status::Ok,
            description: "with \"quotes\", a\ttab and a\nline break".into(),
            ..ResultsRow::default()
        }
    }

    /// With `AUTOINFER_LEDGER_CHILD` set, this test is the child of
    /// `a_second_process_waits_for_the_ledger_lock`: it says it is ready, then appends a row.
    #[test]
    fn a_second_process_waits_for_the_ledger_lock() {
        if let Some(dir) = std::env::var_os("AUTOINFER_LEDGER_CHILD") {
            println!("ready");
            append_row(Path::new(&dir), &sample("child")).unwrap();
            return;
        }
        let dir = std::env::temp_dir().join(format!("autoinfer-lock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let held = lock(&dir).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ledger::row::tests::a_second_process_waits_for_the_ledger_lock",
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
        let rows = read_rows(&dir).unwrap();
        assert_eq!(rows.len(), 1, "the child's row");
        assert_eq!(rows[0].time, "child");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn rows_round_trip_under_one_header_and_bad_ones_are_named() {
        let dir = std::env::temp_dir().join(format!("autoinfer-record-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        append_row(&dir, &sample("a")).unwrap();
        let run = ResultsRow {
            verdict: None,
            status: Status::Interrupted,
            ..sample("b")
        };
        let path = append_row(&dir, &run).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], COLUMNS.join("\t"));
        assert!(lines.iter().all(|l| l.split('\t').count() == COLUMNS.len()));
        assert!(lines[2].contains("\t-\tinterrupted\t"), "{}", lines[2]);
        assert!(lines[1].contains("\tKEEP\tok\twith \"quotes\", a tab and a line break\t"));
        let rows = read_rows(&dir).unwrap();
        assert_eq!(rows[0].verdict, Some(Verdict::Keep));
        assert_eq!(
            rows[0].description,
            "with \"quotes\", a tab and a line break"
        );
        assert_eq!(
            (rows[1].verdict, rows[1].status),
            (None, Status::Interrupted)
        );
        // A row nothing wrote is refused by line and field.
        let mut bad = text.clone();
        bad.push_str(&lines[1].replace("\tok\t", "\tfine\t"));
        bad.push('\n');
        fs::write(&path, &bad).unwrap();
        let err = format!("{:#}", read_rows(&dir).unwrap_err());
        assert!(err.contains("line 4") && err.contains("fine"), "{err}");
        // A file of another layout is set aside on the next append, not appended to.
        fs::write(&path, "time\tcommit\nx\ty\n").unwrap();
        assert!(read_rows(&dir).is_err());
        append_row(&dir, &sample("c")).unwrap();
        let rows = read_rows(&dir).unwrap();
        assert_eq!((rows.len(), rows[0].time.as_str()), (1, "c"));
        let aside = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("results-"))
            .count();
        assert_eq!(aside, 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// `label` and `as_str` spell what serde writes, for every variant: the two can not drift.
    #[test]
    fn labels_are_the_words_in_the_row() {
        for verdict in [
            Verdict::Keep,
            Verdict::Revert,
            Verdict::Noise,
            Verdict::ScreenKeep,
            Verdict::ScreenRevert,
            Verdict::ScreenNoise,
        ] {
            assert_eq!(word(&verdict), verdict.label());
            assert_eq!(verdict.is_screen(), verdict.label().starts_with("SCREEN-"));
        }
        for status in [
            Status::Ok,
            Status::Rejected,
            Status::Suspect,
            Status::Synthetic,
            Status::Failed,
            Status::Interrupted,
        ] {
            assert_eq!(word(&status), status.as_str());
        }
    }

    /// What serde writes for a unit variant, as a plain string.
    fn word<T: Serialize>(v: &T) -> String {
        serde_json::to_value(v)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }

    #[test]
    fn the_struct_has_the_columns_in_order() {
        let mut writer = csv::WriterBuilder::new()
            .delimiter(b'\t')
            .from_writer(Vec::new());
        writer.serialize(ResultsRow::default()).unwrap();
        let text = String::from_utf8(writer.into_inner().unwrap()).unwrap();
        assert_eq!(text.lines().next().unwrap(), COLUMNS.join("\t"));
    }
}
