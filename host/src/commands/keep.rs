//! `host keep` and `host revert`: the git half of the optimisation loop.
//!
//! [`keep`] commits `variants/current` alone, and only when `results/results.tsv` holds a
//! comparison of exactly its present content against the last kept one (`host compare` with no
//! arguments), made under the present harness, whose verdict is KEEP; or NOISE when the change
//! is a simplification (it deletes more lines than it adds) and `--simpler` says so. A KEEP on a
//! synthetic model (a change aimed at the 1B or 8B shapes) also needs a comparison of the same
//! content on the default model whose verdict is KEEP or NOISE: nothing the loop's default model
//! guards (decode, prefill, TTFT, peak memory, ITL p99) may be worse for it. The two may come in
//! either order; each model's newest comparison of the change is the one that counts, and a
//! verdict drawn again after another on the same model (or shape) is refused
//! ([`no_other_draw`]). The commit message carries the comparison's figures. [`revert`] puts
//! `variants/current` back as the last commit has it, deleting files added since. Both touch
//! nothing outside `variants/current`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::commands::compare::figures::FigureCall;
use crate::commands::compare::keep_rule::{self, Outcome};
use crate::harness::{CURRENT, LOCK};
use crate::ledger::record::ModelKind;
use crate::ledger::row::{read_rows, ResultsRow, Status, Verdict};
use crate::quality::GateFailure;
use crate::sandbox::Level;

/// The newest row of `results.tsv` for `CURRENT` whose tree hash starts like `tree`.
fn latest_row(results: &Path, tree: &str) -> Result<Option<ResultsRow>> {
    Ok(read_rows(results)?
        .into_iter()
        .rfind(|r| measures_tree(r, tree)))
}

/// Whether `row` measured `CURRENT` with a tree hash that starts like `tree`.
fn measures_tree(row: &ResultsRow, tree: &str) -> bool {
    row.variant.trim_end_matches('/').ends_with(CURRENT)
        && !row.variant_tree.is_empty()
        && tree.starts_with(row.variant_tree.as_str())
}

/// What `host keep` checks the comparison against.
pub struct KeepRules<'a> {
    /// The present harness hash: a comparison made under another one does not count.
    pub harness: &'a str,
    /// Accept a NOISE verdict when the change deletes more lines than it adds.
    pub simpler: bool,
    /// The protocol's tokens per request: a comparison with fewer (or on some prompts only) was
    /// a quick look, not one to keep on.
    pub max_new_tokens: u32,
    /// Accept a comparison whose variant code was not fully confined (`--allow-unsandboxed`).
    pub allow_unsandboxed: bool,
}

