//! Messages between the supervisor and a worker: one JSON object per line over the worker's
//! stdin (requests) and a private copy of its stdout (replies).

use serde::{Deserialize, Serialize};

/// What the supervisor asks a worker to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Generate exactly `max_new_tokens` tokens after `prompt`, timing every emit.
    Generate {
        prompt: Vec<u32>,
        max_new_tokens: u32,
    },
    /// Teacher-forced scoring of `tokens` (the quality oracle).
    Score { tokens: Vec<u32> },
}

/// A worker's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// The variant is loaded and ready; `load_ms` is the time its `load` took.
    Ready { load_ms: f64 },
    /// A finished generation: the tokens the sink accepted, the time of each since the request
    /// began (ns), and how many the variant pushed past the host's "stop".
    Generated {
        tokens: Vec<u32>,
        emit_ns: Vec<u64>,
        overflow: u64,
        peak_rss_kib: u64,
    },
    /// Teacher-forced scores: (log-prob of the next token, argmax id, argmax log-prob).
    Scored { positions: Vec<(f32, u32, f32)> },
    /// The variant returned an error (a caught panic included), or could not be loaded.
    Failed { message: String },
}
