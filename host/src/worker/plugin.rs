//! Loading a variant cdylib into the current process (a worker), with a readable ABI check.
//!
//! glibc caches a loaded library by path and inode and abi_stable never unloads one, so the
//! worker loads a byte copy of it ([`crate::worker`]); `lib_header_from_path` loads it and
//! checks its root module's layout against this build of `plugin-api`.

use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError};
use abi_stable::std_types::RStr;
use plugin_api::{HostLog, LoadOptions, LogLevel, ModelView, VariantBox, VariantModRef};

/// Why a variant library could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{path} is not a loadable autoinfer variant: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path} was built against a different plugin-api; rebuild it against this checkout's plugin-api:\n{message}")]
    Abi { path: PathBuf, message: String },
    #[error("the variant's load() failed: {0}")]
    Init(String),
}

/// Keeps the end of abi_stable's (very long) report: the lines that name the mismatch.
fn short_report(report: &str) -> String {
    let lines: Vec<&str> = report.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(6)..];
    let text = tail
        .iter()
        .map(|l| format!("  {}", l.trim()))
        .collect::<Vec<_>>()
        .join("\n");
    if text.len() > 1200 {
        format!("  ...{}", &text[text.len() - 1200..])
    } else {
        text
    }
}

extern "C" fn host_log(level: LogLevel, message: RStr<'_>) {
    eprintln!("[variant {level:?}] {message}");
}

/// The log callback given to every variant: its messages go to the worker's stderr.
pub fn host_logger() -> HostLog {
    HostLog { write: host_log }
}

/// Whether abi_stable refused the library because it was built against other types or
/// versions (rather than because it could not be opened or has no root module).
fn is_abi_mismatch(e: &LibraryError) -> bool {
    match e {
        LibraryError::AbiInstability(_)
        | LibraryError::IncompatibleVersionNumber { .. }
        | LibraryError::InvalidAbiHeader(_)
        | LibraryError::InvalidCAbi { .. } => true,
        LibraryError::Many(errors) => errors.iter().any(is_abi_mismatch),
        _ => false,
    }
}

/// Loads the variant at `lib` and builds it over `model`. `lib` must be a path no library of
/// this process was loaded from (glibc would hand back the cached one): the worker loads a
/// fresh copy in its scratch directory.
pub fn load(
    lib: &Path,
    model: &'static ModelView,
    options: &LoadOptions,
) -> Result<VariantBox, PluginError> {
    let header = lib_header_from_path(lib).map_err(|e| PluginError::Load {
        path: lib.into(),
        message: short_report(&e.to_string()),
    })?;
    let module = header.init_root_module::<VariantModRef>().map_err(|e| {
        let message = short_report(&e.to_string());
        if is_abi_mismatch(&e) {
            PluginError::Abi {
                path: lib.into(),
                message,
            }
        } else {
            PluginError::Load {
                path: lib.into(),
                message,
            }
        }
    })?;
    module.load()(model, host_logger(), options)
        .into_result()
        .map_err(|e| PluginError::Init(e.into_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_report_keeps_the_last_lines_only() {
        let report = (0..500).map(|i| format!("line {i}\n")).collect::<String>();
        let short = short_report(&report);
        assert!(
            short.contains("line 499") && short.contains("line 494"),
            "{short}"
        );
        assert!(!short.contains("line 493"), "{short}");
    }

    #[test]
    fn a_file_that_is_not_a_library_is_refused_by_name() {
        static EMPTY: [u8; 0] = [];
        let view: &'static ModelView = Box::leak(Box::new(ModelView {
            bytes: abi_stable::std_types::RSlice::from_slice(&EMPTY),
            metadata: Default::default(),
            tensors: Default::default(),
        }));
        let path =
            std::env::temp_dir().join(format!("autoinfer-not-a-lib-{}.so", std::process::id()));
        std::fs::write(&path, b"not an ELF file").unwrap();
        let err = load(&path, view, &LoadOptions::default())
            .err()
            .expect("must fail");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, PluginError::Load { .. }), "{err}");
        assert!(err.to_string().contains("autoinfer-not-a-lib"), "{err}");
    }
}
