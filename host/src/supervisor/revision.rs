//! Variants as committed: `REV:PATH` arguments (`HEAD:variants/current`, `abc123:variants/current`)
//! and the quality oracle (`HEAD:variants/baseline`) are built from git objects, never from the
//! working copy.
//!
//! [`Committed::find`] resolves a revision and a variant path to its git objects and computes two
//! hashes without writing anything: the *build key*, over the object ids of everything the
//! build reads (root manifest, lock file, `plugin-api/`, the variant), and the variant's *content
//! hash*, in the same format as [`crate::vcs::tree_hash`] of a checkout, so a revision and a
//! directory holding the same files get the same hash. [`Committed::build`] builds the harness's
//! own code (the oracle) from the whole commit written to a scratch directory, in one shared
//! target directory (`<target>/autoinfer-git/target`), once per build key; variant code it
//! builds afresh every time in the one place every variant is built
//! ([`crate::supervisor::build_place`]), keeping the library under its build key for
//! `--no-build` ([`Committed::cached`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plugin_api::Device;

use crate::hashing::sha256_hex;
use crate::supervisor::build_place::{BuildSandbox, Sources};
use crate::supervisor::cargo_build::{device_feature, VariantCrate};
use crate::vcs::{content_hash, find_commit, materialise, open_repo, short, subtree};

/// The paths of a commit, besides the variant itself, whose content decides a variant's build:
/// what its build key hashes.
const BUILD_INPUTS: [&str; 3] = ["Cargo.toml", "Cargo.lock", "plugin-api"];

/// A variant argument: a directory, or a path inside a git revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VariantArg {
    /// A crate directory in the working tree.
    Dir(PathBuf),
    /// `rev:path`, the path relative to the repository's root.
    Revision { rev: String, path: String },
}

impl VariantArg {
    /// Reads `arg`: `REV:PATH` when it has a colon and no such directory exists, else a path.
    pub fn parse(arg: &str) -> VariantArg {
        match arg.split_once(':') {
            Some((rev, path)) if !rev.is_empty() && !Path::new(arg).exists() => {
                VariantArg::Revision {
                    rev: rev.to_string(),
                    path: path.trim_matches('/').to_string(),
                }
            }
            _ => VariantArg::Dir(PathBuf::from(arg)),
        }
    }
}

impl std::fmt::Display for VariantArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VariantArg::Dir(d) => write!(f, "{}", d.display()),
            VariantArg::Revision { rev, path } => write!(f, "{rev}:{path}"),
        }
    }
}

/// `<target>/autoinfer-git`, where target is `$CARGO_TARGET_DIR` (relative to the current
/// directory, as cargo reads it) or `<root>/target`. Committed builds live here.
pub fn builds_home(root: &Path) -> PathBuf {
    target_dir(root).join("autoinfer-git")
}

/// Where the harness builds the committed baseline (the quality oracle): its compiled
/// dependencies are what every confined variant build starts from, and only harness code is
/// ever built here.
pub fn seed_dir(root: &Path) -> PathBuf {
    builds_home(root).join("target")
}

/// The one place every variant is built ([`crate::supervisor::build_place`]).
pub fn place_dir(root: &Path) -> PathBuf {
    builds_home(root).join("place")
}

/// The target directory cargo uses for the checkout at `root`.
pub fn target_dir(root: &Path) -> PathBuf {
    crate::supervisor::cargo_build::target_dir_from_env().unwrap_or_else(|| root.join("target"))
}

/// A variant directory as one commit has it.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The commit's full id.
    pub commit: String,
    /// The variant's path inside the commit.
    pub path: String,
    /// Hex hash of the object ids of [`BUILD_INPUTS`] and the variant: what the build reads.
    pub key: String,
    /// Content hash of the variant's files (as [`crate::vcs::tree_hash`] computes it).
    pub tree: String,
    /// The crate's package name.
    pub package: String,
    root: PathBuf,
}

