//! Building a variant directory into its cdylib with cargo.
//!
//! [`VariantCrate::open`] checks the directory is a crate whose `[lib]` is a `cdylib` before any
//! compiling starts. [`VariantCrate::build_confined`] runs `cargo build --release` confined
//! (cargo's own output, errors included, goes to the user's terminal) and reads the library's
//! path from cargo's JSON messages; where it builds, and from which copy of the sources, is
//! [`crate::supervisor::build_place`]'s business. [`VariantCrate::built_library`] finds a library
//! without building (`--no-build`). A build for a device other than the CPU enables the
//! device's cargo feature (`cuda`, `metal`), which the manifest must declare.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use plugin_api::Device;

use crate::sandbox::{Level, Support};
use crate::supervisor::build_place::{BuildSandbox, Sources};

/// The cargo feature a variant builds `device`'s support under (`None` for the CPU, which every
/// variant supports): the host's build rule, which a variant's manifest must follow.
pub fn device_feature(device: Device) -> Option<&'static str> {
    match device {
        Device::Cpu => None,
        Device::Cuda(_) => Some("cuda"),
        Device::Metal(_) => Some("metal"),
    }
}

/// Why a variant could not be built or found.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("variant directory {0} does not exist")]
    NoDir(PathBuf),
    #[error("{0} is not a variant crate: it has no Cargo.toml")]
    NoManifest(PathBuf),
    #[error("{path}: {message}")]
    BadManifest { path: PathBuf, message: String },
    #[error("{path}: a variant must be a cdylib crate; add `[lib] crate-type = [\"cdylib\"]`")]
    NotCdylib { path: PathBuf },
    #[error(
        "--no-build: cannot run cargo ({cargo}) to ask where the target directory is; where no \
         toolchain is installed, set CARGO_TARGET_DIR to it (e.g. CARGO_TARGET_DIR=target)"
    )]
    NoCargoForTarget {
        cargo: String,
        source: std::io::Error,
    },
    #[error("cannot run cargo ({cargo})")]
    Cargo {
        cargo: String,
        source: std::io::Error,
    },
    #[error("cargo build of variant {dir} failed ({status}); cargo's errors are above")]
    Failed { dir: PathBuf, status: String },
    #[error(
        "cargo build of variant {dir} did not end within {seconds} s, and was killed with \
         everything it started (a build script or proc macro that hangs, or a process it left \
         holding cargo's output open?); {BUILD_TIMEOUT_VAR}=SECONDS sets the limit"
    )]
    TimedOut { dir: PathBuf, seconds: u64 },
    #[error(
        "{BUILD_TIMEOUT_VAR} is {value:?}: it is the seconds a variant's build may take, a whole \
         number from 1 to {} (unset: {})",
        MAX_BUILD_LIMIT.as_secs(),
        DEFAULT_BUILD_LIMIT.as_secs()
    )]
    BadLimit { value: String },
    #[error("cargo built variant {dir} but reported no cdylib for package {package}")]
    NoArtifact { dir: PathBuf, package: String },
    #[error(
        "--no-build: variant {dir} has no built library at {lib}; build it with \
         `cargo build --release -p {package}` (the host's own builds are confined to private \
         directories and leave none there), or drop --no-build"
    )]
    NotBuilt {
        dir: PathBuf,
        lib: PathBuf,
        package: String,
    },
    #[error(
        "--no-build: {lib} was last built from the crate at {built_from}, not from variant \
         {dir} (so says cargo's record of that build, {dep_info}); build this crate \
         (`cargo build --release --manifest-path {dir}/Cargo.toml`), or name the directory \
         the library was built from"
    )]
    BuiltFromElsewhere {
        dir: PathBuf,
        lib: PathBuf,
        dep_info: PathBuf,
        built_from: String,
    },
    #[error(
        "variant {dir} lies outside the checkout {root}: variants are built from inside the \
         checkout (with its workspace manifest and plugin-api)"
    )]
    OutsideCheckout { dir: PathBuf, root: PathBuf },
    #[error("cannot list the files of the checkout {root} for a variant's build: {message}")]
    NoCheckout { root: PathBuf, message: String },
    #[error(
        "variant {dir} has no file a commit would hold (git ignores it?): a variant is built \
         from the files git would commit, tracked or not; see .gitignore"
    )]
    NothingToBuild { dir: PathBuf },
    #[error(
        "the library a confined build left, {lib}, is not a plain file (a link?): the host \
         copies only a file the build wrote itself"
    )]
    NotAFile { lib: PathBuf },
    #[error("cannot read {path}, a file of the variant's build")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot prepare the build place {dir}")]
    Slot {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot copy the built library {from} to {to}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("variant {dir} cannot be built for {device}: its Cargo.toml declares no `{feature}` feature (variants/baseline's shows how)")]
    NoDeviceFeature {
        dir: PathBuf,
        device: Device,
        feature: &'static str,
    },
}

