//! What a result row records about the code: the git commit, and content hashes of the variant
//! and of the harness.
//!
//! Hashes are over file contents (path and bytes, sorted, `target/` skipped), so an uncommitted
//! edit changes them: a row always identifies the code that actually ran.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

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

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "target" || name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Hex SHA-256 over the relative paths and contents of every file under `dir`.
pub fn tree_hash(dir: &Path) -> String {
    let mut files = Vec::new();
    collect(dir, &mut files);
    files.sort();
    let mut hasher = Sha256::new();
    for file in &files {
        hasher.update(
            file.strip_prefix(dir)
                .unwrap_or(file)
                .to_string_lossy()
                .as_bytes(),
        );
        hasher.update([0]);
        hasher.update(std::fs::read(file).unwrap_or_default());
        hasher.update([0]);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The harness hash: host and plugin-api sources (fixed at build time), the prompts and the
/// baseline variant (read now).
pub fn harness_hash(root: &Path) -> String {
    let mut hasher = Sha256::new();
    hasher.update(env!("AUTOINFER_HOST_SOURCE_HASH"));
    hasher.update(tree_hash(&root.join("prompts")));
    hasher.update(tree_hash(&root.join("variants/baseline")));
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_hash_follows_content_and_ignores_target() {
        let dir = std::env::temp_dir().join(format!("autoinfer-vcs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::create_dir_all(dir.join("target")).unwrap();
        std::fs::write(dir.join("src/lib.rs"), "a").unwrap();
        let h1 = tree_hash(&dir);
        std::fs::write(dir.join("target/junk"), "x").unwrap();
        assert_eq!(h1, tree_hash(&dir), "target/ must not count");
        std::fs::write(dir.join("src/lib.rs"), "b").unwrap();
        assert_ne!(h1, tree_hash(&dir), "an edit must change the hash");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
