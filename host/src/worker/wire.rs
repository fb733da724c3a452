//! Messages between the supervisor and a worker: one JSON object per line, requests over the
//! worker's stdin, the worker's messages over a private copy of its stdout.
//!
//! Everything a worker sends is untrusted input (the variant's code can write anything to any
//! descriptor of its process): [`Message`] parses strictly (unknown variants and fields are
//! errors), lines are capped at [`MAX_LINE`] bytes, and no message carries a figure. A
//! generation is a stream: one [`Message::Tokens`] per `emit`, which the supervisor timestamps
//! when it reads it ([`LineReader`] stamps each read before parsing), then [`Message::Done`].

use std::io::Read;
use std::time::Instant;

use plugin_api::ScoredPosition;
use serde::{Deserialize, Serialize};

/// The longest line a worker may send (a score of a long sequence is the largest message).
pub const MAX_LINE: usize = 16 << 20;

/// What the supervisor asks a worker to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Generate exactly `max_new_tokens` tokens after `prompt`, streaming each `emit`.
    Generate {
        prompt: Vec<u32>,
        max_new_tokens: u32,
    },
    /// Teacher-forced scoring of `tokens` from position `from` on (the quality oracle: the
    /// prompt's positions before `from` are context only).
    Score { tokens: Vec<u32>, from: u32 },
}

/// What a worker sends. Nothing here states a time, a count the supervisor would believe, or
/// a memory figure: the supervisor measures those itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Message {
    /// The variant is loaded and ready.
    Ready,
    /// Tokens the variant emitted, as they were emitted.
    Tokens { ids: Vec<u32> },
    /// The generation returned.
    Done,
    /// Teacher-forced scores, one per position from the request's `from` on.
    Scored { positions: Vec<ScoredPosition> },
    /// The variant returned an error (a caught panic included), or could not be loaded.
    Failed { message: String },
}

impl Message {
    /// The message as one line of JSON, newline included.
    pub fn line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("messages always serialise");
        line.push('\n');
        line
    }
}

/// One line as the supervisor received it.
#[derive(Debug)]
pub enum Received {
    /// A line, parsed, and when the read that brought it returned.
    Message(Instant, Message),
    /// A line that is not a message (shown shortened in the error).
    Garbled(String),
    /// A line longer than [`MAX_LINE`].
    TooLong,
    /// The worker closed its end.
    Closed,
}

/// Splits a worker's byte stream into lines, stamping each with the time the `read` that
/// completed it returned: the supervisor's clock, taken before any parsing.
pub struct LineReader<R> {
    inner: R,
    pending: Vec<u8>,
    done: bool,
}

impl<R: Read> LineReader<R> {
    /// Reads from `inner`.
    pub fn new(inner: R) -> Self {
        LineReader {
            inner,
            pending: Vec::new(),
            done: false,
        }
    }

    /// The next lines: every complete line of the next read (at least one, or the end).
    pub fn next_batch(&mut self) -> Vec<Received> {
        if self.done {
            return vec![Received::Closed];
        }
        let mut chunk = [0u8; 64 << 10];
        loop {
            let n = match self.inner.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    self.done = true;
                    return vec![Received::Closed];
                }
                Ok(n) => n,
            };
            let at = Instant::now();
            self.pending.extend_from_slice(&chunk[..n]);
            let mut out = Vec::new();
            while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                out.push(parse(&line[..line.len() - 1], at));
            }
            if self.pending.len() > MAX_LINE {
                self.done = true;
                out.push(Received::TooLong);
            }
            if !out.is_empty() {
                return out;
            }
        }
    }
}

fn parse(line: &[u8], at: Instant) -> Received {
    if line.len() > MAX_LINE {
        return Received::TooLong;
    }
    match serde_json::from_slice::<Message>(line) {
        Ok(message) => Received::Message(at, message),
        Err(_) => Received::Garbled(shorten(&String::from_utf8_lossy(line), 200)),
    }
}

/// `text` made safe to print on a terminal: control characters (escape sequences that could
/// rewrite what the user sees) shown as `\u{..}`, and at most `max` characters.
pub fn shorten(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push_str("...");
            break;
        }
        if c.is_control() && c != '\t' {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// What a worker asks its variant at load time: the [`plugin_api::LoadOptions`] it sends.
/// `None` sends nothing, and the variant chooses (every core; the CPU).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadRequest {
    /// The `threads` option.
    pub threads: Option<usize>,
    /// The `device` option.
    pub device: Option<plugin_api::Device>,
}

impl LoadRequest {
    /// The load options the variant receives.
    pub fn options(&self) -> plugin_api::LoadOptions {
        let mut options = plugin_api::LoadOptions::default();
        if let Some(n) = self.threads {
            options = options.with(plugin_api::LoadOptions::THREADS, &n.to_string());
        }
        if let Some(device) = self.device {
            options = options.with(plugin_api::LoadOptions::DEVICE, &device.to_string());
        }
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Received> {
        let mut reader = LineReader::new(input);
        let mut out = Vec::new();
        loop {
            let batch = reader.next_batch();
            let closed = batch.iter().any(|r| matches!(r, Received::Closed));
            out.extend(batch);
            if closed {
                return out;
            }
        }
    }

    #[test]
    fn messages_round_trip_and_anything_else_is_garbled() {
        let ok = Message::Tokens { ids: vec![1, 2] }.line() + &Message::Done.line();
        let got = lines(ok.as_bytes());
        assert!(matches!(&got[0], Received::Message(_, Message::Tokens { ids }) if ids == &[1, 2]));
        assert!(matches!(&got[1], Received::Message(_, Message::Done)));
        assert!(matches!(got[2], Received::Closed));
        for bad in [
            "{\"Tokens\":{\"ids\":[1],\"emit_ns\":[5]}}\n", // a field the supervisor never reads
            "{\"Generated\":{\"tokens\":[1]}}\n",           // the old reply, with its timings
            "{\"Tokens\":{\"ids\":[-1]}}\n",
            "not json\n",
        ] {
            let got = lines(bad.as_bytes());
            assert!(matches!(got[0], Received::Garbled(_)), "{bad}: {got:?}");
        }
    }

    #[test]
    fn a_line_without_end_is_cut_off() {
        let long = vec![b'x'; MAX_LINE + 10];
        let got = lines(&long);
        assert!(matches!(got[0], Received::TooLong), "{got:?}");
    }

    #[test]
    fn terminal_control_characters_are_escaped() {
        assert_eq!(shorten("a\u{1b}[2Jb\tc", 100), "a\\u{1b}[2Jb\tc");
        assert_eq!(shorten("abcdef", 3), "abc...");
    }
}
