//! Embeds a hash of the host's and plugin-api's sources, so every result row says exactly which
//! harness code produced it (the binary cannot drift from the hash it reports).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path
                .file_name()
                .is_some_and(|n| n != "target" && n != "tests")
            {
                files(&path, out);
            }
        } else {
            out.push(path);
        }
    }
}

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .expect("host/ sits in the workspace")
        .to_path_buf();
    let mut paths = Vec::new();
    for dir in ["host/src", "plugin-api/src"] {
        files(&root.join(dir), &mut paths);
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    for file in ["host/Cargo.toml", "host/build.rs", "plugin-api/Cargo.toml"] {
        paths.push(root.join(file));
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    paths.sort();
    let mut hasher = Sha256::new();
    for path in &paths {
        let rel = path.strip_prefix(&root).unwrap_or(path);
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update(std::fs::read(path).unwrap_or_default());
        hasher.update([0]);
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("cargo:rustc-env=AUTOINFER_HOST_SOURCE_HASH={hex}");
}
