//! What a result row records about the code: the git commit, and content hashes of the variant
//! and of the harness.
//!
//! Hashes are over file contents (path and bytes, sorted, `target/` skipped), so an uncommitted
//! edit changes them: a row always identifies the code that actually ran. [`harness`] says
//! whether the harness that runs is HEAD's: `run` flags it when not, `compare` and `keep` refuse.

use std::path::Path;

use crate::hashing::{hash_files, sha256_hex, HOST_SOURCES};

/// The commit checked out at `dir`, with `+dirty` when tracked files differ from it.
pub fn describe_commit(dir: &Path) -> String {
    let Ok(repo) = git2::Repository::discover(dir) else {
        return "no-git".into();
    };
    let commit = match repo.head().ok().and_then(|h| h.peel_to_commit().ok()) {
        Some(c) => c.id().to_string(),
        None => return "no-commit".into(),
    };
    let mut opts = git2::StatusOptions::new();
    opts.include_untracked(false).include_ignored(false);
    let dirty = repo
        .statuses(Some(&mut opts))
        .map(|s| !s.is_empty())
        .unwrap_or(false);
    if dirty {
        format!("{commit}+dirty")
    } else {
        commit
    }
}

/// Hex SHA-256 over the relative paths and contents of every file under `dir`.
pub fn tree_hash(dir: &Path) -> String {
    hash_files(dir, &[dir.to_path_buf()])
}

/// The paths whose content decides how a variant is measured and judged: the host's sources
/// and manifest, plugin-api, the prompts and protocol, the workspace manifest and the baseline
/// (the quality oracle). `host/tests` is left out: tests and fixtures measure nothing.
pub const HARNESS_PATHS: [&str; 7] = [
    "Cargo.toml",
    "host/Cargo.toml",
    "host/build.rs",
    "host/src",
    "plugin-api",
    "prompts",
    "variants/baseline",
];

/// The harness a measurement runs under.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Harness {
    /// HEAD's committed harness (every [`HARNESS_PATHS`] file) and the oracle's build key, as
    /// one hash; `modified-<hash>` when the harness that runs is not HEAD's.
    pub hash: String,
    /// What differs from HEAD: harness paths changed in the working tree (or untracked new
    /// files among them), and the host binary when it was built from other sources.
    pub modified: Vec<String>,
}

impl Harness {
    /// Whether the harness that runs is HEAD's, exactly.
    pub fn is_committed(&self) -> bool {
        self.modified.is_empty()
    }

    /// What differs, in one sentence for messages.
    pub fn describe(&self) -> String {
        format!(
            "the harness differs from HEAD ({}); commit harness changes on their own, or undo \
             them, and rebuild the host (cargo build --release -p host)",
            self.modified.join(", ")
        )
    }
}

/// The harness of the checkout at `root` with the oracle `oracle_key`: HEAD's committed
/// harness, checked against the working tree and against the sources this host binary was
/// built from.
pub fn harness(root: &Path, oracle_key: &str) -> anyhow::Result<Harness> {
    harness_built_from(root, oracle_key, env!("AUTOINFER_HOST_SOURCE_HASH"))
}

/// [`harness`] for a host binary built from sources whose hash is `built_from`.
fn harness_built_from(root: &Path, oracle_key: &str, built_from: &str) -> anyhow::Result<Harness> {
    let committed_hash = committed_harness_hash(root, oracle_key)?;
    let mut modified = Vec::new();
    let repo = git2::Repository::discover(root)?;
    let mut opts = git2::StatusOptions::new();
    opts.include_untracked(true)
        .recurse_untracked_dirs(true)
        .include_ignored(false);
    for path in HARNESS_PATHS {
        opts.pathspec(path);
    }
    for entry in repo.statuses(Some(&mut opts))?.iter() {
        if let Some(path) = entry.path() {
            modified.push(path.to_string());
        }
    }
    let head_sources = crate::revision::committed_hash(root, "HEAD", &HOST_SOURCES)?;
    if built_from != head_sources {
        modified.push("the running host binary (built from other sources than HEAD's)".into());
    }
    let hash = if modified.is_empty() {
        committed_hash
    } else {
        // Unique to what runs, and never equal to a committed harness's hash.
        let working = hash_files(root, &HARNESS_PATHS.map(|p| root.join(p)));
        format!(
            "modified-{}",
            sha256_hex(format!("{committed_hash}\n{working}\n{built_from}").as_bytes())
        )
    };
    Ok(Harness { hash, modified })
}

/// HEAD's harness hash for the oracle `oracle_key`, as [`harness`] reports it for a checkout
/// that matches HEAD (what `host keep` compares a comparison's row with).
pub fn committed_harness_hash(root: &Path, oracle_key: &str) -> anyhow::Result<String> {
    let committed = crate::revision::committed_hash(root, "HEAD", &HARNESS_PATHS)?;
    Ok(sha256_hex(format!("{committed}\n{oracle_key}").as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revision::tests::{commit, repo};

    #[test]
    fn the_harness_is_heads_or_it_is_flagged() {
        let dir = repo(
            "harness",
            &[
                ("Cargo.toml", "[workspace]"),
                ("host/src/main.rs", "fn main() {}"),
                ("prompts/protocol.toml", "min_agreement = 0.999"),
                ("variants/baseline/src/lib.rs", "// baseline"),
                ("variants/current/src/lib.rs", "// current"),
            ],
        );
        let built_from = crate::revision::committed_hash(&dir, "HEAD", &HOST_SOURCES).unwrap();
        let clean = harness_built_from(&dir, "key", &built_from).unwrap();
        assert!(clean.is_committed(), "{clean:?}");
        assert_eq!(clean.hash, committed_harness_hash(&dir, "key").unwrap());
        assert_ne!(
            clean.hash,
            committed_harness_hash(&dir, "other key").unwrap()
        );

        // The variant is not the harness.
        std::fs::write(dir.join("variants/current/src/lib.rs"), "// faster").unwrap();
        assert!(harness_built_from(&dir, "key", &built_from)
            .unwrap()
            .is_committed());

        // A lowered threshold, a new file in the host, a binary from other sources: flagged.
        std::fs::write(dir.join("prompts/protocol.toml"), "min_agreement = 0.5").unwrap();
        std::fs::write(dir.join("host/src/extra.rs"), "// new").unwrap();
        let edited = harness_built_from(&dir, "key", "another binary").unwrap();
        assert_eq!(
            edited.modified,
            [
                "host/src/extra.rs",
                "prompts/protocol.toml",
                "the running host binary (built from other sources than HEAD's)"
            ],
            "{edited:?}"
        );
        assert!(edited.hash.starts_with("modified-"), "{}", edited.hash);
        assert!(edited.describe().contains("prompts/protocol.toml"));
        // Committed, the edit is the new HEAD's harness, with another hash than before.
        let git = git2::Repository::open(&dir).unwrap();
        commit(&git, &[("prompts/protocol.toml", "min_agreement = 0.5")]);
        std::fs::remove_file(dir.join("host/src/extra.rs")).unwrap();
        let recommitted = harness_built_from(&dir, "key", &built_from).unwrap();
        assert!(recommitted.is_committed(), "{recommitted:?}");
        assert_ne!(recommitted.hash, clean.hash);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
