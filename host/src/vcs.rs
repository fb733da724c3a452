//! What a result row records about the code: the git commit, and content hashes of the variant
//! and of the harness.
//!
//! Hashes are over file contents (path and bytes, sorted, `target/` skipped), so an uncommitted
//! edit changes them: a row always identifies the code that actually ran. [`harness`] says
//! whether the harness that runs is HEAD's: `run` flags it when not, `compare` and `keep` refuse.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::hashing::{hash_entries, hash_files, is_skipped_name, sha256_hex, HOST_SOURCES};

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
    let committed = committed_harness_hash(root, oracle_key)?;
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
    let head_sources = committed_hash(root, "HEAD", &HOST_SOURCES)?;
    if built_from != head_sources {
        modified.push("the running host binary (built from other sources than HEAD's)".into());
    }
    let hash = if modified.is_empty() {
        committed
    } else {
        // Unique to what runs, and never equal to a committed harness's hash.
        let working = hash_files(root, &HARNESS_PATHS.map(|p| root.join(p)));
        format!(
            "modified-{}",
            sha256_hex(format!("{committed}\n{working}\n{built_from}").as_bytes())
        )
    };
    Ok(Harness { hash, modified })
}

/// HEAD's harness hash for the oracle `oracle_key`, as [`harness`] reports it for a checkout
/// that matches HEAD (what `host keep` compares a comparison's row with).
pub fn committed_harness_hash(root: &Path, oracle_key: &str) -> anyhow::Result<String> {
    let committed = committed_hash(root, "HEAD", &HARNESS_PATHS)?;
    Ok(sha256_hex(format!("{committed}\n{oracle_key}").as_bytes()))
}

/// The content hash of `path` as commit `rev` has it (see [`crate::supervisor::revision::Committed::tree`]).
pub fn tree_hash_at(root: &Path, rev: &str, path: &str) -> Result<String> {
    let repo = open_repo(root)?;
    let commit = find_commit(&repo, root, rev)?;
    let tree = subtree(&repo, &commit, rev, path)?;
    content_hash(&repo, &tree)
}

/// The content hash of `paths` (files or directories, relative to the repository's root) as
/// commit `rev` has them, in the format of [`crate::hashing::hash_files`] over the same paths
/// of a checkout, so a clean checkout and its HEAD hash alike. Missing paths are skipped.
pub fn committed_hash(root: &Path, rev: &str, paths: &[&str]) -> Result<String> {
    let repo = open_repo(root)?;
    let commit = find_commit(&repo, root, rev)?;
    let tree = commit.tree()?;
    let files = committed_files(&repo, &tree, paths)?;
    Ok(hash_entries(files))
}

/// Every file of `paths` (files or directories, relative to the repository's root) in `tree`,
/// skipped names left out, sorted by path: the set [`crate::hashing::list_files`] finds in a
/// checkout. Missing paths are skipped.
pub(crate) fn committed_files(
    repo: &git2::Repository,
    tree: &git2::Tree,
    paths: &[&str],
) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut entries = Vec::new();
    for path in paths {
        let Ok(entry) = tree.get_path(Path::new(path)) else {
            continue;
        };
        match entry.kind() {
            Some(git2::ObjectType::Blob) => entries.push((
                PathBuf::from(path),
                repo.find_blob(entry.id())?.content().to_vec(),
            )),
            Some(git2::ObjectType::Tree) => collect_blobs(
                repo,
                &repo.find_tree(entry.id())?,
                PathBuf::from(path),
                &mut entries,
            )?,
            _ => {}
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries.dedup_by(|a, b| a.0 == b.0);
    Ok(entries)
}

/// Every file of `tree` (skipped names left out), sorted by path: the set
/// [`checkout_files`] finds in a clean checkout of it.
pub(crate) fn all_committed_files(
    repo: &git2::Repository,
    tree: &git2::Tree,
) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut entries = Vec::new();
    collect_blobs(repo, tree, PathBuf::new(), &mut entries)?;
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// Every file of the working tree of `repo` that a commit of everything would hold (tracked,
/// or untracked and not ignored; a tracked file deleted from the tree is not), skipped names
/// left out at any depth, relative to the working tree and sorted.
pub(crate) fn checkout_files(repo: &git2::Repository) -> Result<Vec<PathBuf>> {
    let workdir = repo
        .workdir()
        .context("the repository has no working tree")?;
    let mut files = std::collections::BTreeSet::new();
    for entry in repo.index()?.iter() {
        files.insert(PathBuf::from(
            String::from_utf8_lossy(&entry.path).into_owned(),
        ));
    }
    let mut options = git2::StatusOptions::new();
    options
        .include_untracked(true)
        .recurse_untracked_dirs(true)
        .include_ignored(false);
    for status in repo.statuses(Some(&mut options))?.iter() {
        if status.status().contains(git2::Status::WT_NEW) {
            if let Some(path) = status.path() {
                files.insert(PathBuf::from(path));
            }
        }
    }
    Ok(files
        .into_iter()
        .filter(|path| {
            !path
                .components()
                .any(|c| is_skipped_name(&c.as_os_str().to_string_lossy()))
                && std::fs::symlink_metadata(workdir.join(path))
                    .is_ok_and(|m| m.is_file() || m.file_type().is_symlink())
        })
        .collect())
}

/// The content of `relative` in the working tree `workdir` (canonical) as a commit of it would
/// hold it ([`crate::hashing::git_content`]: a symbolic link as the path it holds, not the file
/// it points at), refused when a directory on its way is a link: git commits no file through
/// one, and reading through it would reach outside the checkout.
pub(crate) fn worktree_content(workdir: &Path, relative: &Path) -> std::io::Result<Vec<u8>> {
    let path = workdir.join(relative);
    let parent = path.parent().unwrap_or(workdir);
    if parent.canonicalize()? != parent {
        return Err(std::io::Error::other(format!(
            "{} is reached through a symbolic link; git commits no file through one",
            parent.display()
        )));
    }
    crate::hashing::git_content(&path)
}

/// The commit `rev` names, with an error that says which revision and repository.
pub(crate) fn find_commit<'r>(
    repo: &'r git2::Repository,
    root: &Path,
    rev: &str,
) -> Result<git2::Commit<'r>> {
    repo.revparse_single(rev)
        .and_then(|o| o.peel_to_commit())
        .with_context(|| {
            if rev == "HEAD" {
                "HEAD has no commit yet: commit the checkout first".to_string()
            } else {
                format!(
                    "{rev:?} is not a commit of the repository at {}",
                    root.display()
                )
            }
        })
}

