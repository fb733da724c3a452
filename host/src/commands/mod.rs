//! The subcommands that are more than a few lines, each file one command's whole flow from its
//! arguments to its printed report and its results row, and the steps `run` and `compare`
//! share: [`setup`] (open the protocol, prompts, model and tokenizer; plan and send the timed
//! requests), [`judge`] (the oracle scores every timed answer and the gates are decided) and
//! [`finish`] (the quality phase, the status and the record every measurement ends with).
//!
//! - [`run`]: score one variant (timed rounds, the oracle, the gates, a results row);
//! - [`compare`]: two variants head to head, paired and sequential, to a KEEP/REVERT/NOISE;
//! - [`keep`]: commit a comparison's KEEP (or revert the working copy);
//! - [`mod@bench`]: llama-bench-style pp/tg tests beside the roofline;
//! - [`diff`], [`plot`]: what changed between variants, and the history drawn;
//! - [`synth`]: a synthetic GGUF of a bigger model's shape.

pub mod bench;
pub mod compare;
pub mod diff;
pub mod finish;
pub mod judge;
pub mod keep;
pub mod plot;
pub mod run;
pub mod setup;
pub mod synth;