impl Committed {
    /// Resolves `rev` (anything `git rev-parse` takes) and the variant `path` in the repository
    /// holding `root`.
    pub fn find(root: &Path, rev: &str, path: &str) -> Result<Committed> {
        let repo = open_repo(root)?;
        let commit = find_commit(&repo, root, rev)?;
        let tree = commit.tree()?;
        let mut inputs = String::new();
        for input in BUILD_INPUTS.iter().copied().chain([path]) {
            let entry = tree.get_path(Path::new(input)).with_context(|| {
                format!("commit {} ({rev}) has no {input}", short(&commit.id()))
            })?;
            inputs.push_str(&format!("{input}:{}\n", entry.id()));
        }
        let variant = subtree(&repo, &commit, rev, path)?;
        let manifest = variant
            .get_path(Path::new("Cargo.toml"))
            .ok()
            .and_then(|e| e.to_object(&repo).ok())
            .and_then(|o| o.peel_to_blob().ok())
            .with_context(|| {
                format!("{rev}:{path} is not a variant crate: it has no Cargo.toml")
            })?;
        let manifest_name = PathBuf::from(format!("{rev}:{path}/Cargo.toml"));
        let package = crate::supervisor::cargo_build::package_of(
            &String::from_utf8_lossy(manifest.content()),
            &manifest_name,
        )?;
        Ok(Committed {
            commit: commit.id().to_string(),
            path: path.to_string(),
            key: sha256_hex(inputs.as_bytes()),
            tree: content_hash(&repo, &variant)?,
            package,
            root: root.to_path_buf(),
        })
    }

    /// The built library's cache path, for `device` (a build for another device than the CPU
    /// enables its cargo feature, so it is kept apart).
    pub fn library(&self, device: Device) -> PathBuf {
        let suffix = device_feature(device)
            .map(|f| format!("-{f}"))
            .unwrap_or_default();
        // `built/`: libraries from confined builds only (an older harness's unconfined ones
        // lived in `lib/` and are never reused).
        builds_home(&self.root).join("built").join(format!(
            "{}-{}{suffix}.so",
            self.package,
            &self.key[..16]
        ))
    }

    /// The built library for `device`. `sandbox` says how: `None` for the harness's own code
    /// (the committed baseline, the quality oracle): from the cache, or written out and built
    /// now in place in the seed directory ([`seed_dir`]), so later builds start from its
    /// compiled dependencies. `Some` for variant code: built now, confined, in the sandbox's
    /// one place ([`BuildSandbox::build`]) as a checkout's variant is, never taken from the
    /// cache (a library kept from an earlier build would tell the reference from a candidate
    /// built a moment ago); the cache keeps it for `--no-build` ([`Committed::cached`]).
    /// Cargo's output goes to the terminal.
    pub fn build(&self, device: Device, sandbox: Option<&BuildSandbox>) -> Result<PathBuf> {
        let lib = self.library(device);
        let repo = open_repo(&self.root)?;
        let tree = repo
            .find_commit(git2::Oid::from_str(&self.commit)?)?
            .tree()?;
        let built = match sandbox {
            Some(sandbox) => {
                let shown = format!("{}:{}", short_rev(&self.commit), self.path);
                Sources::from_commit(&repo, &tree, &self.path, &shown)
                    .and_then(|sources| Ok(sandbox.build(&sources, device, Some(&lib))?))
            }
            None if lib.is_file() => return Ok(lib),
            None => self.build_trusted(&repo, &tree, device, &lib),
        };
        built.with_context(|| {
            format!(
                "cannot build {}:{} (commit {})",
                short_rev(&self.commit),
                self.path,
                &self.commit[..12]
            )
        })
    }

    /// The library of an earlier build for `device` (`--no-build`, where no toolchain may be
    /// installed): an error naming where it was looked for when there is none.
    pub fn cached(&self, device: Device) -> Result<PathBuf> {
        let lib = self.library(device);
        anyhow::ensure!(
            lib.is_file(),
            "--no-build: {}:{} (commit {}) has no built library at {}; drop --no-build to \
             build it",
            short_rev(&self.commit),
            self.path,
            &self.commit[..12],
            lib.display()
        );
        Ok(lib)
    }