/// The directory `path` of `commit` (named `rev` in errors).
pub(crate) fn subtree<'r>(
    repo: &'r git2::Repository,
    commit: &git2::Commit,
    rev: &str,
    path: &str,
) -> Result<git2::Tree<'r>> {
    commit
        .tree()?
        .get_path(Path::new(path))
        .with_context(|| format!("commit {} ({rev}) has no {path}", short(&commit.id())))?
        .to_object(repo)?
        .peel_to_tree()
        .with_context(|| format!("{rev}:{path} is a file, not a variant directory"))
}

/// The first 12 hex digits of a commit id.
pub(crate) fn short(oid: &git2::Oid) -> String {
    oid.to_string()[..12].to_string()
}

/// The repository holding `root`.
pub(crate) fn open_repo(root: &Path) -> Result<git2::Repository> {
    git2::Repository::discover(root).with_context(|| {
        format!(
            "{} is not in a git repository (committed variants and the quality oracle are read from git)",
            root.display()
        )
    })
}

/// The content hash of a committed directory: every blob's path and bytes, in the format and
/// order of [`crate::hashing::hash_files`], skipping the same names.
pub(crate) fn content_hash(repo: &git2::Repository, tree: &git2::Tree) -> Result<String> {
    let mut entries = Vec::new();
    collect_blobs(repo, tree, PathBuf::new(), &mut entries)?;
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(hash_entries(entries))
}

/// Every blob under `tree` (skipped names left out), with its path below `prefix`.
fn collect_blobs(
    repo: &git2::Repository,
    tree: &git2::Tree,
    prefix: PathBuf,
    out: &mut Vec<(PathBuf, Vec<u8>)>,
) -> Result<()> {
    for entry in tree.iter() {
        let name = entry.name().unwrap_or("_");
        if is_skipped_name(name) {
            continue;
        }
        let path = prefix.join(name);
        match entry.kind() {
            Some(git2::ObjectType::Blob) => {
                out.push((path, repo.find_blob(entry.id())?.content().to_vec()))
            }
            Some(git2::ObjectType::Tree) => {
                collect_blobs(repo, &repo.find_tree(entry.id())?, path, out)?
            }
            _ => {}
        }
    }
    Ok(())
}

/// Writes every blob of `tree` under `dir` (executable bits and symlinks are not needed to
/// build a crate and are written as plain files).
pub(crate) fn materialise(repo: &git2::Repository, tree: &git2::Tree, dir: &Path) -> Result<()> {
    let mut failure: Option<anyhow::Error> = None;
    tree.walk(git2::TreeWalkMode::PreOrder, |parent, entry| {
        if entry.kind() != Some(git2::ObjectType::Blob) {
            return git2::TreeWalkResult::Ok;
        }
        let path = dir.join(parent).join(entry.name().unwrap_or("_"));
        let written = repo
            .find_blob(entry.id())
            .map_err(anyhow::Error::from)
            .and_then(|blob| {
                if let Some(p) = path.parent() {
                    std::fs::create_dir_all(p)?;
                }
                std::fs::write(&path, blob.content())?;
                Ok(())
            });
        match written {
            Ok(()) => git2::TreeWalkResult::Ok,
            Err(e) => {
                failure = Some(e.context(path.display().to_string()));
                git2::TreeWalkResult::Abort
            }
        }
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::revision::tests::{commit, repo};

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
        let built_from = committed_hash(&dir, "HEAD", &HOST_SOURCES).unwrap();
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
