//! The quality oracle: `variants/baseline` as committed, scoring every timed request.
//!
//! [`OracleBuild::prepare`] takes the baseline from git's HEAD, never from the working copy (an
//! agent may have edited that): it writes HEAD's tree to `<target>/autoinfer-oracle/src-<key>`
//! and builds it there with its own target directory, so the working tree's build outputs are
//! never mixed with it. The key hashes the git objects of everything the baseline's build
//! reads (root manifest and lock file, `plugin-api/`, `variants/baseline/`), and the built
//! library is kept under that key: the oracle is built once per baseline revision.
//!
//! [`Oracle`] answers two questions, each with a cache on disk keyed by (model, oracle key,
//! tokens): the teacher-forced scores of a token sequence ([`Oracle::scores`]), and the
//! baseline's own greedy answer to a prompt ([`Oracle::reference`]). Its worker is started
//! only on a cache miss, after the variant's worker is gone, so scoring never overlaps timing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};

use crate::cargo_build::VariantCrate;
use crate::hashing::sha256_hex;
use crate::quality::Scored;
use crate::supervisor::Worker;
use crate::wire::{Reply, Request};

/// The paths of HEAD whose content the baseline's build reads.
const ORACLE_INPUTS: [&str; 4] = [
    "Cargo.toml",
    "Cargo.lock",
    "plugin-api",
    "variants/baseline",
];

/// The baseline variant of HEAD, built.
#[derive(Debug, Clone)]
pub struct OracleBuild {
    /// Hex hash of the git objects of [`ORACLE_INPUTS`] at HEAD.
    pub key: String,
    /// The commit the baseline was taken from.
    pub commit: String,
    /// The built cdylib.
    pub lib: PathBuf,
    /// Where the oracle's sources, build and caches live.
    pub home: PathBuf,
}

/// `<target>/autoinfer-oracle`, where target is `$CARGO_TARGET_DIR` (relative to the current
/// directory, as cargo reads it) or `<root>/target`.
fn oracle_home(root: &Path) -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => std::env::current_dir()
            .unwrap_or_default()
            .join(PathBuf::from(dir)),
        None => root.join("target"),
    };
    target.join("autoinfer-oracle")
}