    /// Writes the whole commit out and builds the variant unconfined in the seed directory:
    /// harness code only.
    fn build_trusted(
        &self,
        repo: &git2::Repository,
        tree: &git2::Tree,
        device: Device,
        lib: &Path,
    ) -> Result<PathBuf> {
        let home = builds_home(&self.root);
        let src = home.join(format!("src-{}-{}", &self.key[..16], std::process::id()));
        let _ = std::fs::remove_dir_all(&src);
        materialise(repo, tree, &src).with_context(|| {
            format!(
                "cannot write commit {} to {}",
                &self.commit[..12],
                src.display()
            )
        })?;
        let built = (|| -> Result<PathBuf> {
            let built = VariantCrate::open(&src.join(&self.path))?
                .build_trusted(&seed_dir(&self.root), device)?;
            std::fs::create_dir_all(lib.parent().expect("lib/ has a parent"))?;
            let tmp = lib.with_extension(format!("so.tmp-{}", std::process::id()));
            std::fs::copy(&built, &tmp)
                .with_context(|| format!("cannot copy {} to {}", built.display(), tmp.display()))?;
            std::fs::rename(&tmp, lib)?;
            Ok(lib.to_path_buf())
        })();
        // The written-out tree is only needed by cargo; the library is kept by key.
        let _ = std::fs::remove_dir_all(&src);
        built
    }
}