impl BuildError {
    /// The same error naming the variant as its user gave it (`shown`) where it named the
    /// copy a build read ([`BuildSandbox::build`] builds a copy in its place).
    pub(crate) fn naming(self, shown: &Path) -> BuildError {
        match self {
            BuildError::Failed { status, .. } => BuildError::Failed {
                dir: shown.into(),
                status,
            },
            BuildError::TimedOut { seconds, .. } => BuildError::TimedOut {
                dir: shown.into(),
                seconds,
            },
            BuildError::NoArtifact { package, .. } => BuildError::NoArtifact {
                dir: shown.into(),
                package,
            },
            BuildError::NoDeviceFeature {
                device, feature, ..
            } => BuildError::NoDeviceFeature {
                dir: shown.into(),
                device,
                feature,
            },
            other => other,
        }
    }
}

/// A variant crate on disk.
#[derive(Debug, Clone)]
pub struct VariantCrate {
    pub dir: PathBuf,
    pub package: String,
    /// The cargo features its manifest declares.
    pub features: Vec<String>,
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// `$CARGO_TARGET_DIR`, resolved against the current directory as cargo resolves it.
pub fn target_dir_from_env() -> Option<PathBuf> {
    std::env::var_os("CARGO_TARGET_DIR").map(|dir| {
        std::env::current_dir()
            .unwrap_or_default()
            .join(PathBuf::from(dir))
    })
}

/// The cargo features a manifest `text` declares (none when it cannot be parsed: building
/// reports that).
pub fn features_of(text: &str) -> Vec<String> {
    toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|doc| doc.get("features")?.as_table().cloned())
        .map(|features| features.keys().cloned().collect())
        .unwrap_or_default()
}

/// The package name of a variant's manifest `text` (read from `manifest`, named in errors),
/// after checking its `[lib]` is a `cdylib`.
pub fn package_of(text: &str, manifest: &Path) -> Result<String, BuildError> {
    let bad = |message: String| BuildError::BadManifest {
        path: manifest.into(),
        message,
    };
    let doc: toml::Table =
        toml::from_str(text).map_err(|e| bad(e.to_string().trim_end().to_string()))?;
    let package = doc
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
        .ok_or_else(|| bad("no [package] name".into()))?
        .to_string();
    let is_cdylib = doc
        .get("lib")
        .and_then(|l| l.get("crate-type"))
        .and_then(|t| t.as_array())
        .is_some_and(|types| types.iter().any(|t| t.as_str() == Some("cdylib")));
    if !is_cdylib {
        return Err(BuildError::NotCdylib {
            path: manifest.into(),
        });
    }
    Ok(package)
}

impl VariantCrate {
    /// Checks that `dir` holds a cdylib crate and reads its package name.
    pub fn open(dir: &Path) -> Result<Self, BuildError> {
        if !dir.is_dir() {
            return Err(BuildError::NoDir(dir.into()));
        }
        let manifest = dir.join("Cargo.toml");
        let text =
            std::fs::read_to_string(&manifest).map_err(|_| BuildError::NoManifest(dir.into()))?;
        let package = package_of(&text, &manifest)?;
        Ok(VariantCrate {
            dir: dir.into(),
            package,
            features: features_of(&text),
        })
    }

