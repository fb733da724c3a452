//! The one place every variant is built: one source directory and one target directory,
//! `<target>/autoinfer-git/place/{src,target}`, used by one build at a time (a lock file).
//!
//! [`Sources`] is what a build reads: the repository's files, taken from a checkout's working
//! tree ([`Sources::from_checkout`]) or from a commit ([`Sources::from_commit`]) by one rule
//! (what a commit would hold, dot-entries and `target/` left out at any depth, a symbolic link
//! as the path it holds, every file written as a plain file), so that a clean checkout and its
//! HEAD give the same tree. [`BuildSandbox::build`] takes the lock, writes them to
//! `src/`, builds them confined into `target/` (a fresh copy of the seed), copies the library
//! out and clears both.
//!
//! Why one place: a build can read where it runs (`CARGO_MANIFEST_DIR`, `OUT_DIR`, the debug
//! info's paths, whether a git directory is readable) and keep it in the library. When the
//! reference was built from git in a directory of its own and the candidate in the checkout, a
//! variant could tell at build time which side of a comparison it was: a kept variant that
//! slowed itself as the reference would have made every later change read FASTER. Here both
//! sides are built from the same paths by the same process, fresh for every comparison, in an
//! order the comparison draws at random (`host compare`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use plugin_api::Device;

use crate::supervisor::cargo_build::{BuildError, VariantCrate};

/// The files a variant's build reads, wherever they came from.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The variant's directory, relative to the sources' root.
    pub variant: PathBuf,
    /// Every file (path relative to the sources' root, content), sorted by path.
    pub files: Vec<(PathBuf, Vec<u8>)>,
    /// The variant as its user named it, for messages.
    pub shown: PathBuf,
}

impl Sources {
    /// The variant directory `dir` of the checkout holding `root`: HEAD's files, except the
    /// variant's directory, the lock file and the harness ([`crate::vcs::HARNESS_PATHS`]),
    /// which are taken as the working tree has them (what a commit of them would hold: tracked
    /// and untracked files, not ignored ones). So the sources differ from HEAD's only where
    /// `host keep` would commit (or where the harness differs, which `host compare` refuses):
    /// an untracked file elsewhere in the checkout (a profile, notes) reaches neither side's
    /// build, and cannot tell the working tree's build from a commit's.
    pub fn from_checkout(root: &Path, dir: &Path) -> Result<Sources, BuildError> {
        let dir_abs = dir
            .canonicalize()
            .map_err(|_| BuildError::NoDir(dir.to_path_buf()))?;
        let unreadable = |e: anyhow::Error| BuildError::NoCheckout {
            root: root.to_path_buf(),
            message: format!("{e:#}"),
        };
        let repo = crate::vcs::open_repo(root).map_err(unreadable)?;
        let workdir = repo
            .workdir()
            .and_then(|w| w.canonicalize().ok())
            .ok_or_else(|| unreadable(anyhow::anyhow!("the repository has no working tree")))?;
        let variant = dir_abs
            .strip_prefix(&workdir)
            .map_err(|_| BuildError::OutsideCheckout {
                dir: dir.to_path_buf(),
                root: workdir.clone(),
            })?
            .to_path_buf();
        let from_tree = |path: &Path| {
            path.starts_with(&variant)
                || path == Path::new(crate::harness::LOCK)
                || crate::vcs::HARNESS_PATHS
                    .iter()
                    .any(|h| path.starts_with(h))
        };
        // HEAD's files first (none in a repository without a commit), then the working tree's.
        let mut files: Vec<(PathBuf, Vec<u8>)> = match repo.head().and_then(|h| h.peel_to_tree()) {
            Ok(head) => crate::vcs::all_committed_files(&repo, &head)
                .map_err(unreadable)?
                .into_iter()
                .filter(|(path, _)| !from_tree(path))
                .collect(),
            Err(_) => Vec::new(),
        };
        let has_head = !files.is_empty();
        for relative in crate::vcs::checkout_files(&repo).map_err(unreadable)? {
            if has_head && !from_tree(&relative) {
                continue;
            }
            let content = crate::vcs::worktree_content(&workdir, &relative).map_err(|source| {
                BuildError::Read {
                    path: workdir.join(&relative),
                    source,
                }
            })?;
            files.push((relative, content));
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        if !files.iter().any(|(path, _)| path.starts_with(&variant)) {
            return Err(BuildError::NothingToBuild {
                dir: dir.to_path_buf(),
            });
        }
        Ok(Sources {
            variant,
            files,
            shown: dir.to_path_buf(),
        })
    }

    /// The variant at `variant` (relative to the repository's root) with every file of the
    /// commit `tree`.
    pub fn from_commit(
        repo: &git2::Repository,
        tree: &git2::Tree,
        variant: &str,
        shown: &str,
    ) -> anyhow::Result<Sources> {
        Ok(Sources {
            variant: PathBuf::from(variant),
            files: crate::vcs::all_committed_files(repo, tree)?,
            shown: PathBuf::from(shown),
        })
    }

    /// Writes every file under `dir` (which must not exist yet).
    fn write(&self, dir: &Path) -> std::io::Result<()> {
        for (path, content) in &self.files {
            let full = dir.join(path);
            if let Some(parent) = full.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&full, content)?;
        }
        Ok(())
    }
}

