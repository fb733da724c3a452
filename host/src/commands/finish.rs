//! How every measurement ends, `host run` and `host compare` alike: the quality phase (the
//! oracle scores the answers and the gates decide, [`quality_phase`]), the status it is recorded
//! with ([`status`]), and the record itself, written whatever happened ([`record`]): the JSON
//! file with every sample, then the results row.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use crate::commands::judge::judge;
use crate::commands::setup::Setup;
use crate::ledger::record::{self, Compared, Provenance, Scope};
use crate::ledger::row::Status;
use crate::measure::sample::{Sample, Summary};
use crate::quality::GateReport;
use crate::supervisor::oracle::{Oracle, OracleBuild, OracleCost};

/// What the quality phase came to: the gates (when the answers were judged) and what the oracle
/// cost (when it ran).
#[derive(Default)]
pub struct Quality {
    /// Every gate's figures and failures.
    pub gates: Option<GateReport>,
    /// The oracle's time and work.
    pub oracle: Option<OracleCost>,
}

/// Scores `samples` with the oracle of `build` and decides the gates, when `judge_them` says
/// there is something to judge (measuring succeeded, nothing was suspect, the model is real).
/// An oracle that fails turns `outcome` into an error that names `whose` answers it was
/// scoring. The oracle's worker is kept from `protect`, like the variant's.
pub fn quality_phase(
    setup: &Setup,
    build: &OracleBuild,
    protect: &[PathBuf],
    verbose: bool,
    samples: &mut [Sample],
    judge_them: bool,
    whose: &str,
    outcome: &mut Result<()>,
) -> Quality {
    if !judge_them || outcome.is_err() {
        return Quality::default();
    }
    let mut oracle = Oracle::new(
        build.clone(),
        &setup.model.path,
        setup.model.sha256(),
        setup.timeout(),
        verbose,
        protect.to_vec(),
    );
    let order = setup.order();
    let judged = judge(
        &mut oracle,
        samples,
        &setup.codec,
        &setup.prompts,
        &setup.protocol,
        &order,
    );
    let cost = Some(oracle.finish());
    match judged {
        Ok(report) => Quality {
            gates: Some(report),
            oracle: cost,
        },
        Err(e) => {
            let message = format!("the quality oracle failed on {whose}");
            *outcome = Err(e.context(message));
            Quality {
                gates: None,
                oracle: cost,
            }
        }
    }
}

/// The status a measurement is recorded with, and its error in words: `suspect` (faster than
/// memory bandwidth allows) before `synthetic` (`ungated`: random weights from a seed, nothing
/// gated) before
/// `rejected` (a gate failed); an error is `interrupted` after Ctrl-C or SIGTERM (what was
/// measured is recorded, nothing is judged) and `failed` otherwise.
pub fn status(
    outcome: &Result<()>,
    suspect: bool,
    ungated: bool,
    gates: Option<&GateReport>,
) -> (Status, Option<String>) {
    match outcome {
        Ok(()) if suspect => (Status::Suspect, None),
        Ok(()) if ungated => (Status::Synthetic, None),
        Ok(()) if gates.is_some_and(|g| !g.passed()) => (Status::Rejected, None),
        Ok(()) => (Status::Ok, None),
        Err(e) if crate::interrupt::requested() => (Status::Interrupted, Some(format!("{e:#}"))),
        Err(e) => (Status::Failed, Some(format!("{e:#}"))),
    }
}

/// What a measurement's row says beyond its record.
pub struct RowFacts<'a> {
    /// Whose measurement it is.
    pub provenance: &'a Provenance,
    /// The measured variant's summary, when it has one.
    pub summary: Option<&'a Summary>,
    /// Its gates, when it was judged.
    pub gates: Option<&'a GateReport>,
    /// For a comparison: against what, and the verdict.
    pub compared: Option<&'a Compared<'a>>,
    /// How it ended.
    pub status: Status,
    /// The user's description.
    pub description: &'a str,
}

/// Where a measurement was recorded.
pub struct Recorded {
    /// The JSON record, every sample in it.
    pub json: PathBuf,
    /// The results table the row was appended to.
    pub tsv: PathBuf,
}

/// Writes `record` as `<results>/runs/<stem>.json`, then appends its row to
/// `<results>/results.tsv` (under the ledger's lock).
pub fn record<R: Serialize>(
    results: &Path,
    stem: &str,
    record: &R,
    setup: &Setup,
    facts: &RowFacts,
) -> Result<Recorded> {
    let json = record::write_json(results, stem, record)?;
    let order = setup.order();
    let row = record::row(
        facts.provenance,
        &setup.protocol,
        &Scope {
            prompts: &order,
            all_prompts: setup.all_prompts,
        },
        facts.summary,
        facts.gates,
        facts.compared,
        facts.status,
        facts.description,
        &json,
    );
    let tsv = crate::ledger::row::append_row(results, &row)?;
    Ok(Recorded { json, tsv })
}

impl Recorded {
    /// The closing lines on stderr: what the oracle cost, and where the measurement lies.
    pub fn report(&self, oracle: Option<&OracleCost>) {
        if let Some(cost) = oracle {
            eprintln!("{}", crate::commands::judge::describe_cost(cost));
        }
        eprintln!(
            "recorded: {} (row appended), {}",
            self.tsv.display(),
            self.json.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_names_the_first_thing_that_went_wrong() {
        let ok: Result<()> = Ok(());
        let failed: Result<()> = Err(anyhow::anyhow!("worker crashed"));
        assert_eq!(status(&ok, false, false, None), (Status::Ok, None));
        assert_eq!(status(&ok, true, true, None).0, Status::Suspect);
        assert_eq!(status(&ok, false, true, None).0, Status::Synthetic);
        let (s, e) = status(&failed, true, false, None);
        assert_eq!(s, Status::Failed);
        assert_eq!(e.as_deref(), Some("worker crashed"));
    }
}
