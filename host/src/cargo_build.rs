//! Building a variant directory into its cdylib with cargo.
//!
//! [`VariantCrate::open`] checks the directory is a crate whose `[lib]` is a `cdylib` before any
//! compiling starts. [`VariantCrate::build`] runs `cargo build --release` (cargo's own output,
//! errors included, goes to the user's terminal) and reads the library's path from cargo's JSON
//! messages; [`VariantCrate::built_library`] finds it without building (`--no-build`). A build
//! for a device other than the CPU enables the device's cargo feature (`cuda`, `metal`), which
//! the manifest must declare.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use plugin_api::Device;

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
    #[error("cannot run cargo ({cargo})")]
    Cargo {
        cargo: String,
        source: std::io::Error,
    },
    #[error("cargo build of variant {dir} failed ({status}); cargo's errors are above")]
    Failed { dir: PathBuf, status: String },
    #[error("cargo built variant {dir} but reported no cdylib for package {package}")]
    NoArtifact { dir: PathBuf, package: String },
    #[error(
        "--no-build: variant {dir} has no built library at {lib}; run without --no-build first"
    )]
    NotBuilt { dir: PathBuf, lib: PathBuf },
    #[error("variant {dir} cannot be built for {device}: its Cargo.toml declares no `{feature}` feature (variants/baseline's shows how)")]
    NoDeviceFeature {
        dir: PathBuf,
        device: Device,
        feature: &'static str,
    },
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
        match device.cargo_feature() {
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

    /// The library to load: the last build's with `no_build` (`--no-build`), else the crate
    /// built now for `device`.
    pub fn library_for(&self, no_build: bool, device: Device) -> Result<PathBuf, BuildError> {
        if no_build {
            self.built_library()
        } else {
            self.build(device)
        }
    }

    /// Builds the crate in release mode for `device` and returns the path of its cdylib.
    pub fn build(&self, device: Device) -> Result<PathBuf, BuildError> {
        self.build_in(None, device)
    }

    /// Like [`VariantCrate::build`], into `target_dir` instead of cargo's default when given.
    pub fn build_in(
        &self,
        target_dir: Option<&Path>,
        device: Device,
    ) -> Result<PathBuf, BuildError> {
        let feature = self.feature_for(device)?;
        let cargo = cargo();
        let mut command = Command::new(&cargo);
        if let Some(dir) = target_dir {
            command.env("CARGO_TARGET_DIR", dir);
        }
        command.args([
            "build",
            "--release",
            "--message-format=json-render-diagnostics",
        ]);
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
        let stdout = child.stdout.take().expect("stdout was piped");
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if msg["reason"] != "compiler-artifact" {
                continue;
            }
            let is_ours = msg["target"]["name"].as_str().map(|n| n.replace('-', "_"))
                == Some(self.package.replace('-', "_"));
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
        let status = child
            .wait()
            .map_err(|source| BuildError::Cargo { cargo, source })?;
        if !status.success() {
            return Err(BuildError::Failed {
                dir: self.dir.clone(),
                status: status.to_string(),
            });
        }
        library.ok_or_else(|| BuildError::NoArtifact {
            dir: self.dir.clone(),
            package: self.package.clone(),
        })
    }

    /// The library a previous build left, without building. With `CARGO_TARGET_DIR` set, cargo
    /// is not run at all (so `--no-build` works where no toolchain is installed).
    pub fn built_library(&self) -> Result<PathBuf, BuildError> {
        let target = match target_dir_from_env() {
            Some(dir) => dir,
            None => self.target_directory()?,
        };
        let lib = target
            .join("release")
            .join(format!("lib{}.so", self.package.replace('-', "_")));
        if lib.is_file() {
            Ok(lib)
        } else {
            Err(BuildError::NotBuilt {
                dir: self.dir.clone(),
                lib,
            })
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
