//! Worker mode: the process that loads one variant and runs the supervisor's requests.
//!
//! The worker's host code owns the clock and the sink: [`TimedSink`] timestamps every token the
//! variant emits, caps the count at `max_new_tokens` (answering "stop") and counts any overflow.
//! The worker keeps a private duplicate of stdout for replies and points fd 1 at stderr, so a
//! variant that prints cannot corrupt the protocol.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::time::Instant;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::RSlice;
use anyhow::{Context, Result};
use plugin_api::{TokenSink, TokenSink_TO};

use crate::model::Model;
use crate::supervisor::LoadRequest;
use crate::wire::{Reply, Request};

/// The host-owned sink: a timestamp per token, exactly `max` tokens kept.
struct TimedSink {
    start: Instant,
    max: usize,
    tokens: Vec<u32>,
    emit_ns: Vec<u64>,
    overflow: u64,
}

impl TokenSink for TimedSink {
    fn emit(&mut self, tokens: RSlice<'_, u32>) -> bool {
        let now = self.start.elapsed().as_nanos() as u64;
        for &token in tokens.as_slice() {
            if self.tokens.len() < self.max {
                self.tokens.push(token);
                self.emit_ns.push(now);
            } else {
                self.overflow += 1;
            }
        }
        self.tokens.len() < self.max
    }
}

/// The worker's resident-memory high-water mark (VmHWM), in KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Takes fd 1 for replies and sends everything else written to stdout to stderr.
fn private_stdout() -> Result<File> {
    // SAFETY: plain fd duplication at start-up, before any other thread writes to stdout.
    unsafe {
        let fd = libc::dup(1);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            anyhow::bail!(
                "cannot set up the worker's reply pipe: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(File::from_raw_fd(fd))
    }
}

fn send(out: &mut File, reply: &Reply) -> Result<()> {
    let mut line = serde_json::to_string(reply)?;
    line.push('\n');
    out.write_all(line.as_bytes())
        .context("the supervisor closed the reply pipe")
}

/// Runs the worker: load the model and the variant, then answer requests until stdin closes.
/// `load` becomes the variant's load options.
pub fn run(lib: &Path, model_path: &Path, load: &LoadRequest) -> Result<()> {
    let mut out = private_stdout()?;
    let model = match Model::open(model_path) {
        Ok(m) => m,
        Err(e) => {
            return send(
                &mut out,
                &Reply::Failed {
                    message: e.to_string(),
                },
            )
        }
    };
    let started = Instant::now();
    let mut variant = match crate::plugin::load(lib, model.view, &load.options()) {
        Ok(v) => v,
        Err(e) => {
            return send(
                &mut out,
                &Reply::Failed {
                    message: e.to_string(),
                },
            )
        }
    };
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    send(&mut out, &Reply::Ready { load_ms })?;

    for line in BufReader::new(std::io::stdin()).lines() {
        let line = line.context("reading a request")?;
        let request: Request = serde_json::from_str(&line).context("a malformed request")?;
        let reply = match request {
            Request::Generate {
                prompt,
                max_new_tokens,
            } => {
                let mut sink = TimedSink {
                    start: Instant::now(),
                    max: max_new_tokens as usize,
                    tokens: Vec::with_capacity((max_new_tokens as usize).min(1 << 16)),
                    emit_ns: Vec::with_capacity((max_new_tokens as usize).min(1 << 16)),
                    overflow: 0,
                };
                let result = variant.generate(
                    RSlice::from_slice(&prompt),
                    max_new_tokens,
                    TokenSink_TO::from_ptr(&mut sink, TD_Opaque),
                );
                match result.into_result() {
                    Ok(()) => Reply::Generated {
                        tokens: sink.tokens,
                        emit_ns: sink.emit_ns,
                        overflow: sink.overflow,
                        peak_rss_kib: peak_rss_kib(),
                    },
                    Err(e) => Reply::Failed {
                        message: e.into_string(),
                    },
                }
            }
            Request::Score { tokens } => {
                match variant.score(RSlice::from_slice(&tokens)).into_result() {
                    Ok(positions) => Reply::Scored {
                        positions: positions
                            .iter()
                            .map(|p| (p.logprob, p.argmax, p.argmax_logprob))
                            .collect(),
                    },
                    Err(e) => Reply::Failed {
                        message: e.into_string(),
                    },
                }
            }
        };
        send(&mut out, &reply)?;
    }
    Ok(())
}
