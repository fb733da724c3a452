//! `host diff`: what a variant changed against another (by default `variants/current` against
//! `variants/baseline`): files added, removed and changed, lines added and removed, and Rust
//! functions added and removed.
//!
//! [`VariantDiff::between`] walks both crate directories (skipping `target/` and hidden
//! entries), diffs every text file line by line with `similar`, and compares the multiset of
//! `fn` names in each `.rs` file. It reads the working tree, so uncommitted edits count.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// How one file differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileDiff {
    /// Path relative to the crate directory.
    pub path: String,
    /// "added", "removed" or "changed".
    pub status: &'static str,
    pub lines_added: usize,
    pub lines_removed: usize,
    pub functions_added: Vec<String>,
    pub functions_removed: Vec<String>,
}

/// Every file that differs between two variant directories, with totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VariantDiff {
    pub from: String,
    pub to: String,
    pub files: Vec<FileDiff>,
    pub lines_added: usize,
    pub lines_removed: usize,
    pub functions_added: usize,
    pub functions_removed: usize,
}

/// The files under `dir` (relative path → contents), skipping `target/` and hidden entries.
fn read_tree(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || name == "target" {
                continue;
            }
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out)?;
            } else {
                let bytes = std::fs::read(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let rel = path.strip_prefix(root).unwrap_or(&path);
                out.insert(rel.to_string_lossy().into_owned(), bytes);
            }
        }
        Ok(())
    }
    if !dir.is_dir() {
        bail!("variant directory {} does not exist", dir.display());
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// The names of the functions a Rust source defines (`fn name`), with repeats.
pub fn function_names(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut words = code
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty());
        while let Some(word) = words.next() {
            if word == "fn" {
                if let Some(name) = words.next() {
                    names.push(name.to_string());
                }
            }
        }
    }
    names.sort();
    names
}