    /// The cargo feature a build for `device` enables (none for the CPU); an error when the
    /// manifest does not declare it.
    pub fn feature_for(&self, device: Device) -> Result<Option<&'static str>, BuildError> {
        match device_feature(device) {
            Some(feature) if !self.features.iter().any(|f| f == feature) => {
                Err(BuildError::NoDeviceFeature {
                    dir: self.dir.clone(),
                    device,
                    feature,
                })
            }
            feature => Ok(feature),
        }
    }

    /// Builds the crate in release mode for `device` into `target_dir`, unconfined: for the
    /// harness's own code (the committed baseline) only.
    pub fn build_trusted(&self, target_dir: &Path, device: Device) -> Result<PathBuf, BuildError> {
        let mut command = Command::new(cargo());
        command.env("CARGO_TARGET_DIR", target_dir);
        self.run_cargo(command, device, target_dir, None)
    }

    /// Builds the crate for `device` as variant code into `target_dir` (a fresh copy of the
    /// seed, made by [`BuildSandbox::build`]), with cargo and everything it runs (build scripts,
    /// proc macros) confined to reading `reads` (its sources and the toolchain) and writing only
    /// `target_dir` ([`crate::sandbox`]), and copies the library to `out`. A build still running
    /// after `limit` is killed, with every process it started ([`BuildError::TimedOut`]).
    pub(crate) fn build_confined(
        &self,
        device: Device,
        reads: &[PathBuf],
        target_dir: &Path,
        out: &Path,
        limit: Duration,
    ) -> Result<PathBuf, BuildError> {
        self.feature_for(device)?;
        self.fetch()?;
        let exe = crate::sandbox::this_program().map_err(|source| BuildError::Cargo {
            cargo: "host confine".into(),
            source,
        })?;
        let mut command = Command::new(exe);
        command.arg("confine");
        for path in reads {
            command.arg("--read").arg(path);
        }
        command
            .arg("--write")
            .arg(target_dir)
            .arg("--")
            .arg(cargo())
            .env("CARGO_TARGET_DIR", target_dir)
            .env("TMPDIR", target_dir.join("tmp"))
            // Its own process group, so that whatever a build script leaves running is
            // killed with it (the sandbox keeps it from leaving the group).
            .process_group(0);
        let lib = self.run_cargo(command, device, target_dir, Some(limit))?;
        plain_file(&lib)?;
        let copy_error = |source| BuildError::Copy {
            from: lib.clone(),
            to: out.into(),
            source,
        };
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir).map_err(copy_error)?;
        }
        let tmp = out.with_extension(format!("so.tmp-{}", std::process::id()));
        std::fs::copy(&lib, &tmp)
            .and_then(|_| std::fs::rename(&tmp, out))
            .map_err(copy_error)?;
        Ok(out.to_path_buf())
    }

    /// Lets cargo resolve the crate's dependencies and download what is missing (and update
    /// the lock file), unconfined: no code of the variant runs here, and the confined build
    /// that follows is `--frozen`.
    fn fetch(&self) -> Result<(), BuildError> {
        let cargo = cargo();
        let status = Command::new(&cargo)
            .arg("fetch")
            .arg("--quiet")
            .arg("--manifest-path")
            .arg(self.dir.join("Cargo.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .map_err(|source| BuildError::Cargo {
                cargo: cargo.clone(),
                source,
            })?;
        if !status.success() {
            return Err(BuildError::Failed {
                dir: self.dir.clone(),
                status: format!("cargo fetch: {status}"),
            });
        }
        Ok(())
    }

    /// Runs `command` (cargo, or `host confine -- cargo`) as `cargo build --release` of this
    /// crate for `device` into `target_dir`, and returns the cdylib it reports. Cargo's own
    /// output, errors included, goes to the user's terminal. A confined build (`limit` given) is
    /// `--frozen` (its dependencies were fetched beforehand) and leads a process group, which
    /// is killed as soon as cargo exits, or when the build has run for `limit`.
    fn run_cargo(
        &self,
        mut command: Command,
        device: Device,
        target_dir: &Path,
        limit: Option<Duration>,
    ) -> Result<PathBuf, BuildError> {
        let confined = limit.is_some();
        let feature = self.feature_for(device)?;
        let cargo = cargo();
        command.args([
            "build",
            "--release",
            "--message-format=json-render-diagnostics",
        ]);
        if confined {
            command.arg("--frozen");
        }
        if let Some(feature) = feature {
            command.args(["--features", feature]);
        }
        let mut child = command
            .arg("--manifest-path")
            .arg(self.dir.join("Cargo.toml"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| BuildError::Cargo {
                cargo: cargo.clone(),
                source,
            })?;
        let mut library = None;
        let mut compiled = Vec::new();
        let stdout = child.stdout.take().expect("stdout was piped");
        // Cargo's messages are read here until its output closes, which a process it left
        // behind could hold off for ever; the watcher ends the group instead (see `watch`).
        let watcher = std::thread::spawn(move || watch(child, limit));
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if msg["reason"] != "compiler-artifact" {
                continue;
            }
            if let Some(name) = compiled_dependency(&msg, &self.package) {
                if !compiled.contains(&name) {
                    compiled.push(name);
                }
            }
            let is_ours = is_target_of(&msg, &self.package);
            let is_cdylib = msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "cdylib"));
            if is_ours && is_cdylib {
                library = msg["filenames"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.as_str())
                    .find(|f| f.ends_with(".so") || f.ends_with(".dylib"))
                    .map(PathBuf::from);
            }
        }
        let ended = watcher
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the build's watcher panicked")))
            .map_err(|source| BuildError::Cargo { cargo, source })?;
        let status = match ended {
            Ended::Exited(status) => status,
            Ended::TimedOut(limit) => {
                return Err(BuildError::TimedOut {
                    dir: self.dir.clone(),
                    seconds: limit.as_secs(),
                })
            }
        };
        if !status.success() {
            return Err(BuildError::Failed {
                dir: self.dir.clone(),
                status: status.to_string(),
            });
        }
        if confined && !compiled.is_empty() {
            eprintln!(
                "note: the confined build of {} also compiled {} of its dependencies ({}): the \
                 oracle's build, which a confined build starts from, does not have them in these \
                 versions or with these features, so every new tree compiles them again \
                 (program.md, \"Where your code runs\")",
                self.package,
                compiled.len(),
                compiled.join(", ")
            );
        }
        let library = library.ok_or_else(|| BuildError::NoArtifact {
            dir: self.dir.clone(),
            package: self.package.clone(),
        })?;
        // Only a library inside the build's own target directory counts.
        if !library.starts_with(target_dir) {
            return Err(BuildError::NoArtifact {
                dir: self.dir.clone(),
                package: self.package.clone(),
            });
        }
        Ok(library)
    }

    /// The library to load: with `no_build` (`--no-build`), the one the last plain cargo build
    /// left (built by whoever ran cargo, not confined by the host); else the working tree's
    /// crate built now in `sandbox`'s place ([`BuildSandbox::build`]), its library kept there
    /// for as long as this process lives.
    pub fn library_for(
        &self,
        no_build: bool,
        device: Device,
        sandbox: &BuildSandbox,
    ) -> Result<(PathBuf, Level), BuildError> {
        if no_build {
            return Ok((self.built_library()?, Level::not_built_by_host()));
        }
        self.feature_for(device)?;
        let sources = Sources::from_checkout(&sandbox.checkout, &self.dir)?;
        let lib = sandbox.build(&sources, device, None)?;
        Ok((lib, Support::probe().build_level()))
    }

    /// The library a previous build left, without building. With `CARGO_TARGET_DIR` set, cargo
    /// is not run at all (so `--no-build` works where no toolchain is installed).
    pub fn built_library(&self) -> Result<PathBuf, BuildError> {
        let target = match target_dir_from_env() {
            Some(dir) => dir,
            None => self.target_directory().map_err(|e| match e {
                BuildError::Cargo { cargo, source } => {
                    BuildError::NoCargoForTarget { cargo, source }
                }
                other => other,
            })?,
        };
        let lib = target
            .join("release")
            .join(format!("lib{}.so", self.package.replace('-', "_")));
        if !lib.is_file() {
            return Err(BuildError::NotBuilt {
                dir: self.dir.clone(),
                lib,
                package: self.package.clone(),
            });
        }
        if !built_from(&lib, &self.dir)? {
            eprintln!(
                "WARNING: --no-build: {} has no dep-info file beside it (cargo writes one with \
                 every build), so which crate it was built from cannot be checked",
                lib.display()
            );
        }
        if let Some(newer) = self.newer_source(&lib) {
            eprintln!(
                "WARNING: --no-build: {} was changed after {} was built: the library may be \
                 stale (`cargo build --release -p {}`, or drop --no-build)",
                newer.display(),
                lib.display(),
                self.package
            );
        }
        Ok(lib)
    }

    /// A file of the crate (its `target/` aside) modified after `lib`, if there is one: a
    /// `--no-build` library older than the sources it should be built from.
    fn newer_source(&self, lib: &Path) -> Option<PathBuf> {
        let built = std::fs::metadata(lib).and_then(|m| m.modified()).ok()?;
        let mut dirs = vec![self.dir.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).ok()?.flatten() {
                let path = entry.path();
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    if entry.file_name() != "target" {
                        dirs.push(path);
                    }
                } else if meta.modified().is_ok_and(|m| m > built) {
                    return Some(path);
                }
            }
        }
        None
    }

    /// The target directory cargo builds this crate into (its workspace's).
    fn target_directory(&self) -> Result<PathBuf, BuildError> {
        let cargo = cargo();
        let output = Command::new(&cargo)
            .args([
                "metadata",
                "--no-deps",
                "--format-version",
                "1",
                "--manifest-path",
            ])
            .arg(self.dir.join("Cargo.toml"))
            .stderr(Stdio::inherit())
            .output()
            .map_err(|source| BuildError::Cargo {
                cargo: cargo.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(BuildError::Failed {
                dir: self.dir.clone(),
                status: output.status.to_string(),
            });
        }
        let meta: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        Ok(meta["target_directory"]
            .as_str()
            .map(PathBuf::from)
            .unwrap_or_else(|| self.dir.join("target")))
    }
}