fn short_rev(commit: &str) -> &str {
    &commit[..12.min(commit.len())]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// tools/gpu-stage.sh names A's library by this build key without the host (the GPU
    /// machine has no cargo to build it): its `key()` must hash the same inputs, in the same
    /// order and format (`input:object id` lines, the first 16 hex digits of their SHA-256).
    #[test]
    fn gpu_stage_computes_the_build_key_from_the_same_inputs() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/gpu-stage.sh");
        let text = std::fs::read_to_string(&script).unwrap();
        let line = format!(
            "for p in {} \"$1\"; do echo \"$p:$(git rev-parse \"HEAD:$p\")\"; done |",
            BUILD_INPUTS.join(" ")
        );
        assert!(text.contains(&line), "{} lacks `{line}`", script.display());
        assert!(
            text.contains("sha256sum | cut -c1-16"),
            "{}",
            script.display()
        );
    }

    /// A scratch git repository holding `files` in one commit (none when `files` is empty).
    pub fn repo(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("autoinfer-rev-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let repo = git2::Repository::init(&dir).unwrap();
        if files.is_empty() {
            return dir;
        }
        commit(&repo, files);
        dir
    }

    /// Writes `files` into the work tree and commits them.
    pub fn commit(repo: &git2::Repository, files: &[(&str, &str)]) {
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

    const MANIFEST: &str = "[package]\nname = \"current\"\n[lib]\ncrate-type = [\"cdylib\"]\n";

    pub const CHECKOUT: &[(&str, &str)] = &[
        ("Cargo.toml", "[workspace]"),
        ("Cargo.lock", "# lock"),
        ("plugin-api/src/lib.rs", "// api"),
        (
            "variants/baseline/Cargo.toml",
            "[package]\nname = \"baseline\"\n[lib]\ncrate-type = [\"cdylib\"]\n",
        ),
        ("variants/baseline/src/lib.rs", "// baseline v1"),
        ("variants/current/Cargo.toml", MANIFEST),
        ("variants/current/src/lib.rs", "// current v1"),
        ("README.md", "readme"),
    ];

    fn error_of(dir: &Path, rev: &str, path: &str) -> String {
        match Committed::find(dir, rev, path) {
            Ok(_) => panic!("{rev}:{path} in {} should be refused", dir.display()),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn arguments_are_paths_or_revisions() {
        assert_eq!(
            VariantArg::parse("HEAD:variants/current/"),
            VariantArg::Revision {
                rev: "HEAD".into(),
                path: "variants/current".into()
            }
        );
        assert_eq!(
            VariantArg::parse("variants/current"),
            VariantArg::Dir("variants/current".into())
        );
        assert_eq!(VariantArg::parse(":x"), VariantArg::Dir(":x".into()));
    }

    #[test]
    fn bad_revisions_are_named() {
        let outside =
            std::env::temp_dir().join(format!("autoinfer-rev-none-{}", std::process::id()));
        std::fs::create_dir_all(&outside).unwrap();
        assert!(error_of(&outside, "HEAD", "v").contains("not in a git repository"));
        let empty = repo("empty", &[]);
        assert!(error_of(&empty, "HEAD", "v").contains("HEAD has no commit"));
        let dir = repo("bad", CHECKOUT);
        let e = error_of(&dir, "nosuchbranch", "variants/current");
        assert!(e.contains("\"nosuchbranch\" is not a commit"), "{e}");
        let e = error_of(&dir, "HEAD", "variants/nope");
        assert!(e.contains("has no variants/nope"), "{e}");
        let e = error_of(&dir, "HEAD", "README.md");
        assert!(e.contains("is a file"), "{e}");
        let e = error_of(&dir, "HEAD", "plugin-api");
        assert!(e.contains("no Cargo.toml"), "{e}");
        for d in [outside, empty, dir] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn keys_follow_what_the_build_reads_and_hashes_match_checkouts() {
        let dir = repo("key", CHECKOUT);
        let git = git2::Repository::open(&dir).unwrap();
        let first = Committed::find(&dir, "HEAD", "variants/current").unwrap();
        assert_eq!(first.package, "current");
        // The content hash equals the checkout's directory hash.
        assert_eq!(
            first.tree,
            crate::vcs::tree_hash(&dir.join("variants/current"))
        );
        // An unrelated commit keeps the key; an edit of the variant or plugin-api changes it.
        commit(&git, &[("README.md", "readme v2")]);
        let same = Committed::find(&dir, "HEAD", "variants/current").unwrap();
        assert_ne!(first.commit, same.commit);
        assert_eq!(
            (first.key.as_str(), first.tree.as_str()),
            (same.key.as_str(), same.tree.as_str())
        );
        commit(&git, &[("plugin-api/src/lib.rs", "// api v2")]);
        let api = Committed::find(&dir, "HEAD", "variants/current").unwrap();
        assert_ne!(api.key, first.key);
        assert_eq!(
            api.tree, first.tree,
            "the variant's own files did not change"
        );
        commit(&git, &[("variants/current/src/lib.rs", "// current v2")]);
        let edited = Committed::find(&dir, "HEAD", "variants/current").unwrap();
        assert_ne!(edited.tree, first.tree);
        // Older revisions stay reachable.
        let old = Committed::find(&dir, &first.commit.to_string(), "variants/current").unwrap();
        assert_eq!(old.key, first.key);
        let parent = Committed::find(&dir, "HEAD~1", "variants/current").unwrap();
        assert_eq!(parent.key, api.key);
        // A build for a GPU is kept apart from the CPU build of the same key.
        let cpu = edited.library(Device::Cpu);
        let cuda = edited.library(Device::Cuda(1));
        assert_eq!(
            cpu.file_name().unwrap().to_str().unwrap(),
            format!("current-{}.so", &edited.key[..16])
        );
        assert_eq!(
            cuda.file_name().unwrap().to_str().unwrap(),
            format!("current-{}-cuda.so", &edited.key[..16])
        );
        assert_eq!(
            edited.library(Device::Cuda(0)),
            cuda,
            "one build serves every ordinal"
        );
        // `--no-build` takes a revision's earlier build, and names where it looked.
        let message = format!("{:#}", edited.cached(Device::Cpu).unwrap_err());
        assert!(
            message.contains("--no-build") && message.contains(&cpu.display().to_string()),
            "{message}"
        );
        std::fs::create_dir_all(cpu.parent().unwrap()).unwrap();
        std::fs::write(&cpu, "a library").unwrap();
        assert_eq!(edited.cached(Device::Cpu).unwrap(), cpu);
        std::fs::remove_file(&cpu).unwrap();

        // The commit's tree is what gets written out, not the working copy.
        std::fs::write(dir.join("variants/current/src/lib.rs"), "// not committed").unwrap();
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
            std::fs::read_to_string(out.join("variants/current/src/lib.rs")).unwrap(),
            "// current v2"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