/// Commits `variants/current` alone with `message`, after checking the latest comparison of its
/// exact content allows it (see the module doc). Returns the new commit's id.
pub fn keep(root: &Path, results: &Path, message: &str, rules: &KeepRules) -> Result<String> {
    if message.trim().is_empty() {
        bail!("host keep needs a message (-m) saying what the change is");
    }
    let repo = git2::Repository::open(root)
        .with_context(|| format!("{} is not the root of a git repository", root.display()))?;
    let tree = crate::vcs::tree_hash(&root.join(CURRENT));
    let row = latest_row(results, &tree)?.with_context(|| {
        format!(
            "no comparison of {CURRENT} as it is now (tree {}) in {}: run `host compare` first",
            &tree[..12],
            results.join("results.tsv").display()
        )
    })?;
    let Some(verdict) = row.verdict else {
        let what = match row.status {
            Status::Failed | Status::Interrupted if row.against != "-" => {
                format!("a comparison that ended {}", row.status.as_str())
            }
            _ => "a `host run`".to_string(),
        };
        bail!(
            "the latest measurement of {CURRENT} as it is now ({}) is {what}, not a comparison \
             with a verdict: run `host compare` (it compares the last kept {CURRENT} with the \
             working tree)",
            row.time
        );
    };
    let head_tree = crate::vcs::tree_hash_at(root, "HEAD", CURRENT)?;
    comparable(&row, verdict, &head_tree, rules)?;
    passed(&row, rules)?;
    let (kind, model) = check_record(results, &row, &tree, &head_tree, rules.harness)?;
    // The default model's NOISE after a KEEP of the same change on a synthetic model: the
    // keep rests on that KEEP, each model's newest comparison being the one that counts.
    let (row, verdict, kind, model, mut guard) = if kind == ModelKind::Default
        && verdict == Verdict::Noise
    {
        match synthetic_keep_before(results, &row, &tree, &head_tree, rules)? {
            Some((synthetic, kind, model)) => (synthetic, Verdict::Keep, kind, model, Some(row)),
            None => (row, verdict, kind, model, None),
        }
    } else {
        (row, verdict, kind, model, None)
    };
    if kind == ModelKind::SyntheticSecret && verdict == Verdict::Keep && guard.is_none() {
        guard = Some(default_model_beside(
            results, &row, &tree, &head_tree, rules,
        )?);
    }
    // Every draw of the change on the model it is kept on must be a KEEP (NOISE too, for a
    // simpler change), and on the default model beside it a KEEP or NOISE.
    let allowed: &[Verdict] = match verdict {
        Verdict::Keep => &[Verdict::Keep],
        _ => &[Verdict::Keep, Verdict::Noise],
    };
    no_other_draw(results, &row, allowed, &tree, &head_tree, rules)?;
    if let Some(guard) = &guard {
        no_other_draw(
            results,
            guard,
            &[Verdict::Keep, Verdict::Noise],
            &tree,
            &head_tree,
            rules,
        )?;
    }
    let (added, removed) = line_changes(&repo)?;
    match verdict {
        Verdict::Keep => {}
        Verdict::Noise if rules.simpler && removed > added => {}
        Verdict::Noise if rules.simpler => bail!(
            "the verdict is NOISE and the change adds {added} line(s) while removing {removed}: \
             only a change with less code is kept at equal speed; revert it with `host revert`"
        ),
        Verdict::Noise => bail!(
            "the verdict is NOISE: not a win. If the change makes the code simpler (it removes \
             more lines than it adds; {removed} removed, {added} added here), keep it with \
             `host keep --simpler`; else revert it with `host revert`"
        ),
        other => bail!(
            "the verdict of the latest comparison ({}) is {}: only KEEP is kept; revert it \
             with `host revert`",
            row.time,
            other.label()
        ),
    }

    // Nothing else may ride along: refuse when other paths are staged.
    let statuses = repo.statuses(None)?;
    let staged_elsewhere: Vec<String> = statuses
        .iter()
        .filter(|s| {
            let st = s.status();
            let staged = st.is_index_new()
                || st.is_index_modified()
                || st.is_index_deleted()
                || st.is_index_renamed()
                || st.is_index_typechange();
            let path = s.path().unwrap_or("");
            staged && !path.starts_with(CURRENT) && path != LOCK
        })
        .filter_map(|s| s.path().map(String::from))
        .collect();
    if !staged_elsewhere.is_empty() {
        bail!(
            "other changes are staged ({}); host keep commits {CURRENT} alone: unstage them first",
            staged_elsewhere.join(", ")
        );
    }
    let mut index = repo.index()?;
    index.add_all([CURRENT], git2::IndexAddOption::DEFAULT, None)?;
    index.update_all([CURRENT], None)?;
    // A dependency added to the variant changes the workspace's lock file; it goes with it.
    let lock_changed = repo
        .status_file(Path::new(LOCK))
        .is_ok_and(|st| st.is_wt_new() || st.is_wt_modified());
    if lock_changed {
        index.add_path(Path::new(LOCK))?;
    }
    index.write()?;
    let tree_id = index.write_tree()?;
    let head = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
    if head.as_ref().is_some_and(|c| c.tree_id() == tree_id) {
        bail!("{CURRENT} has no changes against the last commit: nothing to keep");
    }
    let body = format!(
        "{}\n\nautoinfer keep: {verdict}{} against {} (tree {}) after {} rounds\n\
         decode B/A {} (ratio [decision interval])\n\
         B: decode {} tok/s, prefill {} tok/s, TTFT {} ms, peak RSS {} MiB\n\
         gates pass: agreement {}, perplexity ratio {}, checks {} (baseline {})\n\
         {CURRENT} tree {}, {added} line(s) added, {removed} removed{}\n\
         compared {} on {}, harness {}\n\
         model: {model}",
        message.trim(),
        if verdict == Verdict::Noise {
            " (simpler)"
        } else {
            ""
        },
        row.against,
        row.against_tree,
        row.compare_rounds,
        row.decode_ratio,
        row.decode_tok_s,
        row.prefill_tok_s,
        row.ttft_ms,
        row.peak_rss_mib,
        row.agreement,
        row.ppl_ratio,
        row.checks_passed,
        row.checks_baseline,
        row.variant_tree,
        if lock_changed {
            "; Cargo.lock updated with it"
        } else {
            ""
        },
        row.time,
        row.machine,
        row.harness,
    );
    let signature = repo
        .signature()
        .or_else(|_| git2::Signature::now("autoinfer", "autoinfer@localhost"))?;
    let tree = repo.find_tree(tree_id)?;
    let parents: Vec<&git2::Commit> = head.iter().collect();
    let id = repo.commit(Some("HEAD"), &signature, &signature, &body, &tree, &parents)?;
    Ok(id.to_string())
}

/// What `host keep` reads of a comparison's JSON record (the rest is ignored).
#[derive(Deserialize)]
struct RecordView {
    kind: String,
    status: String,
    outcome: Option<Outcome>,
    provenance: ProvenanceView,
    against: TreeView,
    protocol: SeedView,
    figures: Vec<FigureCall>,
    gates: Option<GatesView>,
}

#[derive(Deserialize)]
struct ProvenanceView {
    variant_tree: String,
    harness: String,
    sandbox: Level,
    #[serde(default)]
    model_kind: ModelKind,
    #[serde(default)]
    model_path: String,
}

#[derive(Deserialize)]
struct TreeView {
    tree: String,
}

#[derive(Deserialize)]
struct SeedView {
    seed: u64,
}

#[derive(Deserialize)]
struct GatesView {
    failures: Vec<GateFailure>,
}

/// Checks `row` against the comparison's JSON record it names: `host keep` trusts a row only
/// when the record says the same (the variant's and A's trees, the harness, the seed, the
/// verdict, the status and the sandbox), and when the keep rule ([`keep_rule::decide`]), applied
/// again to the record's figures and gates, gives the recorded verdict. So a row edited or
/// appended by anything but the host is refused. `tree` and `head_tree` are the present and
/// HEAD's `variants/current`, `harness` HEAD's harness hash. Returns the kind of model it ran
/// on, and the model in words for the commit message.
fn check_record(
    results: &Path,
    row: &ResultsRow,
    tree: &str,
    head_tree: &str,
    harness: &str,
) -> Result<(ModelKind, String)> {
    let name = row.json.as_str();
    if name.contains('/') || name.starts_with('.') {
        bail!(
            "the results row of {} names no record of its own ({name:?})",
            row.time
        );
    }
    let path = results.join("runs").join(name);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "the record of the comparison of {} ({}) cannot be read, so its row cannot be \
             checked; run `host compare` again",
            row.time,
            path.display()
        )
    })?;
    let record: RecordView = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a comparison record", path.display()))?;
    // The rule again, on what the record holds; a suspect B is a REVERT whatever else it shows.
    let suspect = (record.status == Status::Suspect.as_str()).then_some("B was suspect");
    let gate_failures = record.gates.as_ref().map(|g| g.failures.as_slice());
    let (again, _) = keep_rule::decide(&record.figures, gate_failures, suspect);
    let checks = [
        ("the kind of measurement", record.kind == "compare"),
        ("the variant's tree", record.provenance.variant_tree == tree),
        ("variant A's tree", record.against.tree == head_tree),
        ("the harness", record.provenance.harness == harness),
        ("the seed", record.protocol.seed.to_string() == row.seed),
        (
            "the verdict",
            record.outcome.map(|o| o.recorded(false)) == row.verdict
                && record.outcome == Some(again),
        ),
        ("the status", record.status == row.status.as_str()),
        (
            "the sandbox",
            (record.provenance.sandbox == Level::Full) == (row.sandbox == "full"),
        ),
    ];
    if let Some((what, _)) = checks.iter().find(|(_, agree)| !agree) {
        bail!(
            "the results row of {} and its record {} disagree on {what}: the ledger was changed \
             after the comparison; run `host compare` again",
            row.time,
            path.display()
        );
    }
    let kind = record.provenance.model_kind;
    if !kind.keepable() {
        bail!(
            "the latest comparison of {CURRENT} ({}) ran on {} ({}): a keep rests only on the \
             default model or on a synthetic model written without --seed, whose weights no \
             variant could have chosen or regenerated; run `host compare` without --model, or \
             with --model of such a synthetic file",
            row.time,
            kind.describe(),
            record.provenance.model_path
        );
    }
    Ok((
        kind,
        format!("{} ({})", kind.describe(), record.provenance.model_path),
    ))
}