/// The environment variable that sets how long a confined build may run, in whole seconds
/// ([`DEFAULT_BUILD_LIMIT`] when unset).
pub const BUILD_TIMEOUT_VAR: &str = "AUTOINFER_BUILD_TIMEOUT";

/// How long a confined build may run when [`BUILD_TIMEOUT_VAR`] is unset: a build from a fresh
/// clone on 2 cores, every dependency compiled anew, takes a few minutes; half an hour means a
/// hang.
pub const DEFAULT_BUILD_LIMIT: Duration = Duration::from_secs(1800);

/// The longest limit [`BUILD_TIMEOUT_VAR`] may set: a week. A deadline is the clock plus the
/// limit, which a limit near `u64::MAX` seconds would overflow.
pub const MAX_BUILD_LIMIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// The build time limit `value` (of [`BUILD_TIMEOUT_VAR`]) sets: a whole number of seconds,
/// from 1 to [`MAX_BUILD_LIMIT`].
pub fn build_limit(value: Option<&str>) -> Result<Duration, BuildError> {
    match value {
        None => Ok(DEFAULT_BUILD_LIMIT),
        Some(text) => match text.trim().parse::<u64>() {
            Ok(seconds) if seconds > 0 && seconds <= MAX_BUILD_LIMIT.as_secs() => {
                Ok(Duration::from_secs(seconds))
            }
            _ => Err(BuildError::BadLimit { value: text.into() }),
        },
    }
}

