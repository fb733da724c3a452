//! Content hashes: SHA-256 in hex, of bytes or of a set of files.
//!
//! Shared by the host (model, variant and harness hashes) and by `build.rs`, which includes this
//! file to hash the host's own sources, so both hash file sets the same way.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The host binary's own sources (relative to the checkout): `build.rs` hashes them into the
/// binary, and the harness check compares that hash with HEAD's, so a binary built from other
/// sources than the committed ones is caught.
pub const HOST_SOURCES: [&str; 5] = [
    "host/src",
    "host/Cargo.toml",
    "host/build.rs",
    "plugin-api/src",
    "plugin-api/Cargo.toml",
];

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A file's content as git commits it: a symbolic link's is the path it holds (git stores the
/// link, never what it points at), any other file's its bytes. So a checkout and its commit
/// hash alike, and reading a checkout never reaches through a link to a file outside it.
pub fn git_content(path: &Path) -> std::io::Result<Vec<u8>> {
    if std::fs::symlink_metadata(path)?.file_type().is_symlink() {
        use std::os::unix::ffi::OsStrExt;
        return Ok(std::fs::read_link(path)?.as_os_str().as_bytes().to_vec());
    }
    std::fs::read(path)
}

/// Every file under `path` (or `path` itself), skipping `target/` and dot-entries. A symbolic
/// link inside is one file ([`git_content`]), never followed.
fn collect(path: &Path, out: &mut Vec<PathBuf>) {
    // `symlink_metadata`, not `is_dir`: a link to a directory is one file too, never walked.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(meta) if meta.is_file() || meta.file_type().is_symlink() => {
            out.push(path.to_path_buf());
            return;
        }
        _ => return,
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if is_skipped_name(&name) {
            continue;
        }
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => collect(&entry.path(), out),
            Ok(kind) if kind.is_file() || kind.is_symlink() => out.push(entry.path()),
            _ => {}
        }
    }
}

/// Hex SHA-256 over the paths (relative to `root`) and contents of every file in `paths`, each
/// a file or a directory walked recursively. The order of `paths` does not matter.
pub fn hash_files(root: &Path, paths: &[PathBuf]) -> String {
    hash_entries(list_files(paths).into_iter().map(|file| {
        (
            file.strip_prefix(root).unwrap_or(&file).to_path_buf(),
            git_content(&file).unwrap_or_default(),
        )
    }))
}

/// Every file in `paths` (each a file or a directory walked recursively, skipped names left
/// out), sorted: the set [`hash_files`] hashes.
pub fn list_files(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        collect(path, &mut files);
    }
    files.sort();
    files.dedup();
    files
}

/// Whether a file or directory name is left out of content hashes: build outputs and
/// dot-entries (editor state, `.git`).
pub fn is_skipped_name(name: &str) -> bool {
    name == "target" || name.starts_with('.')
}

/// Hex SHA-256 over (relative path, content) entries given in sorted path order: the one format
/// of [`hash_files`], so a git tree hashed entry by entry equals its checkout.
pub fn hash_entries(entries: impl IntoIterator<Item = (PathBuf, Vec<u8>)>) -> String {
    let mut hasher = Sha256::new();
    for (path, content) in entries {
        hasher.update(path.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update(content);
        hasher.update([0]);
    }
    hex(&hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_sha256() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn file_hash_follows_content_and_ignores_target() {
        let dir = std::env::temp_dir().join(format!("autoinfer-hashing-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::create_dir_all(dir.join("target")).unwrap();
        std::fs::write(dir.join("src/lib.rs"), "a").unwrap();
        let all = || hash_files(&dir, std::slice::from_ref(&dir));
        let h1 = all();
        std::fs::write(dir.join("target/junk"), "x").unwrap();
        assert_eq!(h1, all(), "target/ must not count");
        assert_eq!(
            h1,
            hash_files(&dir, &[dir.join("src/lib.rs")]),
            "a file or its directory: same set"
        );
        std::fs::write(dir.join("src/lib.rs"), "b").unwrap();
        assert_ne!(h1, all(), "an edit must change the hash");
        // A link, inside the tree or named itself, is one file holding its target's path (as
        // git commits it), never walked: a link to a directory lists no file through it.
        let link = dir.join("linked-src");
        std::os::unix::fs::symlink("src", &link).unwrap();
        assert_eq!(list_files(std::slice::from_ref(&link)), vec![link.clone()]);
        assert_eq!(git_content(&link).unwrap(), b"src");
        let whole = list_files(std::slice::from_ref(&dir));
        assert!(whole.contains(&link) && !whole.contains(&link.join("lib.rs")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