/// For a KEEP on a synthetic model (`synthetic`, its row): the newest comparison of the same
/// `tree` against the same `head_tree` on the default model, under the present harness and on
/// the full protocol, backed by its record ([`check_record`]), must have ended KEEP or NOISE;
/// it is returned.
/// (its gates passed, its variant code fully confined unless `--allow-unsandboxed`). A
/// synthetic shape says nothing of the default model's figures: G57's three kernels, kept on
/// the 1B shape and never run by SmolLM2, grew the NVRTC compile of kernels.cu, about a third of
/// a CUDA worker's peak memory, from 188 to 196 MB (measured on the CPU here), which no
/// comparison on the default model looked at.
fn default_model_beside(
    results: &Path,
    synthetic: &ResultsRow,
    tree: &str,
    head_tree: &str,
    rules: &KeepRules,
) -> Result<ResultsRow> {
    let same_change = |r: &ResultsRow| {
        measures_tree(r, tree)
            && r.json != synthetic.json
            && r.verdict
                .is_some_and(|v| comparable(r, v, head_tree, rules).is_ok())
    };
    let mut rows = read_rows(results)?;
    rows.retain(same_change);
    for row in rows.iter().rev() {
        let (kind, _) = check_record(results, row, tree, head_tree, rules.harness)?;
        if kind != ModelKind::Default {
            continue;
        }
        return match row.verdict {
            Some(Verdict::Keep | Verdict::Noise) if passed(row, rules).is_ok() => Ok(row.clone()),
            _ => bail!(
                "the KEEP of {} on a synthetic model rests on the default model's figures too, \
                 and the comparison of the same change on the default model ({}) ended {} with \
                 status {:?}, gates {:?}, sandbox {:?}: a change that makes the default model slower, or larger, on any \
                 figure the comparison guards is not kept; revert it, or make it leave the \
                 default model's path as it was",
                synthetic.time,
                row.time,
                row.verdict.map_or("-", |v| v.label()),
                row.status.as_str(),
                row.gates,
                row.sandbox
            ),
        };
    }
    bail!(
        "the KEEP of {} is on a synthetic model, which says nothing of the default model's \
         figures: compare the same change on the default model too (`host compare`, no \
         --model), then `host keep` again (the two comparisons may come in either order); it \
         is kept when the default model's ends KEEP or NOISE (no guarded figure SLOWER)",
        synthetic.time
    )
}

/// For the default model's comparison `default` of `tree`: the newest comparison of the same
/// change on another model, if it is a KEEP on a synthetic model with secret weights that a
/// keep can rest on (under the present harness, on the full protocol, against `head_tree`, its
/// gates passed, backed by its record), with its model. So a synthetic shape's comparison may
/// come before the default model's as well as after it: a short lease can run the one that
/// decides first. Each model's newest comparison is the one that counts, so a KEEP followed by
/// another verdict on a synthetic model is not one to keep on.
fn synthetic_keep_before(
    results: &Path,
    default: &ResultsRow,
    tree: &str,
    head_tree: &str,
    rules: &KeepRules,
) -> Result<Option<(ResultsRow, ModelKind, String)>> {
    let rows = read_rows(results)?;
    let same_change = rows.iter().rev().filter(|r| {
        measures_tree(r, tree)
            && r.json != default.json
            && r.verdict
                .is_some_and(|v| comparable(r, v, head_tree, rules).is_ok())
    });
    for row in same_change {
        let Ok((kind, model)) = check_record(results, row, tree, head_tree, rules.harness) else {
            return Ok(None);
        };
        if kind == ModelKind::Default {
            continue;
        }
        let kept = kind == ModelKind::SyntheticSecret
            && row.verdict == Some(Verdict::Keep)
            && passed(row, rules).is_ok();
        return Ok(kept.then(|| (row.clone(), kind, model)));
    }
    Ok(None)
}