impl OracleBuild {
    /// Finds (or builds) the baseline of the checkout's HEAD commit.
    pub fn prepare(root: &Path) -> Result<OracleBuild> {
        let (repo, commit, key) = head_inputs(root)?;
        let tree = repo.find_commit(commit)?.tree()?;
        let commit = commit.to_string();
        let short = &key[..16];
        let home = oracle_home(root);
        let lib = home.join("lib").join(format!("libbaseline-{short}.so"));
        let build = OracleBuild {
            key: key.clone(),
            commit,
            lib: lib.clone(),
            home: home.clone(),
        };
        if lib.is_file() {
            return Ok(build);
        }

        let src = home.join(format!("src-{short}"));
        if !src.join("variants/baseline/Cargo.toml").is_file() {
            let tmp = home.join(format!(".src-{short}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            materialise(&repo, &tree, &tmp)
                .with_context(|| format!("cannot write HEAD's tree to {}", tmp.display()))?;
            if std::fs::rename(&tmp, &src).is_err() {
                // Another run materialised the same tree first; theirs is as good as ours.
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        eprintln!(
            "building the quality oracle: variants/baseline of commit {} (once per baseline revision)",
            &build.commit[..12]
        );
        let crate_ = VariantCrate::open(&src.join("variants/baseline"))?;
        let built = crate_
            .build_in(Some(&home.join("target")))
            .context("cannot build the quality oracle (HEAD's variants/baseline)")?;
        std::fs::create_dir_all(home.join("lib"))?;
        let tmp = lib.with_extension(format!("so.tmp-{}", std::process::id()));
        std::fs::copy(&built, &tmp)
            .with_context(|| format!("cannot copy {} to {}", built.display(), tmp.display()))?;
        std::fs::rename(&tmp, &lib)?;
        prune_sources(&home, &src);
        Ok(build)
    }
}

/// Removes the written-out trees of earlier baseline revisions (their built libraries stay, so
/// going back to one costs nothing), keeping `current`. Trees still being written (`.src-*`,
/// perhaps by a run in parallel) are left alone. Failures only cost disk space.
fn prune_sources(home: &Path, current: &Path) {
    let Ok(entries) = std::fs::read_dir(home) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("src-") && entry.path() != current {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The repository of `root`, its HEAD commit, and the key: a hash of the git object ids of
/// [`ORACLE_INPUTS`] at HEAD (so it changes exactly when what the baseline's build reads does).
fn head_inputs(root: &Path) -> Result<(git2::Repository, git2::Oid, String)> {
    let repo = git2::Repository::discover(root).with_context(|| {
        format!(
            "the quality oracle is variants/baseline as committed, but {} is not in a git repository",
            root.display()
        )
    })?;
    let (commit, inputs) = {
        let commit = repo
            .head()
            .and_then(|h| h.peel_to_commit())
            .context("the quality oracle is variants/baseline as committed, but HEAD has no commit yet: commit the checkout first")?;
        let tree = commit.tree()?;
        let mut inputs = String::new();
        for path in ORACLE_INPUTS {
            let entry = tree.get_path(Path::new(path)).with_context(|| {
                format!(
                    "HEAD ({}) has no {path}: the quality oracle is built from the committed variants/baseline",
                    commit.id()
                )
            })?;
            inputs.push_str(&format!("{path}:{}\n", entry.id()));
        }
        (commit.id(), inputs)
    };
    let key = sha256_hex(inputs.as_bytes());
    Ok((repo, commit, key))
}

/// Writes every blob of `tree` under `dir` (executable bits and symlinks are not needed to
/// build a crate and are written as plain files).
fn materialise(repo: &git2::Repository, tree: &git2::Tree, dir: &Path) -> Result<()> {
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

/// What the oracle cost a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OracleCost {
    /// Sequences scored by the oracle's worker (cache misses).
    pub scored: usize,
    /// Reference answers generated by the oracle's worker.
    pub generated: usize,
    /// Answers taken from the cache.
    pub cache_hits: usize,
    /// Wall time of the whole quality phase, worker start included.
    pub seconds: f64,
}

/// A scoring session: the oracle's build, its caches and (on a miss) its worker.
pub struct Oracle {
    build: OracleBuild,
    model_path: PathBuf,
    model_sha256: String,
    timeout: Duration,
    verbose: bool,
    worker: Option<Worker>,
    started: Instant,
    /// Counters for the record.
    pub cost: OracleCost,
}

fn ids_bytes(parts: &[&[u32]]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for part in parts {
        bytes.extend((part.len() as u64).to_le_bytes());
        for id in *part {
            bytes.extend(id.to_le_bytes());
        }
    }
    bytes
}

impl Oracle {
    /// A session over `build` for the model at `model_path` (whose SHA-256 keys the caches).
    pub fn new(
        build: OracleBuild,
        model_path: &Path,
        model_sha256: &str,
        timeout: Duration,
        verbose: bool,
    ) -> Oracle {
        Oracle {
            build,
            model_path: model_path.into(),
            model_sha256: model_sha256.into(),
            timeout,
            verbose,
            worker: None,
            started: Instant::now(),
            cost: OracleCost::default(),
        }
    }

    /// The oracle's name in messages.
    pub fn name(&self) -> String {
        format!(
            "the oracle (variants/baseline of commit {})",
            &self.build.commit[..12.min(self.build.commit.len())]
        )
    }

    fn cache_path(&self, kind: &str, parts: &[&[u32]], extra: &str) -> PathBuf {
        let mut key = format!(
            "{}\n{}\n{kind}\n{extra}\n",
            self.model_sha256, self.build.key
        )
        .into_bytes();
        key.extend(ids_bytes(parts));
        self.build
            .home
            .join("cache")
            .join(kind)
            .join(format!("{}.json", sha256_hex(&key)))
    }

    fn worker(&mut self) -> Result<&mut Worker> {
        if self.worker.is_none() {
            let name = self.name();
            let w = Worker::spawn(
                &name,
                &self.build.lib,
                &self.model_path,
                self.timeout,
                self.verbose,
            )?;
            self.worker = Some(w);
        }
        Ok(self.worker.as_mut().expect("just started"))
    }

    /// The oracle's scores of `emitted` after `prompt`: one per emitted token.
    pub fn scores(&mut self, prompt: &[u32], emitted: &[u32], label: &str) -> Result<Vec<Scored>> {
        let path = self.cache_path("scores", &[prompt, emitted], "");
        if let Some(hit) = read_cache::<Vec<Scored>, Scored>(&path, emitted.len()) {
            self.cost.cache_hits += 1;
            return Ok(hit);
        }
        let name = self.name();
        if prompt.is_empty() {
            bail!("{name} cannot score {label}: the prompt is empty");
        }
        let tokens: Vec<u32> = prompt.iter().chain(emitted).copied().collect();
        let timeout = self.timeout;
        let reply = self
            .worker()?
            .request(&Request::Score { tokens }, label, timeout)?;
        let Reply::Scored { positions } = reply else {
            bail!("{name} answered {label} with something other than scores");
        };
        let total = prompt.len() + emitted.len();
        if positions.len() + 1 != total {
            bail!(
                "{name} returned {} scores for {label}, a {total}-token sequence (expected {})",
                positions.len(),
                total.saturating_sub(1)
            );
        }
        let scores: Vec<Scored> = positions[prompt.len() - 1..]
            .iter()
            .map(|&(logprob, argmax, argmax_logprob)| Scored {
                logprob,
                argmax,
                argmax_logprob,
            })
            .collect();
        self.cost.scored += 1;
        write_cache(&path, &scores);
        Ok(scores)
    }

    /// The baseline's own greedy answer of `max_new` tokens to `prompt`.
    pub fn reference(&mut self, prompt: &[u32], max_new: u32, label: &str) -> Result<Vec<u32>> {
        let path = self.cache_path("reference", &[prompt], &max_new.to_string());
        if let Some(hit) = read_cache::<Vec<u32>, u32>(&path, max_new as usize) {
            self.cost.cache_hits += 1;
            return Ok(hit);
        }
        let timeout = self.timeout;
        let name = self.name();
        let request = Request::Generate {
            prompt: prompt.to_vec(),
            max_new_tokens: max_new,
        };
        let reply = self.worker()?.request(&request, label, timeout)?;
        let Reply::Generated { tokens, .. } = reply else {
            bail!("{name} answered {label} with something other than tokens");
        };
        if tokens.len() != max_new as usize {
            bail!(
                "{name} emitted {} tokens for {label}, not {max_new}",
                tokens.len()
            );
        }
        self.cost.generated += 1;
        write_cache(&path, &tokens);
        Ok(tokens)
    }

    /// Records that `prompt` + `tokens` is the baseline's own greedy answer (every token is
    /// the oracle's argmax), so a later run need not generate it.
    pub fn remember_reference(&self, prompt: &[u32], tokens: &[u32]) {
        let max_new = tokens.len().to_string();
        let path = self.cache_path("reference", &[prompt], &max_new);
        if !path.is_file() {
            write_cache(&path, &tokens.to_vec());
        }
    }

    /// Stops the worker (if one ran) and returns the session's cost.
    pub fn finish(mut self) -> OracleCost {
        self.worker = None;
        self.cost.seconds = self.started.elapsed().as_secs_f64();
        self.cost
    }
}

/// A cached answer, when present, readable and of the expected length (anything else is
/// recomputed).
fn read_cache<T: DeserializeOwned + AsRef<[E]>, E>(path: &Path, len: usize) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    let value: T = serde_json::from_str(&text).ok()?;
    (value.as_ref().len() == len).then_some(value)
}

/// Writes a cache entry atomically; a cache that cannot be written only costs time later.
fn write_cache<T: Serialize>(path: &Path, value: &T) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    if let Ok(text) = serde_json::to_string(value) {
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch git repository holding `files` in one commit (none when `files` is empty).
    fn repo(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("autoinfer-oracle-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let repo = git2::Repository::init(&dir).unwrap();
        if files.is_empty() {
            return dir;
        }
        commit(&repo, files);
        dir
    }

    fn commit(repo: &git2::Repository, files: &[(&str, &str)]) {
        let dir = repo.workdir().unwrap().to_path_buf();
        let mut index = repo.index().unwrap();
        for (path, text) in files {
            let full = dir.join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(&full, text).unwrap();
            index.add_path(Path::new(path)).unwrap();
        }
        index.write().unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("test", "test@example.com").unwrap();
        let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        repo.commit(Some("HEAD"), &sig, &sig, "test", &tree, &parents)
            .unwrap();
    }

    #[test]
    fn cache_entries_round_trip_and_wrong_lengths_are_misses() {
        let dir =
            std::env::temp_dir().join(format!("autoinfer-oracle-cache-{}", std::process::id()));
        let path = dir.join("scores/x.json");
        let scores = vec![Scored {
            logprob: -0.5,
            argmax: 7,
            argmax_logprob: -0.25,
        }];
        write_cache(&path, &scores);
        assert_eq!(read_cache::<Vec<Scored>, Scored>(&path, 1), Some(scores));
        assert_eq!(read_cache::<Vec<Scored>, Scored>(&path, 2), None);
        std::fs::write(&path, "{ truncated").unwrap();
        assert_eq!(read_cache::<Vec<Scored>, Scored>(&path, 1), None);
        std::fs::remove_dir_all(dir).unwrap();
        // Keys are length-prefixed: a prompt/answer split cannot collide with another.
        assert_ne!(ids_bytes(&[&[1, 2], &[3]]), ids_bytes(&[&[1], &[2, 3]]));
    }

    const CHECKOUT: &[(&str, &str)] = &[
        ("Cargo.toml", "[workspace]"),
        ("Cargo.lock", "# lock"),
        ("plugin-api/src/lib.rs", "// api"),
        ("variants/baseline/src/lib.rs", "// baseline v1"),
        ("variants/current/src/lib.rs", "// current v1"),
        ("README.md", "readme"),
    ];

    fn error_of(dir: &Path) -> String {
        match head_inputs(dir) {
            Ok(_) => panic!("{} should be refused", dir.display()),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn no_repository_or_no_baseline_is_a_clear_error() {
        let outside =
            std::env::temp_dir().join(format!("autoinfer-oracle-none-{}", std::process::id()));
        std::fs::create_dir_all(&outside).unwrap();
        let err = error_of(&outside);
        assert!(err.contains("not in a git repository"), "{err}");
        let empty = repo("empty", &[]);
        let err = error_of(&empty);
        assert!(err.contains("HEAD has no commit"), "{err}");
        let partial = repo("partial", &CHECKOUT[..3]);
        let err = error_of(&partial);
        assert!(err.contains("has no variants/baseline"), "{err}");
        for d in [outside, empty, partial] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn the_key_follows_the_committed_baseline_only() {
        let dir = repo("key", CHECKOUT);
        let (git, first, key) = head_inputs(&dir).unwrap();
        // Editing the working copy, or committing an unrelated file, keeps the oracle.
        std::fs::write(
            dir.join("variants/baseline/src/lib.rs"),
            "// edited, not committed",
        )
        .unwrap();
        commit(&git, &[("variants/current/src/lib.rs", "// current v2")]);
        let (_, second, same) = head_inputs(&dir).unwrap();
        assert_ne!(first, second);
        assert_eq!(key, same);
        // Committing a change to the baseline (or plugin-api) makes a new oracle.
        commit(&git, &[("variants/baseline/src/lib.rs", "// baseline v2")]);
        let (_, _, changed) = head_inputs(&dir).unwrap();
        assert_ne!(key, changed);

        // HEAD's tree is what gets written out, not the working copy.
        let out = dir.join("materialised");
        let head = git
            .head()
            .unwrap()
            .peel_to_commit()
            .unwrap()
            .tree()
            .unwrap();
        materialise(&git, &head, &out).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("variants/baseline/src/lib.rs")).unwrap(),
            "// baseline v2"
        );
        assert_eq!(
            std::fs::read_to_string(out.join("README.md")).unwrap(),
            "readme"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
