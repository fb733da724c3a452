//! Embeds a hash of the host's and plugin-api's sources, so every result row says exactly which
//! harness code produced it (the binary cannot drift from the hash it reports).

use std::path::PathBuf;

#[allow(dead_code)] // the build script needs only hash_files and HOST_SOURCES
#[path = "src/hashing.rs"]
mod hashing;

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .expect("host/ sits in the workspace")
        .to_path_buf();
    let paths: Vec<PathBuf> = hashing::HOST_SOURCES.iter().map(|p| root.join(p)).collect();
    for path in &paths {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!(
        "cargo:rustc-env=AUTOINFER_HOST_SOURCE_HASH={}",
        hashing::hash_files(&root, &paths)
    );
}