/// Where and how variant code is built: confined ([`crate::sandbox`]), in the one place.
#[derive(Debug, Clone)]
pub struct BuildSandbox {
    /// A target directory whose compiled dependencies each build starts from (the committed
    /// baseline's, built by the harness), when it exists.
    pub seed: Option<PathBuf>,
    /// The place: `src/`, `target/`, `built/` (the libraries, named by the process that built
    /// them) and the lock file.
    pub dir: PathBuf,
    /// The checkout whose working tree a variant directory is taken from.
    pub checkout: PathBuf,
    /// How long one build may run before it is killed
    /// ([`crate::supervisor::cargo_build::BUILD_TIMEOUT_VAR`]).
    pub limit: std::time::Duration,
}

/// The lock on the place, held while it lives (the kernel drops it if the process dies).
struct PlaceLock(#[allow(dead_code)] File);

impl BuildSandbox {
    /// Builds `sources` for `device` in the place, confined, and copies the library to `out`
    /// (or to `built/<pid>-<n>.so` when `out` is `None`). One build at a time: a second
    /// process waits for the lock.
    pub fn build(
        &self,
        sources: &Sources,
        device: Device,
        out: Option<&Path>,
    ) -> Result<PathBuf, BuildError> {
        let place_error = |source: std::io::Error| BuildError::Slot {
            dir: self.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(place_error)?;
        let _lock = self.lock().map_err(place_error)?;
        let out = match out {
            Some(out) => out.to_path_buf(),
            None => self.next_output().map_err(place_error)?,
        };
        let (src, target) = (self.dir.join("src"), self.dir.join("target"));
        let built = (|| {
            clear(&src).map_err(place_error)?;
            sources.write(&src).map_err(place_error)?;
            self.fresh_target(&target).map_err(place_error)?;
            let variant = VariantCrate::open(&src.join(&sources.variant))?;
            let mut reads = vec![src.clone()];
            reads.extend(crate::sandbox::toolchain_paths());
            variant.build_confined(device, &reads, &target, &out, self.limit)
        })();
        let _ = clear(&src);
        let _ = clear(&target);
        built.map_err(|e| e.naming(&sources.shown))
    }

    /// Waits for, then holds, the place's lock.
    fn lock(&self) -> std::io::Result<PlaceLock> {
        use std::os::fd::AsRawFd;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("lock"))?;
        // SAFETY: flock on a descriptor this function owns; it blocks until the lock is free.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(PlaceLock(file))
    }

    /// A fresh name for a library in `built/`, after removing those of processes that are
    /// gone (each is named after the process that built it).
    fn next_output(&self) -> std::io::Result<PathBuf> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let built = self.dir.join("built");
        std::fs::create_dir_all(&built)?;
        for entry in std::fs::read_dir(&built)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            // SAFETY: signal 0 only asks whether the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            if !alive {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(built.join(format!(
            "{}-{}.so",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }

    /// `target` anew: a copy of the seed (file times kept, so cargo sees its dependencies as
    /// built), or empty; with the `tmp/` the build's `TMPDIR` points at.
    fn fresh_target(&self, target: &Path) -> std::io::Result<()> {
        clear(target)?;
        match &self.seed {
            Some(seed) if seed.is_dir() => {
                let status = Command::new("cp")
                    .arg("-a")
                    .arg("--reflink=auto")
                    .arg(seed)
                    .arg(target)
                    .status()?;
                if !status.success() {
                    return Err(std::io::Error::other(format!(
                        "cp -a {} {} failed ({status})",
                        seed.display(),
                        target.display()
                    )));
                }
            }
            _ => std::fs::create_dir_all(target)?,
        }
        std::fs::create_dir_all(target.join("tmp"))
    }
}