/// Names in `a` and not in `b`, counting repeats (a multiset difference).
fn missing_from(a: &[String], b: &[String]) -> Vec<String> {
    let mut left: BTreeMap<&str, usize> = BTreeMap::new();
    for name in b {
        *left.entry(name).or_default() += 1;
    }
    a.iter()
        .filter(|name| match left.get_mut(name.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .cloned()
        .collect()
}

fn diff_file(path: &str, old: Option<&[u8]>, new: Option<&[u8]>) -> Option<FileDiff> {
    let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
    let (old_text, new_text) = (text(old), text(new));
    if old.is_some() && old == new {
        return None;
    }
    let (mut added, mut removed) = (0, 0);
    for change in similar::TextDiff::from_lines(&old_text, &new_text).iter_all_changes() {
        match change.tag() {
            similar::ChangeTag::Insert => added += 1,
            similar::ChangeTag::Delete => removed += 1,
            similar::ChangeTag::Equal => {}
        }
    }
    let (old_fns, new_fns) = if path.ends_with(".rs") {
        (function_names(&old_text), function_names(&new_text))
    } else {
        (Vec::new(), Vec::new())
    };
    Some(FileDiff {
        path: path.to_string(),
        status: match (old, new) {
            (None, _) => "added",
            (_, None) => "removed",
            _ => "changed",
        },
        lines_added: added,
        lines_removed: removed,
        functions_added: missing_from(&new_fns, &old_fns),
        functions_removed: missing_from(&old_fns, &new_fns),
    })
}

impl VariantDiff {
    /// What `to` changed against `from` (both variant crate directories).
    pub fn between(from: &Path, to: &Path) -> Result<VariantDiff> {
        let (old, new) = (read_tree(from)?, read_tree(to)?);
        let mut paths: Vec<&String> = old.keys().chain(new.keys()).collect();
        paths.sort();
        paths.dedup();
        let files: Vec<FileDiff> = paths
            .into_iter()
            .filter_map(|p| {
                diff_file(
                    p,
                    old.get(p).map(Vec::as_slice),
                    new.get(p).map(Vec::as_slice),
                )
            })
            .collect();
        Ok(VariantDiff {
            from: from.display().to_string(),
            to: to.display().to_string(),
            lines_added: files.iter().map(|f| f.lines_added).sum(),
            lines_removed: files.iter().map(|f| f.lines_removed).sum(),
            functions_added: files.iter().map(|f| f.functions_added.len()).sum(),
            functions_removed: files.iter().map(|f| f.functions_removed.len()).sum(),
            files,
        })
    }

    /// The table `host diff` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{} against {}:", self.to, self.from);
        if self.files.is_empty() {
            let _ = writeln!(out, "  no differences");
            return out;
        }
        for f in &self.files {
            let _ = writeln!(
                out,
                "  {:<8} {:<32} +{:<5} -{:<5}",
                f.status, f.path, f.lines_added, f.lines_removed
            );
            for name in &f.functions_added {
                let _ = writeln!(out, "           + fn {name}");
            }
            for name in &f.functions_removed {
                let _ = writeln!(out, "           - fn {name}");
            }
        }
        let _ = writeln!(
            out,
            "{} file(s) differ: +{} -{} lines, {} function(s) added, {} removed",
            self.files.len(),
            self.lines_added,
            self.lines_removed,
            self.functions_added,
            self.functions_removed
        );
        out
    }
}

/// Runs `host diff`: `to` against `from`, both resolved from the checkout's root when relative.
pub fn run(from: &Path, to: &Path, json: bool) -> Result<()> {
    let root = crate::commands::setup::find_root(&std::env::current_dir()?)?;
    let resolve = |p: &Path| -> PathBuf {
        if p.is_absolute() || p.exists() {
            p.to_path_buf()
        } else {
            root.join(p)
        }
    };
    let diff = VariantDiff::between(&resolve(from), &resolve(to))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&diff)?);
    } else {
        print!("{}", diff.render());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_ignore_comments_and_find_every_form() {
        let src = "pub fn a() {}\n    fn b<T>(x: T) {}\n// fn commented()\npub(crate) unsafe fn c() {}\nlet f = |x| x; fn a() {}\n";
        assert_eq!(function_names(src), ["a", "a", "b", "c"]);
    }

    #[test]
    fn counts_files_lines_and_functions() {
        let base = std::env::temp_dir().join(format!("autoinfer-diff-{}", std::process::id()));
        let (from, to) = (base.join("from"), base.join("to"));
        for d in [&from, &to] {
            std::fs::create_dir_all(d.join("src")).unwrap();
            std::fs::create_dir_all(d.join("target")).unwrap();
            std::fs::write(d.join("target/ignored"), d.to_string_lossy().as_bytes()).unwrap();
        }
        std::fs::write(from.join("Cargo.toml"), "[package]\n").unwrap();
        std::fs::write(to.join("Cargo.toml"), "[package]\n").unwrap();
        std::fs::write(from.join("src/lib.rs"), "fn keep() {}\nfn old() {}\n").unwrap();
        std::fs::write(
            to.join("src/lib.rs"),
            "fn keep() {}\nfn new() {}\nfn more() {}\n",
        )
        .unwrap();
        std::fs::write(from.join("src/gone.rs"), "fn gone() {}\n").unwrap();
        std::fs::write(to.join("src/simd.rs"), "fn dot() {}\n// two\n").unwrap();
        let d = VariantDiff::between(&from, &to).unwrap();
        let summary: Vec<(&str, &str, usize, usize)> = d
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.status, f.lines_added, f.lines_removed))
            .collect();
        assert_eq!(
            summary,
            [
                ("src/gone.rs", "removed", 0, 1),
                ("src/lib.rs", "changed", 2, 1),
                ("src/simd.rs", "added", 2, 0),
            ]
        );
        assert_eq!(d.files[1].functions_added, ["more", "new"]);
        assert_eq!(d.files[1].functions_removed, ["old"]);
        assert_eq!((d.functions_added, d.functions_removed), (3, 2));
        assert_eq!((d.lines_added, d.lines_removed), (4, 2));
        assert!(d.render().contains("+ fn dot"), "{}", d.render());
        let same = VariantDiff::between(&from, &from).unwrap();
        assert!(same.files.is_empty() && same.render().contains("no differences"));
        let err = VariantDiff::between(&from, &base.join("nope")).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