/// How a build's cargo ended.
#[derive(Debug)]
enum Ended {
    /// It exited by itself.
    Exited(ExitStatus),
    /// It was killed for running past this limit.
    TimedOut(Duration),
}

/// Waits for cargo (`child`). Under a limit (a confined build, whose command leads its own
/// process group) the group is killed as soon as cargo exits, so that nothing a build script
/// left running holds cargo's output open, and at `limit` if cargo is still running. Without
/// one it only waits.
fn watch(mut child: Child, limit: Option<Duration>) -> std::io::Result<Ended> {
    let Some(limit) = limit else {
        return child.wait().map(Ended::Exited);
    };
    let group = child.id() as libc::pid_t;
    // SAFETY: signalling the process group the confined command leads: whatever it and its
    // build scripts started. Its leader, our child, is reaped only after this (`has_exited`
    // leaves it a zombie), so the group's id cannot have passed to another process.
    let kill_group = || unsafe { libc::killpg(group, libc::SIGKILL) };
    let deadline = Instant::now() + limit;
    let timed_out = loop {
        match has_exited(child.id()) {
            Ok(true) => break false,
            Ok(false) if Instant::now() >= deadline => break true,
            Ok(false) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                kill_group();
                let _ = child.wait();
                return Err(e);
            }
        }
    };
    kill_group();
    let status = child.wait()?;
    Ok(if timed_out {
        Ended::TimedOut(limit)
    } else {
        Ended::Exited(status)
    })
}

/// Whether our child `pid` has exited, leaving it unreaped: a zombie keeps its pid, and so its
/// process group's id, from being given to another process.
fn has_exited(pid: u32) -> std::io::Result<bool> {
    // SAFETY: siginfo_t is plain data, valid zeroed; waitid only writes it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child, into `info`; WNOWAIT leaves the reaping to `Child::wait`.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info`; with WNOHANG si_pid stays 0 while the child runs.
    Ok(unsafe { info.si_pid() } != 0)
}