/// Removes `dir` and everything in it; a missing one is fine. A build script may have taken
/// the write permission off directories of its output (the place's `target/` is one path for
/// every build, so what one build leaves must not stop the next): those get it back first.
fn clear(dir: &Path) -> std::io::Result<()> {
    let gone = |result: std::io::Result<()>| match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    if gone(std::fs::remove_dir_all(dir)).is_ok() {
        return Ok(());
    }
    make_removable(dir);
    gone(std::fs::remove_dir_all(dir))
}

/// Gives every directory under `path` (symbolic links not followed) its owner's permissions.
fn make_removable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
    for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
        make_removable(&entry.path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit and its clean checkout give the same files, so both sides of a comparison
    /// build from identical trees when their contents are identical; a dot-file and `target/`
    /// are left out of both.
    #[test]
    fn a_commit_and_its_checkout_give_the_same_sources() {
        use crate::supervisor::revision::tests::{repo, CHECKOUT};
        let dir = repo("place-sources", CHECKOUT);
        std::fs::create_dir_all(dir.join("variants/current/target")).unwrap();
        std::fs::write(dir.join("variants/current/target/junk"), "x").unwrap();
        std::fs::write(dir.join("variants/current/.hidden"), "x").unwrap();
        let git = git2::Repository::open(&dir).unwrap();
        let tree = git.head().unwrap().peel_to_tree().unwrap();
        let committed =
            Sources::from_commit(&git, &tree, "variants/current", "HEAD:variants/current").unwrap();
        let checkout = Sources::from_checkout(&dir, &dir.join("variants/current")).unwrap();
        assert_eq!(committed.files, checkout.files);
        assert_eq!(committed.variant, checkout.variant);
        let names: Vec<String> = checkout
            .files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        let committed_names: Vec<&str> = CHECKOUT.iter().map(|(p, _)| *p).collect();
        let mut committed_names = committed_names;
        committed_names.sort();
        assert_eq!(
            names, committed_names,
            "no build output, dot-file or ignored file"
        );
        // An untracked file is the working tree's; an ignored one is not.
        std::fs::write(dir.join(".git/info/exclude"), "ignored.rs\n").unwrap();
        std::fs::write(dir.join("variants/current/src/ignored.rs"), "x").unwrap();
        std::fs::write(dir.join("variants/current/src/new.rs"), "x").unwrap();
        let untracked = Sources::from_checkout(&dir, &dir.join("variants/current")).unwrap();
        let paths: Vec<String> = untracked
            .files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        assert!(
            paths.contains(&"variants/current/src/new.rs".to_string()),
            "{paths:?}"
        );
        assert!(!paths.iter().any(|p| p.contains("ignored")), "{paths:?}");
        std::fs::remove_file(dir.join("variants/current/src/new.rs")).unwrap();
        // Outside the variant, the lock file and the harness, the files are HEAD's: an
        // untracked file or an edit there reaches no build, so the sources of a checkout with
        // nothing changed but elsewhere are still the commit's.
        std::fs::write(dir.join("notes.txt"), "untracked").unwrap();
        std::fs::write(dir.join("README.md"), "readme, edited").unwrap();
        let elsewhere = Sources::from_checkout(&dir, &dir.join("variants/current")).unwrap();
        assert_eq!(elsewhere.files, committed.files);
        // The lock file and the harness come from the working tree (a harness developer's
        // edit of plugin-api builds; `host compare` refuses a harness that differs).
        std::fs::write(dir.join("Cargo.lock"), "# lock, edited").unwrap();
        std::fs::write(dir.join("plugin-api/src/lib.rs"), "// api, edited").unwrap();
        let inputs = Sources::from_checkout(&dir, &dir.join("variants/current")).unwrap();
        for (path, text) in [
            ("Cargo.lock", "# lock, edited"),
            ("plugin-api/src/lib.rs", "// api, edited"),
        ] {
            let found = inputs.files.iter().find(|(p, _)| p == Path::new(path));
            assert_eq!(
                found.map(|(_, c)| c.as_slice()),
                Some(text.as_bytes()),
                "{path}"
            );
        }
        // A symbolic link is what a commit of it holds, the path it points at, never that
        // file's content (which would tell a working tree's build from a commit's, and let a
        // build read any file the host can); a file reached through a linked directory is
        // refused by name.
        let link = dir.join("variants/current/src/link.rs");
        std::os::unix::fs::symlink("../../../Cargo.toml", &link).unwrap();
        let linked = Sources::from_checkout(&dir, &dir.join("variants/current")).unwrap();
        let found = linked
            .files
            .iter()
            .find(|(p, _)| p == Path::new("variants/current/src/link.rs"));
        assert_eq!(
            found.map(|(_, c)| c.as_slice()),
            Some(b"../../../Cargo.toml".as_slice())
        );
        std::fs::remove_file(&link).unwrap();
        let src = dir.join("variants/current/src");
        std::fs::rename(&src, dir.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink("../../elsewhere", &src).unwrap();
        let message = format!(
            "{:#}",
            anyhow::Error::from(
                Sources::from_checkout(&dir, &dir.join("variants/current")).unwrap_err()
            )
        );
        assert!(
            message.contains("variants/current/src") && message.contains("symbolic link"),
            "{message}"
        );
        std::fs::remove_file(&src).unwrap();
        std::fs::rename(dir.join("elsewhere"), &src).unwrap();
        // An edit of the variant reaches the checkout's sources.
        std::fs::write(dir.join("variants/current/src/lib.rs"), "// current v2").unwrap();
        let edited = Sources::from_checkout(&dir, &dir.join("variants/current")).unwrap();
        assert_ne!(edited.files, committed.files);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_variant_outside_the_checkout_is_named() {
        use crate::supervisor::revision::tests::{repo, CHECKOUT};
        let root = repo("place-outside", CHECKOUT);
        let other =
            std::env::temp_dir().join(format!("autoinfer-place-other-{}", std::process::id()));
        std::fs::create_dir_all(&other).unwrap();
        let message = Sources::from_checkout(&root, &other)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(&other.display().to_string()) && message.contains("outside"),
            "{message}"
        );
        let missing = root.join("nowhere");
        let message = Sources::from_checkout(&root, &missing)
            .unwrap_err()
            .to_string();
        assert!(message.contains("nowhere"), "{message}");
        // A variant directory git ignores has nothing a build would be given.
        std::fs::write(root.join(".git/info/exclude"), "variants/ignored/\n").unwrap();
        std::fs::create_dir_all(root.join("variants/ignored/src")).unwrap();
        std::fs::write(root.join("variants/ignored/Cargo.toml"), "[package]").unwrap();
        let message = Sources::from_checkout(&root, &root.join("variants/ignored"))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("variants/ignored") && message.contains("ignore"),
            "{message}"
        );
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
    }

    /// A build that took the write permission off its output's directories does not stop the
    /// next build from clearing the place.
    #[test]
    fn a_target_left_unwritable_is_cleared() {
        use std::os::unix::fs::PermissionsExt;
        let dir =
            std::env::temp_dir().join(format!("autoinfer-place-clear-{}", std::process::id()));
        let locked = dir.join("release/build/locked");
        std::fs::create_dir_all(&locked).unwrap();
        std::fs::write(locked.join("file"), "x").unwrap();
        for d in [&locked, &dir.join("release")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o500)).unwrap();
        }
        clear(&dir).unwrap();
        assert!(!dir.exists());
        clear(&dir).expect("a missing directory is already clear");
    }

    /// Two processes' builds take turns: while one holds the place's lock, a second lock of
    /// the same place waits.
    #[test]
    fn the_place_is_used_by_one_build_at_a_time() {
        let dir = std::env::temp_dir().join(format!("autoinfer-place-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sandbox = BuildSandbox {
            seed: None,
            dir: dir.clone(),
            checkout: dir.clone(),
            limit: crate::supervisor::cargo_build::DEFAULT_BUILD_LIMIT,
        };
        let held = sandbox.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let other = sandbox.clone();
        let waiter = std::thread::spawn(move || {
            let lock = other.lock().unwrap();
            tx.send(()).unwrap();
            drop(lock);
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "a second lock must wait while the first is held"
        );
        drop(held);
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the second lock is granted once the first is dropped");
        waiter.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