/// Refuses a verdict drawn again: every comparison of the change that `deciding` measured (the
/// same `tree` against the same `head_tree`, on the full protocol, under any harness) on the
/// same model (the default model, or a synthetic one of the same shape: [`record_model`]) and
/// the same machine and device must have ended in `allowed`. A comparison that ends NOISE,
/// then again until one reads KEEP, would turn the test's 5% chance of a false verdict into
/// whatever the number of tries makes it (program.md: one comparison per hypothesis). A
/// comparison that failed or was interrupted has no verdict and does not count; nor does one
/// on another shape (a change may lose nothing at 8B and gain at 1B).
fn no_other_draw(
    results: &Path,
    deciding: &ResultsRow,
    allowed: &[Verdict],
    tree: &str,
    head_tree: &str,
    rules: &KeepRules,
) -> Result<()> {
    let model = record_model(results, deciding)?;
    // Other full-protocol comparisons of the change on this machine and device, any harness.
    let drawn = |r: &ResultsRow| {
        let verdict = r.verdict.filter(|v| !v.is_screen())?;
        let same = measures_tree(r, tree)
            && r.json != deciding.json
            && r.machine == deciding.machine
            && r.device == deciding.device
            && against_head_on_protocol(r, head_tree, rules).is_ok();
        same.then_some(verdict)
    };
    for row in read_rows(results)?.iter() {
        let Some(verdict) = drawn(row) else { continue };
        if allowed.contains(&verdict) || record_model(results, row)? != model {
            continue;
        }
        bail!(
            "the same change ({CURRENT} tree {}, against {}) was compared on {} before, at {}, \
             and that comparison ended {}: a verdict drawn again after another is not kept (the \
             test's chance of a false verdict holds for one comparison per hypothesis, not for \
             the best of several). Revert it with `host revert`, or make a change that is a new \
             hypothesis",
            &tree[..12.min(tree.len())],
            deciding.against_tree,
            model.describe(),
            row.time,
            verdict.label()
        );
    }
    Ok(())
}

/// Which model a comparison ran on, as [`no_other_draw`] tells them apart.
#[derive(Debug, PartialEq, Eq)]
enum ModelIdentity {
    /// The default model, or another file, by its SHA-256.
    File(ModelKind, String),
    /// A synthetic model of secret weights, by its shape: each comparison writes its own file.
    Shape(String),
}

impl ModelIdentity {
    fn describe(&self) -> String {
        match self {
            ModelIdentity::File(kind, _) => kind.describe().to_string(),
            ModelIdentity::Shape(shape) => format!(
                "a synthetic model of the same shape (tensor index {})",
                &shape[..12.min(shape.len())]
            ),
        }
    }
}

/// The model the comparison `row` ran on, from its record. A record from before shapes were
/// recorded names a synthetic model by its file's hash, which no other comparison shares.
fn record_model(results: &Path, row: &ResultsRow) -> Result<ModelIdentity> {
    #[derive(Deserialize)]
    struct View {
        provenance: ModelView,
    }
    #[derive(Deserialize)]
    struct ModelView {
        #[serde(default)]
        model_kind: ModelKind,
        #[serde(default)]
        model_sha256: String,
        #[serde(default)]
        model_shape: String,
    }
    let name = row.json.as_str();
    let path = results.join("runs").join(name);
    let read = || -> Result<View> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            bail!("the row names no record of its own ({name:?})");
        }
        Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)?)
    };
    let view = read().with_context(|| {
        format!(
            "the record of the comparison of {} ({}) cannot be read, so which model it ran on \
             is unknown, and `host keep` cannot tell whether its verdict was drawn again",
            row.time,
            path.display()
        )
    })?;
    let model = view.provenance;
    Ok(
        if model.model_kind == ModelKind::SyntheticSecret && !model.model_shape.is_empty() {
            ModelIdentity::Shape(model.model_shape)
        } else {
            ModelIdentity::File(model.model_kind, model.model_sha256)
        },
    )
}

/// Whether `row`, a comparison with `verdict`, is one a keep can rest on: on the full protocol
/// (not a screen, every prompt, the protocol's tokens), under the present harness, against
/// HEAD's `CURRENT` (`head_tree`). The error says which it is not.
fn comparable(
    row: &ResultsRow,
    verdict: Verdict,
    head_tree: &str,
    rules: &KeepRules,
) -> Result<()> {
    if verdict.is_screen() {
        bail!(
            "the latest comparison of {CURRENT} ({}) was a screen ({}): a screen is never \
             kept; run `host compare` on the full protocol",
            row.time,
            verdict.label()
        );
    }
    if !rules.harness.starts_with(row.harness.as_str()) || row.harness.is_empty() {
        bail!(
            "the latest comparison of {CURRENT} ({}) was measured under harness {}, and the harness \
             is now {}: results of different harnesses are not compared; run `host compare` again",
            row.time,
            row.harness,
            &rules.harness[..12.min(rules.harness.len())]
        );
    }
    against_head_on_protocol(row, head_tree, rules)
}

/// Whether the comparison `row` was against HEAD's `CURRENT` (`head_tree`) on the full
/// protocol's prompts and tokens, whatever its harness: the part of [`comparable`] that
/// [`no_other_draw`] also asks of an earlier draw. The error says which it is not.
fn against_head_on_protocol(row: &ResultsRow, head_tree: &str, rules: &KeepRules) -> Result<()> {
    if !head_tree.starts_with(row.against_tree.as_str()) || row.against_tree.is_empty() {
        bail!(
            "the latest comparison of {CURRENT} ({}) was against {} (tree {}), not the last kept \
             {CURRENT} (tree {}): run `host compare` with no arguments",
            row.time,
            row.against,
            row.against_tree,
            &head_tree[..12]
        );
    }
    if row.prompts != "all" || row.max_new_tokens != rules.max_new_tokens.to_string() {
        bail!(
            "the latest comparison of {CURRENT} ({}) was a quick one (prompts {}, {} tokens per \
             request): only a comparison on every prompt with the protocol's {} tokens is kept on; \
             run `host compare` without --prompt or --max-new-tokens",
            row.time,
            row.prompts,
            row.max_new_tokens,
            rules.max_new_tokens
        );
    }
    Ok(())
}

