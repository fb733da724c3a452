//! What every measurement is set up from, all of it part of the locked harness: the
//! measurement protocol ([`protocol`], `prompts/protocol.toml`), the prompts and their checks
//! ([`prompts`], with the check expressions of [`expr`]), the tokenizer and chat template
//! ([`tokenize`]) and the default model ([`fetch`]).

pub mod expr;
pub mod fetch;
pub mod prompts;
pub mod protocol;
pub mod tokenize;

/// The variant the loop edits, relative to the checkout's root.
pub const CURRENT: &str = "variants/current";

/// The workspace's lock file: a variant's dependencies change it, so `host keep` commits it
/// with the variant and a variant's build takes it from the working tree.
pub const LOCK: &str = "Cargo.lock";
