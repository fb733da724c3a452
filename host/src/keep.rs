//! `host keep` and `host revert`: the git half of the optimisation loop.
//!
//! [`keep`] commits `variants/current` alone, and only when `results/results.tsv` holds a passing
//! run of exactly its present content (same tree hash, status `ok`, gates passed); the commit
//! message carries that run's figures. [`revert`] puts `variants/current` back as the last
//! commit has it, deleting files added since. Both touch nothing outside `variants/current`.
//! (When `host compare` lands, `keep` will ask for its KEEP verdict instead of a plain run.)

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// The variant the loop edits, relative to the checkout's root.
pub const CURRENT: &str = "variants/current";

/// The newest row of `results.tsv` (as column → field) for `CURRENT` whose tree hash starts
/// like `tree`.
fn latest_run(results: &Path, tree: &str) -> Result<Option<BTreeMap<String, String>>> {
    Ok(crate::record::read_rows(results)?
        .into_iter()
        .filter(|r| {
            r.get("variant")
                .is_some_and(|v| v.trim_end_matches('/').ends_with(CURRENT))
                && r.get("variant_tree")
                    .is_some_and(|t| !t.is_empty() && tree.starts_with(t.as_str()))
        })
        .next_back())
}

/// Commits `variants/current` alone with `message`, after checking the latest run of its exact
/// content passed. Returns the new commit's id.
pub fn keep(root: &Path, results: &Path, message: &str) -> Result<String> {
    if message.trim().is_empty() {
        bail!("host keep needs a message (-m) saying what the change is");
    }
    let repo = git2::Repository::open(root)
        .with_context(|| format!("{} is not the root of a git repository", root.display()))?;
    let tree = crate::vcs::tree_hash(&root.join(CURRENT));
    let run = latest_run(results, &tree)?.with_context(|| {
        format!(
            "no run of {CURRENT} as it is now (tree {}) in {}: run `host run {CURRENT}` first",
            &tree[..12],
            results.join("results.tsv").display()
        )
    })?;
    let field = |k: &str| run.get(k).map(String::as_str).unwrap_or("-");
    if field("status") != "ok" || field("gates") != "pass" {
        bail!(
            "the latest run of {CURRENT} as it is now ({}) has status {:?} and gates {:?}: only a \
             change that passed is kept; revert it with `host revert`",
            field("time"),
            field("status"),
            field("gates")
        );
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
            staged && !s.path().unwrap_or("").starts_with(CURRENT)
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
    index.write()?;
    let tree_id = index.write_tree()?;
    let head = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
    if head.as_ref().is_some_and(|c| c.tree_id() == tree_id) {
        bail!("{CURRENT} has no changes against the last commit: nothing to keep");
    }
    let body = format!(
        "{}\n\nautoinfer keep: {CURRENT} tree {}\n\
         decode {} tok/s (IQR {}%), prefill {} tok/s, TTFT {} ms, peak RSS {} MiB\n\
         gates pass: agreement {}, perplexity ratio {}, checks {} (baseline {})\n\
         run {} on {}, harness {}",
        message.trim(),
        field("variant_tree"),
        field("decode_tok_s"),
        field("decode_iqr_pct"),
        field("prefill_tok_s"),
        field("ttft_ms"),
        field("peak_rss_mib"),
        field("agreement"),
        field("ppl_ratio"),
        field("checks_passed"),
        field("checks_baseline"),
        field("time"),
        field("machine"),
        field("harness"),
    );
    let signature = repo
        .signature()
        .or_else(|_| git2::Signature::now("autoinfer", "autoinfer@localhost"))?;
    let tree = repo.find_tree(tree_id)?;
    let parents: Vec<&git2::Commit> = head.iter().collect();
    let id = repo.commit(Some("HEAD"), &signature, &signature, &body, &tree, &parents)?;
    Ok(id.to_string())
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

    /// Writes a results.tsv with one run of the present `variants/current`.
    fn record_run(dir: &Path, status: &str, gates: &str) {
        let tree = crate::vcs::tree_hash(&dir.join(CURRENT));
        let header = crate::record::COLUMNS.join("\t");
        let row: Vec<String> = crate::record::COLUMNS
            .iter()
            .map(|c| match *c {
                "variant" => CURRENT.to_string(),
                "variant_tree" => tree[..12].to_string(),
                "status" => status.to_string(),
                "gates" => gates.to_string(),
                "decode_tok_s" => "42.00".to_string(),
                _ => "x".to_string(),
            })
            .collect();
        let results = dir.join("results");
        std::fs::create_dir_all(&results).unwrap();
        std::fs::write(
            results.join("results.tsv"),
            format!("{header}\n{}\n", row.join("\t")),
        )
        .unwrap();
    }

    #[test]
    fn keep_commits_only_a_passing_current() {
        let (dir, repo) = checkout("keep");
        let results = dir.join("results");
        std::fs::write(dir.join("variants/current/src/lib.rs"), "// v2\n").unwrap();
        std::fs::write(dir.join("README.md"), "edited, not to be committed\n").unwrap();

        let err = keep(&dir, &results, "faster").unwrap_err().to_string();
        assert!(err.contains("no run of variants/current"), "{err}");
        record_run(&dir, "rejected", "fail: code agreement");
        let err = keep(&dir, &results, "faster").unwrap_err().to_string();
        assert!(
            err.contains("\"rejected\"") && err.contains("host revert"),
            "{err}"
        );
        record_run(&dir, "ok", "pass");
        assert!(keep(&dir, &results, "  ").is_err(), "a message is required");

        let id = keep(&dir, &results, "faster dot").unwrap();
        let commit = repo.find_commit(git2::Oid::from_str(&id).unwrap()).unwrap();
        let message = commit.message().unwrap();
        assert!(
            message.starts_with("faster dot\n") && message.contains("decode 42.00 tok/s"),
            "{message}"
        );
        let tree = commit.tree().unwrap();
        let blob = |p: &str| {
            let entry = tree.get_path(Path::new(p)).unwrap();
            repo.find_blob(entry.id()).unwrap().content().to_vec()
        };
        assert_eq!(blob("variants/current/src/lib.rs"), b"// v2\n");
        assert_eq!(
            blob("README.md"),
            b"readme\n",
            "only variants/current is committed"
        );
        let err = keep(&dir, &results, "again").unwrap_err().to_string();
        assert!(err.contains("no changes"), "{err}");
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