/// Whether `lib` (a `--no-build` library) was built from the crate in `dir`, by the dep-info
/// file cargo writes beside it (`lib<name>.d`: the library, then every source file its last
/// build read). Libraries of one package name share a path in the target directory, so a build
/// of another copy of the crate (a candidate kept in `variants/other`) leaves its library where
/// this one's is looked for; without this check a comparison would measure it under this
/// directory's tree hash. `Ok(false)` when there is no dep-info to read; an error when it names
/// no source inside `dir`.
///
/// Sources are matched by `dir`'s path inside its git checkout (`/variants/current/`), not by
/// the absolute path, so a library built in another checkout of the same repository (built on
/// this machine, run on the GPU machine) passes.
fn built_from(lib: &Path, dir: &Path) -> Result<bool, BuildError> {
    let dep_info = lib.with_extension("d");
    // A plain file only, and its first MiB (a crate's dep-info is a few KiB): what a build
    // left there must not hang the host (a FIFO, /dev/zero) or fill its memory.
    if !std::fs::metadata(&dep_info).is_ok_and(|m| m.is_file()) {
        return Ok(false);
    }
    let Ok(file) = std::fs::File::open(&dep_info) else {
        return Ok(false);
    };
    let mut text = String::new();
    if std::io::Read::read_to_string(&mut std::io::Read::take(file, 1 << 20), &mut text).is_err() {
        return Ok(false);
    }
    let sources = dep_info_sources(&text);
    let marker = checkout_marker(dir);
    if sources.iter().any(|s| s.contains(&marker)) {
        return Ok(true);
    }
    // The crate it was built from: its root file's directory, plugin-api's aside.
    let root = sources
        .iter()
        .filter(|s| s.ends_with("/src/lib.rs") && !s.contains("/plugin-api/"))
        .chain(sources.first())
        .next()
        .map(|s| s.trim_end_matches("/src/lib.rs").to_string())
        .unwrap_or_else(|| "(no sources listed)".into());
    Err(BuildError::BuiltFromElsewhere {
        dir: dir.to_path_buf(),
        lib: lib.to_path_buf(),
        dep_info,
        built_from: root,
    })
}

/// Checks that `lib`, the library a confined build reported, is a plain file. The host copies
/// it with its own rights, so a link the build left there (to a file outside what the build
/// may read) must not be followed.
fn plain_file(lib: &Path) -> Result<(), BuildError> {
    match std::fs::symlink_metadata(lib) {
        Ok(meta) if meta.file_type().is_file() => Ok(()),
        _ => Err(BuildError::NotAFile { lib: lib.into() }),
    }
}

/// The source files a dep-info file (`target: source source ...`, spaces in paths escaped
/// as `\ `) lists for its first target.
fn dep_info_sources(text: &str) -> Vec<String> {
    let Some(line) = text.lines().next() else {
        return Vec::new();
    };
    let Some((_, deps)) = line.split_once(": ") else {
        return Vec::new();
    };
    deps.replace("\\ ", "\0")
        .split_whitespace()
        .map(|s| s.replace('\0', " "))
        .collect()
}

/// `/<dir relative to its git checkout's root>/`, or `<dir's absolute path>/` when it is in no
/// checkout (or is the checkout's root): the part of a source path that says it lies in `dir`
/// on any machine.
fn checkout_marker(dir: &Path) -> String {
    let abs = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let workdir = git2::Repository::discover(&abs)
        .ok()
        .and_then(|repo| repo.workdir().and_then(|w| w.canonicalize().ok()));
    match workdir.as_deref().and_then(|w| abs.strip_prefix(w).ok()) {
        Some(rel) if !rel.as_os_str().is_empty() => format!("/{}/", rel.display()),
        _ => format!("{}/", abs.display()),
    }
}

/// The dependency a cargo `compiler-artifact` message says was compiled now rather than found
/// fresh: its target's name, for a library of another package than `package` (a build script's
/// compile is counted with its crate's library).
fn compiled_dependency(msg: &serde_json::Value, package: &str) -> Option<String> {
    let name = msg["target"]["name"].as_str()?;
    let build_script = msg["target"]["kind"]
        .as_array()
        .is_some_and(|k| k.iter().any(|k| k == "custom-build"));
    let fresh_or_ours = msg["fresh"] != false || is_target_of(msg, package);
    (!fresh_or_ours && !build_script).then(|| name.to_string())
}

