//! What a result row records about the code: the git commit, and content hashes of the variant
//! and of the harness.
//!
//! Hashes are over file contents (path and bytes, sorted, `target/` skipped), so an uncommitted
//! edit changes them: a row always identifies the code that actually ran.

use std::path::Path;

use crate::hashing::{hash_files, sha256_hex};

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

/// The harness hash: host and plugin-api sources (fixed at build time), the prompts and
/// protocol (read now) and the oracle, i.e. the committed baseline (`oracle_key`).
pub fn harness_hash(root: &Path, oracle_key: &str) -> String {
    let parts = [
        env!("AUTOINFER_HOST_SOURCE_HASH").to_string(),
        tree_hash(&root.join("prompts")),
        oracle_key.to_string(),
    ];
    sha256_hex(parts.concat().as_bytes())
}