/// Whether the comparison `row` passed: status ok, every gate passed, its variant code fully
/// confined (or `--allow-unsandboxed`). The error says what failed.
fn passed(row: &ResultsRow, rules: &KeepRules) -> Result<()> {
    if row.status != Status::Ok || row.gates != "pass" {
        bail!(
            "the latest comparison of {CURRENT} as it is now ({}) has status {:?} and gates {:?}: \
             only a change that passed is kept; revert it with `host revert`",
            row.time,
            row.status.as_str(),
            row.gates
        );
    }
    if row.sandbox != "full" && !rules.allow_unsandboxed {
        bail!(
            "the latest comparison of {CURRENT} ({}) ran with its variant code confined only in \
             part ({}): a verdict is trusted only when neither side could reach the clock, the \
             results or the other side. Keep it anyway with `host keep --allow-unsandboxed`",
            row.time,
            row.sandbox
        );
    }
    Ok(())
}

/// Lines added and removed in `variants/current` between HEAD and the working tree (new files
/// included).
fn line_changes(repo: &git2::Repository) -> Result<(usize, usize)> {
    let head = repo.head().ok().and_then(|h| h.peel_to_tree().ok());
    let mut opts = git2::DiffOptions::new();
    opts.pathspec(CURRENT)
        .include_untracked(true)
        .recurse_untracked_dirs(true)
        .show_untracked_content(true);
    let diff = repo.diff_tree_to_workdir(head.as_ref(), Some(&mut opts))?;
    let stats = diff.stats()?;
    Ok((stats.insertions(), stats.deletions()))
}