/// Whether a cargo `compiler-artifact` message is of `package`'s own target (cargo names a
/// crate's target with `_` where the package has `-`).
fn is_target_of(msg: &serde_json::Value, package: &str) -> bool {
    msg["target"]["name"].as_str().map(|n| n.replace('-', "_")) == Some(package.replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_library_that_is_a_link_is_refused() {
        let dir = std::env::temp_dir().join(format!("autoinfer-plain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("libcurrent.so");
        std::fs::write(&file, "a library").unwrap();
        plain_file(&file).unwrap();
        let link = dir.join("liblink.so");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let message = plain_file(&link).unwrap_err().to_string();
        assert!(
            message.contains("liblink.so") && message.contains("not a plain file"),
            "{message}"
        );
        assert!(plain_file(&dir.join("missing.so")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A `--no-build` library is accepted from the crate cargo last built it from, whichever
    /// checkout that was, and refused when that was another directory of the same package.
    #[test]
    fn a_no_build_library_must_come_from_the_named_crate() {
        let root = scratch("dep-info", None);
        git2::Repository::init(&root).unwrap();
        for v in ["current", "other"] {
            std::fs::create_dir_all(root.join("variants").join(v).join("src")).unwrap();
        }
        let lib = root.join("libcurrent.so");
        std::fs::write(&lib, b"").unwrap();
        let (current, other) = (root.join("variants/current"), root.join("variants/other"));
        // No dep-info, or none that is a plain file: nothing to check.
        assert!(!built_from(&lib, &current).unwrap());
        std::fs::create_dir(root.join("libcurrent.d")).unwrap();
        assert!(!built_from(&lib, &current).unwrap());
        std::fs::remove_dir(root.join("libcurrent.d")).unwrap();
        let fifo = std::ffi::CString::new(
            root.join("libcurrent.d")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(
            !built_from(&lib, &current).unwrap(),
            "a FIFO is not read (it would block)"
        );
        std::fs::remove_file(root.join("libcurrent.d")).unwrap();
        // Built in another checkout (the path of a build machine, a space in it) of this crate.
        std::fs::write(
            root.join("libcurrent.d"),
            "/build/my\\ repo/target/release/libcurrent.so: /build/my\\ repo/plugin-api/src/lib.rs \
             /build/my\\ repo/variants/current/src/lib.rs /build/my\\ repo/variants/current/src/model.rs\n",
        )
        .unwrap();
        assert!(built_from(&lib, &current).unwrap());
        match built_from(&lib, &other) {
            Err(e @ BuildError::BuiltFromElsewhere { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("/build/my repo/variants/current"), "{msg}");
                assert!(msg.contains("variants/other"), "{msg}");
            }
            other => panic!("expected BuiltFromElsewhere, got {other:?}"),
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_build_limit_is_whole_seconds_or_the_default() {
        assert_eq!(build_limit(None).unwrap(), DEFAULT_BUILD_LIMIT);
        assert_eq!(build_limit(Some("90")).unwrap(), Duration::from_secs(90));
        assert_eq!(build_limit(Some(" 5\n")).unwrap(), Duration::from_secs(5));
        assert_eq!(build_limit(Some("604800")).unwrap(), MAX_BUILD_LIMIT);
        for bad in [
            "",
            "0",
            "-3",
            "1.5",
            "ten",
            "5s",
            "604801",
            "18446744073709551615",
        ] {
            let e = build_limit(Some(bad)).expect_err(bad).to_string();
            assert!(
                e.contains(BUILD_TIMEOUT_VAR) && e.contains(&format!("{bad:?}")),
                "{bad}: {e}"
            );
        }
    }

    /// A watched command still running at its limit is killed with its whole group; one that
    /// ends in time is waited for, and its group killed with it.
    #[test]
    fn a_build_past_its_limit_is_killed_with_its_group() {
        let (child, group) = group_leader("sleep 613 & sleep 613");
        let ended = watch(child, Some(Duration::from_millis(300))).unwrap();
        assert!(
            matches!(ended, Ended::TimedOut(limit) if limit == Duration::from_millis(300)),
            "{ended:?}"
        );
        assert!(
            group_gone(group),
            "a process of the killed build's group is still running"
        );

        let (child, group) = group_leader("sleep 614 > /dev/null & exit 0");
        let ended = watch(child, Some(Duration::from_secs(60))).unwrap();
        assert!(
            matches!(ended, Ended::Exited(status) if status.success()),
            "{ended:?}"
        );
        assert!(group_gone(group), "what the build left running outlived it");
    }

    /// `sh -c script` leading a process group of its own, as a confined build's command does.
    fn group_leader(script: &str) -> (Child, libc::pid_t) {
        let child = Command::new("sh")
            .args(["-c", script])
            .process_group(0)
            .spawn()
            .unwrap();
        let group = child.id() as libc::pid_t;
        (child, group)
    }

    /// Whether process group `group` has no process left within 5 s (a killed orphan is a
    /// zombie, which signal 0 still finds, until init reaps it).
    fn group_gone(group: libc::pid_t) -> bool {
        (0..250).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            // SAFETY: signal 0 only asks whether any process of the group is left.
            let left = unsafe { libc::killpg(group, 0) };
            left != 0
        })
    }

    #[test]
    fn only_dependencies_compiled_now_are_named() {
        let artifact = |name: &str, kind: &str, fresh: bool| {
            serde_json::json!({
                "reason": "compiler-artifact",
                "target": {"name": name, "kind": [kind]},
                "fresh": fresh,
            })
        };
        let named = |msg| compiled_dependency(&msg, "current");
        assert_eq!(
            named(artifact("candle_core", "lib", false)),
            Some("candle_core".to_string())
        );
        assert_eq!(named(artifact("candle_core", "lib", true)), None, "fresh");
        assert_eq!(
            named(artifact("current", "cdylib", false)),
            None,
            "the variant"
        );
        assert_eq!(
            named(artifact("build-script-build", "custom-build", false)),
            None,
            "a build script"
        );
        assert_eq!(
            named(serde_json::json!({"reason": "compiler-artifact"})),
            None
        );
    }

    #[test]
    fn dep_info_lists_the_first_targets_sources() {
        assert_eq!(
            dep_info_sources("/t/lib.so: /a/b.rs /a/c\\ d.rs\n\n/a/b.rs:\n"),
            ["/a/b.rs", "/a/c d.rs"]
        );
        assert!(dep_info_sources("").is_empty());
        assert!(dep_info_sources("no colon here").is_empty());
    }

    fn scratch(name: &str, manifest: Option<&str>) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("autoinfer-build-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(m) = manifest {
            std::fs::write(dir.join("Cargo.toml"), m).unwrap();
        }
        dir
    }

    #[test]
    fn refuses_what_is_not_a_cdylib_crate() {
        let missing = std::env::temp_dir().join("autoinfer-no-such-dir");
        assert!(matches!(
            VariantCrate::open(&missing),
            Err(BuildError::NoDir(_))
        ));
        let empty = scratch("empty", None);
        assert!(matches!(
            VariantCrate::open(&empty),
            Err(BuildError::NoManifest(_))
        ));
        let rlib = scratch(
            "rlib",
            Some("[package]\nname = \"x\"\nversion = \"0.1.0\"\n"),
        );
        let err = VariantCrate::open(&rlib).unwrap_err();
        assert!(
            matches!(err, BuildError::NotCdylib { .. }) && err.to_string().contains("cdylib"),
            "{err}"
        );
        let broken = scratch("broken", Some("[package\nname = 1"));
        assert!(matches!(
            VariantCrate::open(&broken),
            Err(BuildError::BadManifest { .. })
        ));
        let good = scratch(
            "good",
            Some("[package]\nname = \"my-variant\"\n[lib]\ncrate-type = [\"cdylib\"]\n"),
        );
        let good = VariantCrate::open(&good).unwrap();
        assert_eq!(good.package, "my-variant");
        assert_eq!(good.feature_for(Device::Cpu).unwrap(), None);
        let err = good.feature_for(Device::Cuda(0)).unwrap_err();
        assert!(
            err.to_string().contains("cuda:0") && err.to_string().contains("`cuda` feature"),
            "{err}"
        );
        let gpu = scratch(
            "gpu",
            Some("[package]\nname = \"g\"\n[lib]\ncrate-type = [\"cdylib\"]\n[features]\ncuda = []\n"),
        );
        let gpu_crate = VariantCrate::open(&gpu).unwrap();
        assert_eq!(
            gpu_crate.feature_for(Device::Cuda(1)).unwrap(),
            Some("cuda")
        );
        assert!(gpu_crate.feature_for(Device::Metal(0)).is_err());
        for d in [empty, rlib, broken, good.dir, gpu] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn a_source_newer_than_the_library_is_named() {
        let dir = scratch(
            "stale",
            Some("[package]\nname = \"s\"\n[lib]\ncrate-type = [\"cdylib\"]\n"),
        );
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::create_dir_all(dir.join("target/release")).unwrap();
        std::fs::write(dir.join("src/lib.rs"), "// v1\n").unwrap();
        let lib = dir.join("target/release/libs.so");
        std::fs::write(&lib, "built").unwrap();
        let variant = VariantCrate::open(&dir).unwrap();
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        for file in ["Cargo.toml", "src/lib.rs"] {
            let f = std::fs::File::options()
                .write(true)
                .open(dir.join(file))
                .unwrap();
            f.set_modified(past).unwrap();
        }
        assert_eq!(variant.newer_source(&lib), None, "built after every source");
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join("src/lib.rs"))
            .unwrap();
        f.set_modified(later).unwrap();
        assert_eq!(variant.newer_source(&lib), Some(dir.join("src/lib.rs")));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