/// Restores `variants/current` as the last commit has it: edits undone, files added since
/// deleted. Returns how many paths changed.
pub fn revert(root: &Path) -> Result<usize> {
    let repo = git2::Repository::open(root)
        .with_context(|| format!("{} is not the root of a git repository", root.display()))?;
    let head = repo
        .head()
        .and_then(|h| h.peel_to_commit())
        .context("the repository has no commit to revert to")?;
    if head.tree()?.get_path(Path::new(CURRENT)).is_err() {
        bail!("the last commit ({}) has no {CURRENT}", head.id());
    }
    let mut opts = git2::StatusOptions::new();
    opts.pathspec(CURRENT)
        .include_untracked(true)
        .recurse_untracked_dirs(true);
    let changed = repo.statuses(Some(&mut opts))?.len();
    let mut checkout = git2::build::CheckoutBuilder::new();
    checkout.force().remove_untracked(true).path(CURRENT);
    // Reset the index entries too, so staged edits are undone as well.
    let mut index = repo.index()?;
    index.remove_all([CURRENT], None)?;
    let head_tree = head.tree()?;
    let mut head_index = git2::Index::new()?;
    head_index.read_tree(&head_tree)?;
    for entry in head_index.iter() {
        if String::from_utf8_lossy(&entry.path).starts_with(CURRENT) {
            index.add(&entry)?;
        }
    }
    index.write()?;
    repo.checkout_index(Some(&mut index), Some(&mut checkout))?;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch checkout with `variants/current` and one other file, committed.
    fn checkout(name: &str) -> (std::path::PathBuf, git2::Repository) {
        let dir =
            std::env::temp_dir().join(format!("autoinfer-keep-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("variants/current/src")).unwrap();
        std::fs::write(dir.join("variants/current/src/lib.rs"), "// v1\n").unwrap();
        std::fs::write(dir.join("README.md"), "readme\n").unwrap();
        let repo = git2::Repository::init(&dir).unwrap();
        let mut index = repo.index().unwrap();
        index
            .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
            .unwrap();
        index.write().unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        repo.commit(Some("HEAD"), &sig, &sig, "init", &tree, &[])
            .unwrap();
        drop(tree);
        (dir, repo)
    }

    const RULES: KeepRules = KeepRules {
        harness: "0123456789abcdef",
        simpler: false,
        max_new_tokens: 128,
        allow_unsandboxed: false,
    };

    /// Writes a results.tsv with one comparison of the present `variants/current` against
    /// HEAD's, with `verdict` and `status`; `edit` changes one field afterwards.
    fn record_compare(dir: &Path, verdict: &str, status: &str, gates: &str, edit: (&str, &str)) {
        write_compare(dir, verdict, status, gates, edit, "compare.json", false);
    }

    /// [`record_compare`] with its record named `json`, the row appended to results.tsv when
    /// `append`.
    fn write_compare(
        dir: &Path,
        verdict: &str,
        status: &str,
        gates: &str,
        edit: (&str, &str),
        json: &str,
        append: bool,
    ) {
        let tree = crate::vcs::tree_hash(&dir.join(CURRENT));
        let head = crate::vcs::tree_hash_at(dir, "HEAD", CURRENT).unwrap();
        let header = crate::ledger::row::COLUMNS.join("\t");
        let row: Vec<String> = crate::ledger::row::COLUMNS
            .iter()
            .map(|c| match *c {
                c if c == edit.0 => edit.1.to_string(),
                "variant" => CURRENT.to_string(),
                "variant_tree" => tree[..12].to_string(),
                "status" => status.to_string(),
                "gates" => gates.to_string(),
                "decode_tok_s" => "42.00".to_string(),
                "harness" => "0123456789ab".to_string(),
                "against" => format!("HEAD:{CURRENT}"),
                "against_tree" => head[..12].to_string(),
                "verdict" => verdict.to_string(),
                "prompts" => "all".to_string(),
                "max_new_tokens" => "128".to_string(),
                "decode_ratio" => "1.0500 [1.0300, 1.0700]".to_string(),
                "sandbox" => "full".to_string(),
                "seed" => "42".to_string(),
                "json" => json.to_string(),
                _ => "x".to_string(),
            })
            .collect();
        let results = dir.join("results");
        std::fs::create_dir_all(results.join("runs")).unwrap();
        // The record the host writes beside the row, saying the same.
        let outcome = match verdict {
            "KEEP" => "Keep",
            "NOISE" => "Noise",
            "REVERT" => "Revert",
            _ => "-",
        };
        // Figures and gates that make the recorded outcome under the keep rule, unless the
        // edit says otherwise (`record_decode`: the decode figure's verdict in the record only;
        // `record_prefill`: decode NOISE and prefill FASTER, which the rule keeps).
        let decode = match (edit.0, verdict) {
            ("record_decode", _) => edit.1,
            ("record_prefill", _) => "Noise",
            (_, "KEEP") => "Faster",
            (_, "REVERT") => "Slower",
            _ => "Noise",
        };
        let failures = match gates {
            "pass" => serde_json::json!([]),
            _ => serde_json::json!([{ "prompt": "code", "gate": "agreement", "figure": 0.5,
                                      "threshold": 0.999, "message": "fails" }]),
        };
        let decision = serde_json::json!({ "ratio": 1.05, "ci": [1.03, 1.07], "p": null });
        let mut figures = vec![
            serde_json::json!({ "figure": "decode_tok_s", "verdict": decode,
                                                   "settled": false, "decision": decision }),
        ];
        if edit.0 == "record_prefill" {
            figures.push(
                serde_json::json!({ "figure": "prefill_tok_s", "verdict": "Faster",
                                             "settled": false, "decision": decision }),
            );
        }
        let record = serde_json::json!({
            "kind": "compare",
            "provenance": { "variant_tree": tree, "harness": RULES.harness, "sandbox": "full",
                            "model_kind": match edit.0 {
                                "record_model_kind" => edit.1,
                                "record_model_shape" => "synthetic_secret",
                                _ => "default",
                            },
                            "model_shape": match edit.0 {
                                "record_model_shape" => edit.1,
                                _ => "shape",
                            },
                            "model_path": "/models/m.gguf" },
            "against": { "tree": head },
            "protocol": { "seed": 42 },
            "outcome": if outcome == "-" { serde_json::Value::Null } else { outcome.into() },
            "status": status,
            "figures": figures,
            "gates": { "failures": failures },
        });
        std::fs::write(results.join("runs").join(json), record.to_string()).unwrap();
        let tsv = results.join("results.tsv");
        let before = match append {
            true => std::fs::read_to_string(&tsv).unwrap(),
            false => format!("{header}\n"),
        };
        std::fs::write(&tsv, format!("{before}{}\n", row.join("\t"))).unwrap();
    }

    /// The record edit of a comparison on a synthetic model with secret weights.
    const SYNTHETIC: (&str, &str) = ("record_model_kind", "synthetic_secret");

    /// Why `host keep` of the change in `dir` (said to be faster at 1B) is refused.
    fn keep_error(dir: &Path) -> String {
        keep(dir, &dir.join("results"), "faster at 1B", &RULES)
            .unwrap_err()
            .to_string()
    }

    /// `host keep` of the change in `dir` commits it, saying it was kept on a synthetic model;
    /// then the checkout is removed.
    fn assert_kept_on_synthetic(dir: &Path, repo: &git2::Repository) {
        let id = keep(dir, &dir.join("results"), "faster at 1B", &RULES).unwrap();
        let commit = repo.find_commit(git2::Oid::from_str(&id).unwrap()).unwrap();
        let message = commit.message().unwrap();
        assert!(
            message.contains("model: a synthetic model with secret weights"),
            "{message}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A KEEP on a synthetic model is kept only beside a comparison of the same change on the
    /// default model that ended KEEP or NOISE.
    #[test]
    fn a_synthetic_keep_needs_the_default_model_beside_it() {
        let (dir, repo) = checkout("keep-synthetic");
        std::fs::write(dir.join("variants/current/src/lib.rs"), "// v2\n").unwrap();
        // Alone.
        write_compare(&dir, "KEEP", "ok", "pass", SYNTHETIC, "s.json", false);
        let err = keep_error(&dir);
        assert!(
            err.contains("compare the same change on the default model"),
            "{err}"
        );
        // Beside a default-model comparison that ended REVERT, or that failed its gates.
        // (The second is faster, but its gates failed: the keep rule makes it a REVERT.)
        for (status, gates, edit, needle) in [
            ("ok", "pass", ("", ""), "ended REVERT with status \"ok\""),
            (
                "rejected",
                "fail: code agreement",
                ("record_decode", "Faster"),
                "status \"rejected\", gates \"fail: code agreement\"",
            ),
        ] {
            write_compare(&dir, "REVERT", status, gates, edit, "d.json", false);
            write_compare(&dir, "KEEP", "ok", "pass", SYNTHETIC, "s.json", true);
            let err = keep_error(&dir);
            assert!(err.contains(needle), "{status}: {err}");
        }
        // A default-model comparison of another change does not count.
        write_compare(
            &dir,
            "NOISE",
            "ok",
            "pass",
            ("variant_tree", "0123456789ab"),
            "d.json",
            false,
        );
        write_compare(&dir, "KEEP", "ok", "pass", SYNTHETIC, "s.json", true);
        let err = keep_error(&dir);
        assert!(
            err.contains("compare the same change on the default model"),
            "{err}"
        );
        // Beside a NOISE on the default model: kept, and the message names the synthetic model.
        write_compare(&dir, "NOISE", "ok", "pass", ("", ""), "d.json", false);
        write_compare(&dir, "KEEP", "ok", "pass", SYNTHETIC, "s.json", true);
        assert_kept_on_synthetic(&dir, &repo);
    }

    /// The default model's NOISE may come after the synthetic model's KEEP: the keep rests on
    /// that KEEP, if it is the synthetic model's newest comparison of the change.
    #[test]
    fn a_synthetic_keep_may_come_before_the_default_models_noise() {
        let (dir, repo) = checkout("keep-synthetic-first");
        std::fs::write(dir.join("variants/current/src/lib.rs"), "// v2\n").unwrap();
        // The synthetic model's newest comparison is not its KEEP: the default's NOISE alone.
        for later in ["NOISE", "REVERT"] {
            write_compare(&dir, "KEEP", "ok", "pass", SYNTHETIC, "s.json", false);
            write_compare(&dir, later, "ok", "pass", SYNTHETIC, "s2.json", true);
            write_compare(&dir, "NOISE", "ok", "pass", ("", ""), "d.json", true);
            let err = keep_error(&dir);
            assert!(err.contains("the verdict is NOISE"), "{later}: {err}");
        }
        // A synthetic KEEP whose gates failed is no KEEP.
        write_compare(
            &dir,
            "KEEP",
            "rejected",
            "fail: code agreement",
            SYNTHETIC,
            "s.json",
            false,
        );
        write_compare(&dir, "NOISE", "ok", "pass", ("", ""), "d.json", true);
        let err = keep_error(&dir);
        assert!(err.contains("the verdict is NOISE"), "{err}");
        // Its KEEP, then the default model's NOISE: kept on the KEEP.
        write_compare(&dir, "KEEP", "ok", "pass", SYNTHETIC, "s.json", false);
        write_compare(&dir, "NOISE", "ok", "pass", ("", ""), "d.json", true);
        assert_kept_on_synthetic(&dir, &repo);
    }

    /// A verdict drawn again is not kept: an earlier comparison of the same change on the same
    /// model, or a synthetic one of the same shape, that ended otherwise refuses it, whatever
    /// the harness was; one on another shape, against another A, or without a verdict does not.
    #[test]
    fn a_verdict_drawn_again_is_not_kept() {
        let (dir, repo) = checkout("keep-drawn-again");
        std::fs::write(dir.join("variants/current/src/lib.rs"), "// v2\n").unwrap();
        let shape_1b = ("record_model_shape", "1b");
        // The default model: NOISE (under an older harness), then KEEP.
        let older = ("harness", "fedcba987654");
        write_compare(&dir, "NOISE", "ok", "pass", older, "d1.json", false);
        write_compare(&dir, "KEEP", "ok", "pass", ("", ""), "d2.json", true);
        let err = keep_error(&dir);
        assert!(
            err.contains("was compared on the default model before") && err.contains("ended NOISE"),
            "{err}"
        );
        // The 1B shape: NOISE, then KEEP (each on its own file), the default model's NOISE.
        write_compare(&dir, "NOISE", "ok", "pass", shape_1b, "s1.json", false);
        write_compare(&dir, "KEEP", "ok", "pass", shape_1b, "s2.json", true);
        write_compare(&dir, "NOISE", "ok", "pass", ("", ""), "d.json", true);
        let err = keep_error(&dir);
        assert!(
            err.contains("a synthetic model of the same shape") && err.contains("ended NOISE"),
            "{err}"
        );
        // The default model beside the shape's KEEP: REVERT, then NOISE.
        write_compare(&dir, "REVERT", "ok", "pass", ("", ""), "d1.json", false);
        write_compare(&dir, "KEEP", "ok", "pass", shape_1b, "s.json", true);
        write_compare(&dir, "NOISE", "ok", "pass", ("", ""), "d.json", true);
        let err = keep_error(&dir);
        assert!(
            err.contains("on the default model before") && err.contains("ended REVERT"),
            "{err}"
        );
        // Not draws of the same hypothesis: a NOISE on another shape, a comparison that
        // failed, one against another A, a quick one (one prompt).
        let shape_8b = ("record_model_shape", "8b");
        write_compare(&dir, "NOISE", "ok", "pass", shape_8b, "s8.json", false);
        write_compare(&dir, "-", "failed", "pass", shape_1b, "f.json", true);
        let other_a = ("against_tree", "0123456789ab");
        write_compare(&dir, "REVERT", "ok", "pass", other_a, "a.json", true);
        write_compare(
            &dir,
            "REVERT",
            "ok",
            "pass",
            ("prompts", "code"),
            "q.json",
            true,
        );
        write_compare(&dir, "KEEP", "ok", "pass", shape_1b, "s.json", true);
        write_compare(&dir, "NOISE", "ok", "pass", ("", ""), "d.json", true);
        assert_kept_on_synthetic(&dir, &repo);
    }

    #[test]
    fn keep_commits_only_a_kept_comparison_of_current() {
        let (dir, repo) = checkout("keep");
        let results = dir.join("results");
        std::fs::write(dir.join("variants/current/src/lib.rs"), "// v2\n// more\n").unwrap();
        std::fs::write(dir.join("README.md"), "edited, not to be committed\n").unwrap();
        std::fs::write(
            dir.join("Cargo.lock"),
            "# a new dependency of the variant\n",
        )
        .unwrap();
        let keep_err = |rules: &KeepRules| {
            keep(&dir, &results, "faster", rules)
                .unwrap_err()
                .to_string()
        };

        let err = keep_err(&RULES);
        assert!(err.contains("no comparison of variants/current"), "{err}");
        for (verdict, status, gates, edit, needle) in [
            (
                "-",
                "ok",
                "pass",
                ("", ""),
                "is a `host run`, not a comparison",
            ),
            (
                "-",
                "interrupted",
                "-",
                ("", ""),
                "a comparison that ended interrupted",
            ),
            ("REVERT", "ok", "pass", ("", ""), "is REVERT"),
            // A screen, even one that would have been a KEEP on its prompts.
            (
                "SCREEN-KEEP",
                "ok",
                "pass",
                ("", ""),
                "a screen is never kept",
            ),
            (
                "KEEP",
                "rejected",
                "fail: code agreement",
                ("", ""),
                "\"rejected\"",
            ),
            (
                "KEEP",
                "ok",
                "pass",
                ("harness", "ffffffffffff"),
                "different harnesses",
            ),
            (
                "KEEP",
                "ok",
                "pass",
                ("against_tree", "eeeeeeeeeeee"),
                "not the last kept",
            ),
            (
                "KEEP",
                "ok",
                "pass",
                ("sandbox", "partial: no Landlock"),
                "--allow-unsandboxed",
            ),
            // A row that its record does not back: edited or appended after the fact.
            ("KEEP", "ok", "pass", ("seed", "43"), "disagree on the seed"),
            // A record whose figures do not make its verdict under the keep rule.
            (
                "KEEP",
                "ok",
                "pass",
                ("record_decode", "Noise"),
                "disagree on the verdict",
            ),
            // A row that says NOISE where its record's prefill FASTER makes a KEEP.
            (
                "NOISE",
                "ok",
                "pass",
                ("record_prefill", ""),
                "disagree on the verdict",
            ),
            (
                "KEEP",
                "ok",
                "pass",
                ("json", "missing.json"),
                "cannot be read",
            ),
            (
                "KEEP",
                "ok",
                "pass",
                ("json", "../x.json"),
                "names no record",
            ),
            // A comparison on a model whose weights its writer chose, or that a seed repeats.
            (
                "KEEP",
                "ok",
                "pass",
                ("record_model_kind", "other"),
                "neither the default one nor synthetic (/models/m.gguf)",
            ),
            (
                "KEEP",
                "ok",
                "pass",
                ("record_model_kind", "synthetic_seeded"),
                "a synthetic model written from a seed",
            ),
            ("NOISE", "ok", "pass", ("", ""), "host keep --simpler"),
        ] {
            record_compare(&dir, verdict, status, gates, edit);
            let err = keep_err(&RULES);
            assert!(err.contains(needle), "{verdict}/{status}/{edit:?}: {err}");
        }
        // NOISE with --simpler: refused here, the change adds lines.
        let simpler = KeepRules {
            simpler: true,
            ..RULES
        };
        let err = keep_err(&simpler);
        assert!(err.contains("adds 2 line(s) while removing 1"), "{err}");
        // --allow-unsandboxed takes a partly confined comparison, if its record agrees.
        record_compare(
            &dir,
            "KEEP",
            "ok",
            "pass",
            ("sandbox", "partial: no Landlock"),
        );
        let err = keep_err(&KeepRules {
            allow_unsandboxed: true,
            ..RULES
        });
        assert!(err.contains("disagree on the sandbox"), "{err}");

        // A prefill KEEP (decode NOISE, prefill FASTER): backed by its record.
        record_compare(&dir, "KEEP", "ok", "pass", ("record_prefill", ""));
        let row = crate::ledger::row::read_rows(&results)
            .unwrap()
            .pop()
            .unwrap();
        let tree = crate::vcs::tree_hash(&dir.join(CURRENT));
        let head = crate::vcs::tree_hash_at(&dir, "HEAD", CURRENT).unwrap();
        check_record(&results, &row, &tree, &head, RULES.harness)
            .expect("a prefill KEEP is backed by its record");
        // A synthetic model with secret weights is one a keep may rest on.
        record_compare(
            &dir,
            "KEEP",
            "ok",
            "pass",
            ("record_model_kind", "synthetic_secret"),
        );
        let row = crate::ledger::row::read_rows(&results)
            .unwrap()
            .pop()
            .unwrap();
        let (kind, model) = check_record(&results, &row, &tree, &head, RULES.harness)
            .expect("a comparison on secret synthetic weights is kept");
        assert_eq!(kind, ModelKind::SyntheticSecret);
        assert_eq!(
            model,
            "a synthetic model with secret weights (/models/m.gguf)"
        );

        record_compare(&dir, "KEEP", "ok", "pass", ("", ""));
        assert!(
            keep(&dir, &results, "  ", &RULES).is_err(),
            "a message is required"
        );
        let id = keep(&dir, &results, "faster dot", &RULES).unwrap();
        let commit = repo.find_commit(git2::Oid::from_str(&id).unwrap()).unwrap();
        let message = commit.message().unwrap();
        assert!(
            message.starts_with("faster dot\n")
                && message.contains("KEEP against HEAD:variants/current")
                && message.contains("decode B/A 1.0500 [1.0300, 1.0700]")
                && message.contains("decode 42.00 tok/s")
                && message.contains("model: the default model (/models/m.gguf)"),
            "{message}"
        );
        let tree = commit.tree().unwrap();
        let blob = |p: &str| {
            let entry = tree.get_path(Path::new(p)).unwrap();
            repo.find_blob(entry.id()).unwrap().content().to_vec()
        };
        assert_eq!(blob("variants/current/src/lib.rs"), b"// v2\n// more\n");
        assert_eq!(
            blob("README.md"),
            b"readme\n",
            "only variants/current is committed"
        );

        // A simplification at equal speed: kept with --simpler.
        std::fs::write(dir.join("variants/current/src/lib.rs"), "// v3\n").unwrap();
        record_compare(&dir, "NOISE", "ok", "pass", ("", ""));
        let id = keep(&dir, &results, "less code", &simpler).unwrap();
        let message = repo
            .find_commit(git2::Oid::from_str(&id).unwrap())
            .unwrap()
            .message()
            .unwrap()
            .to_string();
        assert!(
            message.contains("NOISE (simpler)") && message.contains("1 line(s) added, 2 removed"),
            "{message}"
        );
        let err = keep(&dir, &results, "again", &simpler)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not the last kept"),
            "a comparison against the old HEAD no longer counts: {err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn revert_restores_current_and_nothing_else() {
        let (dir, _repo) = checkout("revert");
        std::fs::write(dir.join("variants/current/src/lib.rs"), "// broken idea\n").unwrap();
        std::fs::write(dir.join("variants/current/src/simd.rs"), "// new file\n").unwrap();
        std::fs::write(dir.join("README.md"), "my notes\n").unwrap();
        let changed = revert(&dir).unwrap();
        assert_eq!(changed, 2);
        assert_eq!(
            std::fs::read_to_string(dir.join("variants/current/src/lib.rs")).unwrap(),
            "// v1\n"
        );
        assert!(
            !dir.join("variants/current/src/simd.rs").exists(),
            "added files go"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("README.md")).unwrap(),
            "my notes\n"
        );
        assert_eq!(revert(&dir).unwrap(), 0, "nothing left to revert");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
