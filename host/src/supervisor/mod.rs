//! The supervisor's handle on a worker process: spawn, send requests, time every token on
//! arrival, freeze the worker between its requests, and turn a crash into a verdict that names
//! the variant and the request.
//!
//! [`Worker::spawn`] starts this same executable as `host worker` with a private directory
//! (the library's copy, readable only, beside the scratch directory it may write), waits for
//! `Ready`, and keeps two reader threads: messages (one JSON line each,
//! stamped with the supervisor's clock when read: [`crate::worker::wire::LineReader`]) and stderr
//! (echoed when asked, its last lines kept for error messages). [`Worker::generate`] turns a
//! stream of tokens into a [`Generation`]: the tokens, each one's arrival time, the worker's
//! CPU time and peak memory, all measured here. Between requests the worker is stopped
//! (SIGSTOP), so it cannot compute while another worker is measured; the CPU it used while
//! stopped is checked to be zero. The supervisor never loads a variant itself.

pub mod build_place;
pub mod cargo_build;
pub mod oracle;
pub mod outside;
pub mod revision;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plugin_api::ScoredPosition;

use crate::worker::wire::{shorten, LineReader, LoadRequest, Message, Received, Request};

/// How a request (or the start-up) of a worker went wrong.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start a worker for {variant}")]
    Spawn {
        variant: String,
        source: std::io::Error,
    },
    #[error("variant {variant} crashed during {request}: the worker {how}{log}")]
    Crashed {
        variant: String,
        request: String,
        how: String,
        log: String,
    },
    #[error("variant {variant} timed out on {request}: no answer within {secs} s, so its worker was killed{log}")]
    TimedOut {
        variant: String,
        request: String,
        secs: f64,
        log: String,
    },
    #[error("variant {variant} failed on {request}: {message}")]
    Failed {
        variant: String,
        request: String,
        message: String,
    },
    #[error("variant {variant} broke the worker protocol during {request} ({what}), so its worker was killed")]
    Protocol {
        variant: String,
        request: String,
        what: String,
    },
    #[error(
        "interrupted (Ctrl-C or SIGTERM) during {request} of {variant}: its worker was stopped"
    )]
    Interrupted { variant: String, request: String },
    #[error(
        "variant {variant} cannot be measured during {request}: {why}, so its worker was killed"
    )]
    Unmeasurable {
        variant: String,
        request: String,
        why: outside::Unmeasurable,
    },
    #[error("variant {variant} used {cpu_ms:.0} ms of CPU while it was frozen (before {request}): a worker may compute only during its own requests")]
    RanWhileFrozen {
        variant: String,
        request: String,
        cpu_ms: f64,
    },
}

/// A signal's conventional name and what it usually means.
fn describe_signal(signal: i32) -> String {
    let name = match signal {
        libc::SIGSEGV => "SIGSEGV (segmentation fault: an invalid memory access)",
        libc::SIGABRT => "SIGABRT (abort)",
        libc::SIGBUS => "SIGBUS (bus error)",
        libc::SIGILL => "SIGILL (illegal instruction)",
        libc::SIGFPE => "SIGFPE (arithmetic fault)",
        libc::SIGSYS => "SIGSYS (a system call its sandbox forbids)",
        libc::SIGKILL => "SIGKILL (killed; out of memory?)",
        _ => "a signal",
    };
    format!("was killed by signal {signal}, {name}")
}

fn describe_exit(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) => match (s.signal(), s.code()) {
            (Some(sig), _) => describe_signal(sig),
            (None, Some(code)) => format!("exited with status {code} without answering"),
            _ => format!("ended ({s})"),
        },
        None => "closed its message pipe".into(),
    }
}

/// One generation, as the supervisor measured it.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The tokens, in the order they arrived (at most the number asked for).
    pub tokens: Vec<u32>,
    /// When each token arrived, in ns after the request was sent (the supervisor's clock).
    pub arrivals_ns: Vec<u64>,
    /// Tokens that arrived past the number asked for.
    pub overflow: u64,
    /// The worker's peak memory by the end of the request, in KiB: the larger of its resident
    /// high-water mark (VmHWM) and the most it was seen to hold in its resident set and in
    /// files together (a sample every few ms while it ran: [`outside::Outside`]).
    pub peak_rss_kib: u64,
    /// CPU time the worker's threads used during the request, in ms.
    pub cpu_ms: f64,
    /// Time the worker was stopped during the request while another took its turn, in ms;
    /// no timing above counts it.
    pub paused_ms: f64,
}

/// Whether a worker's output may be read now. Closed while the worker is paused between turns
/// of a pair: whatever it wrote before it was stopped (up to a pipe's worth of messages or log
/// lines, which the supervisor must parse) then waits in the pipe until its next turn, so that
/// reading it costs the worker's own turn and never the other side's.
#[derive(Default)]
struct ReadGate {
    closed: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl ReadGate {
    /// Waits while the gate is closed.
    fn pass(&self) {
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        while *closed {
            closed = self.opened.wait(closed).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn set(&self, closed: bool) {
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = closed;
        if !closed {
            self.opened.notify_all();
        }
    }
}

/// A generation sent to a worker and not yet done: what has arrived so far, and the worker's
/// own clock ([`Worker::start`], [`Worker::advance`]).
pub struct Generating {
    label: String,
    timeout: Duration,
    max: usize,
    tokens: Vec<u32>,
    arrivals_ns: Vec<u64>,
    overflow: u64,
    cpu_before: u64,
    clock: ActiveClock,
}

/// Time that counts as a worker's: the stretches of the supervisor's clock during which it was
/// let run, from the request's sending on. Two workers time-sharing the CPU are each timed by
/// their own stretches, so a slow spell of the machine falls on both alike.
#[derive(Debug, Clone)]
struct ActiveClock {
    /// Each stretch: when it began, when it ended (`None` while running), and the active time
    /// before it.
    stretches: Vec<(Instant, Option<Instant>, Duration)>,
}

impl ActiveClock {
    fn starting(at: Instant) -> ActiveClock {
        ActiveClock {
            stretches: vec![(at, None, Duration::ZERO)],
        }
    }

    /// Active time up to the end of the last stretch (or up to `now` while one runs).
    fn total_at(&self, now: Instant) -> Duration {
        self.stretches
            .last()
            .map(|&(start, end, before)| {
                before + end.unwrap_or(now).saturating_duration_since(start)
            })
            .unwrap_or_default()
    }

    /// Time between the stretches: how long the worker was kept stopped.
    fn paused(&self) -> Duration {
        self.stretches
            .windows(2)
            .map(|w| w[1].0.saturating_duration_since(w[0].1.unwrap_or(w[1].0)))
            .sum()
    }

    fn pause(&mut self, at: Instant) {
        if let Some(last) = self.stretches.last_mut() {
            last.1.get_or_insert(at);
        }
    }

    fn resume(&mut self, at: Instant) {
        let before = self.total_at(at);
        self.stretches.push((at, None, before));
    }

    /// The active time at which something the worker wrote was read at `at`: within a
    /// stretch, the time into it; read after a stretch ended (written before the worker was
    /// stopped), that stretch's end. In ns.
    fn active_ns_at(&self, at: Instant) -> u64 {
        let active = match self.stretches.iter().rev().find(|s| s.0 <= at) {
            Some(&(start, end, before)) => {
                before
                    + end
                        .map_or(at, |end| at.min(end))
                        .saturating_duration_since(start)
            }
            None => Duration::ZERO,
        };
        active.as_nanos() as u64
    }

    /// When the request times out, if the worker runs from `now` on without a pause.
    fn deadline(&self, now: Instant, timeout: Duration) -> Instant {
        now + timeout.saturating_sub(self.total_at(now))
    }
}

/// Everything a worker is started with.
#[derive(Debug, Clone)]
pub struct Spawn<'a> {
    /// How the variant is named in every message.
    pub variant: &'a str,
    /// Its library.
    pub lib: &'a Path,
    /// The GGUF model.
    pub model: &'a Path,
    /// How long loading, and each request, may take.
    pub timeout: Duration,
    /// Echo the worker's log lines.
    pub echo_log: bool,
    /// The variant's load options.
    pub load: LoadRequest,
    /// Paths the worker must not reach even inside a readable system directory.
    pub protect: &'a [PathBuf],
}

/// A running worker with one variant loaded, frozen whenever it is not answering.
pub struct Worker {
    variant: String,
    child: Child,
    stdin: Option<ChildStdin>,
    messages: Receiver<Received>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// Its worker directory ([`worker_dir`]), removed when it ends.
    dir: PathBuf,
    cpu_clock: Option<libc::clockid_t>,
    /// The worker's CPU time when it was frozen; `None` while it runs.
    frozen_at_ns: Option<u64>,
    /// Closed while the worker is paused between turns ([`ReadGate`]).
    gate: Arc<ReadGate>,
    /// The highest memory seen by sampling the worker while it runs: its resident set plus
    /// what it keeps in files ([`outside::Outside`]), and its high-water mark, which a CUDA
    /// worker could reset (it may write its threads' /proc entries).
    sampler: MemorySampler,
    /// Time from spawning to `Ready`, by the supervisor's clock.
    pub load_ms: f64,
}

/// The name of the copy of a variant's library that a worker loads, in its worker directory
/// ([`worker_dir`]), beside its scratch directory ([`WORKER_SCRATCH`]), not in it.
///
/// The same for every variant, so that the two workers of a comparison start from the same
/// command line and load a library of the same path: the worker keeps these paths on its heap
/// (the arguments, glibc's record of the loaded library), so their lengths move every later
/// allocation. With the library's own name in them (a slot's `15759-0.so` against a
/// revision's `current-a147c3e61d5b85ea.so`) the variant's buffers sat at other offsets on the
/// two sides, and an A/A comparison of one source, built once from the working tree and once
/// from git (the same machine code), read prefill 7.5% FASTER and was a KEEP.
pub const WORKER_LIBRARY: &str = "variant.so";

/// The name of a worker's scratch directory in its worker directory: the only place the
/// worker may write (its HOME and TMPDIR), and all of it is counted as memory the worker keeps
/// ([`outside::Outside`]). The library lies outside it, readable only: a worker that could
/// write its own library's copy could keep data there that the count leaves out as the host's.
pub const WORKER_SCRATCH: &str = "scratch";

const TAIL_LINES: usize = 12;
/// The longest log line kept from a worker; the rest of the line is dropped.
const LOG_LINE: usize = 4096;
/// CPU a frozen worker may show: none is possible, this allows for clock granularity.
const FROZEN_CPU_TOLERANCE_NS: u64 = 10_000_000;

/// A fresh private directory for one worker, under the system's temporary directory, named
/// by the supervisor's pid and 16 random hex digits: one length for every worker (see
/// [`WORKER_LIBRARY`]), and nothing in it tells a worker which side of a comparison it is or
/// how many workers came before it (a counter did: A, started first in every pair, always
/// had an even one). It holds the worker's library and its empty scratch directory
/// ([`WORKER_SCRATCH`]).
fn worker_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    loop {
        let draw = crate::stats::rng::fresh_seed();
        let dir = std::env::temp_dir().join(format!(
            "autoinfer-worker-{}-{draw:016x}",
            std::process::id()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot make its worker directory {}: {e}", dir.display()),
                ))
            }
            Ok(()) => {}
        }
        let scratch = dir.join(WORKER_SCRATCH);
        return match std::fs::DirBuilder::new().mode(0o700).create(&scratch) {
            Ok(()) => Ok(dir),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot make its scratch directory {}: {e}",
                        scratch.display()
                    ),
                ))
            }
        };
    }
}

/// Reads a worker's stderr into `tail`, line by line (lines capped at [`LOG_LINE`]), echoing
/// each, made safe for a terminal, when `echo` is set; each read waits for `gate`.
fn drain_log(
    mut stderr: impl Read,
    tail: Arc<Mutex<VecDeque<String>>>,
    echo: bool,
    gate: Arc<ReadGate>,
) {
    let mut line = Vec::new();
    let mut chunk = [0u8; 8192];
    let finish = |line: &mut Vec<u8>| {
        let text = shorten(&String::from_utf8_lossy(line), LOG_LINE);
        line.clear();
        if echo {
            eprintln!("  | {text}");
        }
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text);
    };
    loop {
        gate.pass();
        let n = match stderr.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &chunk[..n] {
            if b == b'\n' {
                finish(&mut line);
            } else if line.len() < LOG_LINE * 4 {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        finish(&mut line);
    }
}

impl Worker {
    /// Starts a worker as `spec` says and waits until its variant is loaded, then freezes it.
    pub fn spawn(spec: &Spawn) -> Result<Worker, WorkerError> {
        let spawn_err = |source| WorkerError::Spawn {
            variant: spec.variant.into(),
            source,
        };
        let exe = crate::sandbox::this_program().map_err(spawn_err)?;
        let dir = worker_dir().map_err(spawn_err)?;
        let scratch = dir.join(WORKER_SCRATCH);
        let lib = dir.join(WORKER_LIBRARY);
        if let Err(source) = std::fs::copy(spec.lib, &lib) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(WorkerError::Spawn {
                variant: spec.variant.into(),
                source: std::io::Error::new(
                    source.kind(),
                    format!(
                        "cannot copy its library {} to {}: {source}",
                        spec.lib.display(),
                        lib.display()
                    ),
                ),
            });
        }
        let mut command = Command::new(exe);
        command
            .arg("worker")
            .arg("--dir")
            .arg(&dir)
            .arg("--model")
            .arg(spec.model);
        for path in spec.protect {
            command.arg("--protect").arg(path);
        }
        if let Some(n) = spec.load.threads {
            command.arg("--threads").arg(n.to_string());
        }
        if let Some(device) = spec.load.device {
            command.arg("--device").arg(device.to_string());
        }
        // Whatever the variant's libraries write as caches goes to its scratch directory.
        for var in ["HOME", "TMPDIR", "XDG_CACHE_HOME"] {
            command.env(var, &scratch);
        }
        // Everything the scratch directory will hold is the worker's: it starts empty.
        let files = outside::Outside::new(&scratch);
        let started = Instant::now();
        let mut child = match command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(source) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(spawn_err(source));
            }
        };
        let (tx, messages) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout was piped");
        let gate = Arc::new(ReadGate::default());
        let stdout_gate = gate.clone();
        std::thread::spawn(move || {
            let mut reader = LineReader::new(stdout);
            loop {
                stdout_gate.pass();
                let batch = reader.next_batch();
                let last = batch
                    .iter()
                    .any(|r| matches!(r, Received::Closed | Received::TooLong));
                for received in batch {
                    if tx.send(received).is_err() {
                        return;
                    }
                }
                if last {
                    return;
                }
            }
        });
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr_tail.clone();
        let stderr = child.stderr.take().expect("stderr was piped");
        let echo = spec.echo_log;
        let stderr_gate = gate.clone();
        std::thread::spawn(move || drain_log(stderr, tail, echo, stderr_gate));
        let pid = child.id() as libc::pid_t;
        let stdin = child.stdin.take();
        // Sampled from the start: a store of files may be written while the variant loads.
        let cadence = match spec.load.device {
            Some(plugin_api::Device::Cuda(_)) => Cadence::GPU,
            _ => Cadence::CPU,
        };
        let sampler = MemorySampler::start(pid, files, cadence);
        let mut worker = Worker {
            variant: spec.variant.into(),
            child,
            stdin,
            messages,
            stderr_tail,
            dir,
            cpu_clock: cpu_clock(pid),
            frozen_at_ns: None,
            gate,
            sampler,
            load_ms: 0.0,
        };
        let label = "loading the variant";
        let deadline = Instant::now() + spec.timeout;
        match worker.next_message(label, deadline, spec.timeout)? {
            (_, Message::Ready) => {
                worker.load_ms = started.elapsed().as_secs_f64() * 1e3;
                worker.freeze();
                Ok(worker)
            }
            (_, Message::Failed { message }) => Err(worker.failed(label, message)),
            (_, other) => Err(worker.protocol(label, format!("sent {other:?} instead of Ready"))),
        }
    }

    /// Ends the worker and returns once its process is reaped: every thread gone, its files
    /// (a GPU context's device files among them) closed. A healthy worker ends when its stdin
    /// closes; one that has not ended after half a second is killed.
    pub fn end(self) {
        drop(self);
    }

    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Generates exactly `max_new_tokens` tokens after `prompt` (`label` names the request in
    /// errors), timing each token as it arrives.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new_tokens: u32,
        label: &str,
        timeout: Duration,
    ) -> Result<Generation, WorkerError> {
        let mut generating = self.start(prompt, max_new_tokens, label, timeout)?;
        loop {
            if let Some(generation) = self.advance(&mut generating, None)? {
                return Ok(generation);
            }
        }
    }

    /// Sends a generation request and returns at once, the worker running: [`Worker::advance`]
    /// receives its tokens, in one go or in time slices.
    pub fn start(
        &mut self,
        prompt: &[u32],
        max_new_tokens: u32,
        label: &str,
        timeout: Duration,
    ) -> Result<Generating, WorkerError> {
        let request = Request::Generate {
            prompt: prompt.to_vec(),
            max_new_tokens,
        };
        let (sent, cpu_before) = self.send(&request, label)?;
        let max = max_new_tokens as usize;
        Ok(Generating {
            label: label.into(),
            timeout,
            max,
            tokens: Vec::with_capacity(max.min(1 << 16)),
            arrivals_ns: Vec::with_capacity(max.min(1 << 16)),
            overflow: 0,
            cpu_before,
            clock: ActiveClock::starting(sent),
        })
    }

    /// Lets the generation run until it is done (`Some`) or until `until` (`None`: the worker
    /// is frozen again, and the time until the next call does not count as its time). The
    /// request's timeout counts only the time the worker was let run.
    pub fn advance(
        &mut self,
        g: &mut Generating,
        until: Option<Instant>,
    ) -> Result<Option<Generation>, WorkerError> {
        let label = g.label.clone();
        if self.frozen_at_ns.is_some() {
            let resumed = Instant::now();
            // What it wrote before its pause is read now, in its own turn.
            self.gate.set(false);
            self.thaw(&label)?;
            g.clock.resume(resumed);
        }
        let deadline = g.clock.deadline(Instant::now(), g.timeout);
        loop {
            let slice_end = until.filter(|u| *u < deadline);
            let Some(received) = self.next_message_by(&label, deadline, slice_end, g.timeout)?
            else {
                self.freeze();
                g.clock.pause(Instant::now());
                self.gate.set(true);
                return Ok(None);
            };
            match received {
                (at, Message::Tokens { ids }) => {
                    let ns = g.clock.active_ns_at(at);
                    for id in ids {
                        if g.tokens.len() < g.max {
                            g.tokens.push(id);
                            g.arrivals_ns.push(ns);
                        } else {
                            g.overflow += 1;
                        }
                    }
                }
                (_, Message::Done) => break,
                (_, Message::Failed { message }) => return Err(self.failed(&label, message)),
                (_, other) => {
                    return Err(self.protocol(&label, format!("sent {other:?} during a generation")))
                }
            }
        }
        // What it holds now (read while it runs, so that a short request is measured too),
        // and the highest the sampler saw.
        let peak_rss_kib = match self.sampler.measure() {
            Ok(kib) => kib.max(self.sampler.peak_kib.load(Ordering::Relaxed)),
            Err(why) => {
                self.kill();
                return Err(WorkerError::Unmeasurable {
                    variant: self.variant.clone(),
                    request: label,
                    why,
                });
            }
        };
        let cpu_ms = self.cpu_ns().saturating_sub(g.cpu_before) as f64 / 1e6;
        self.freeze();
        Ok(Some(Generation {
            tokens: std::mem::take(&mut g.tokens),
            arrivals_ns: std::mem::take(&mut g.arrivals_ns),
            overflow: g.overflow,
            peak_rss_kib,
            cpu_ms,
            paused_ms: g.clock.paused().as_secs_f64() * 1e3,
        }))
    }

    /// Teacher-forced scores of `tokens` for each position from `from` to the last but one
    /// (`from < tokens.len() - 1`), checked for count.
    pub fn score(
        &mut self,
        tokens: &[u32],
        from: usize,
        label: &str,
        timeout: Duration,
    ) -> Result<Vec<ScoredPosition>, WorkerError> {
        let expected = tokens.len().saturating_sub(from + 1);
        let request = Request::Score {
            tokens: tokens.to_vec(),
            from: u32::try_from(from).unwrap_or(u32::MAX),
        };
        let (sent, _) = self.send(&request, label)?;
        let reply = self.next_message(label, sent + timeout, timeout)?;
        self.freeze();
        match reply {
            (_, Message::Scored { positions }) if positions.len() == expected => Ok(positions),
            (_, Message::Scored { positions }) => Err(self.protocol(
                label,
                format!(
                    "returned {} scores for a {}-token sequence scored from position {from} \
                     (expected {expected})",
                    positions.len(),
                    tokens.len()
                ),
            )),
            (_, Message::Failed { message }) => Err(self.failed(label, message)),
            (_, other) => Err(self.protocol(label, format!("sent {other:?} instead of scores"))),
        }
    }

    /// Thaws the worker, checks it sent nothing since its last answer, and sends `request`.
    /// Returns when it was sent and the worker's CPU time then.
    fn send(&mut self, request: &Request, label: &str) -> Result<(Instant, u64), WorkerError> {
        self.thaw(label)?;
        match self.messages.try_recv() {
            Ok(Received::Closed) | Err(TryRecvError::Disconnected) => {
                return Err(self.crashed(label))
            }
            Ok(Received::Message(_, m)) => {
                return Err(self.protocol(label, format!("sent {m:?} between requests")))
            }
            Ok(Received::Garbled(line)) => {
                return Err(self.protocol(label, format!("sent an unreadable line: {line}")))
            }
            Ok(Received::TooLong) => {
                return Err(self.protocol(label, "sent a line longer than the limit".into()))
            }
            Err(TryRecvError::Empty) => {}
        }
        let mut line = serde_json::to_string(request).expect("requests always serialise");
        line.push('\n');
        let cpu = self.cpu_ns();
        let sent = Instant::now();
        let written = self
            .stdin
            .as_mut()
            .map(|s| s.write_all(line.as_bytes()).and_then(|_| s.flush()));
        if !matches!(written, Some(Ok(()))) {
            return Err(self.crashed(label));
        }
        Ok((sent, cpu))
    }

    /// The next message, or the error that stands for it: a crash, a timeout (the worker is
    /// killed), or a protocol breach (killed too).
    fn next_message(
        &mut self,
        label: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(Instant, Message), WorkerError> {
        Ok(self
            .next_message_by(label, deadline, None, timeout)?
            .expect("without a slice end, only a message or an error ends the wait"))
    }

    /// As [`Worker::next_message`], but `None` once `slice_end` (before `deadline`) passes
    /// with no message.
    fn next_message_by(
        &mut self,
        label: &str,
        deadline: Instant,
        slice_end: Option<Instant>,
        timeout: Duration,
    ) -> Result<Option<(Instant, Message)>, WorkerError> {
        // Waits in short slices, so that a Ctrl-C or SIGTERM stops the request within 100 ms.
        let received = loop {
            if crate::interrupt::requested() {
                return Err(self.interrupted(label));
            }
            let now = Instant::now();
            let wait = deadline.saturating_duration_since(now);
            let slice_left = slice_end.map(|end| end.saturating_duration_since(now));
            if slice_left.is_some_and(|left| left.is_zero()) {
                // What already arrived is taken before the slice ends.
                match self.messages.try_recv() {
                    Err(TryRecvError::Empty) => return Ok(None),
                    Ok(r) => break Ok(r),
                    Err(TryRecvError::Disconnected) => break Err(RecvTimeoutError::Disconnected),
                }
            }
            let step = wait
                .min(slice_left.unwrap_or(wait))
                .min(Duration::from_millis(100));
            match self.messages.recv_timeout(step) {
                Err(RecvTimeoutError::Timeout) if !wait.is_zero() => continue,
                other => break other,
            }
        };
        match received {
            Ok(Received::Message(at, message)) => Ok(Some((at, message))),
            Ok(Received::Garbled(line)) => {
                Err(self.protocol(label, format!("sent an unreadable line: {line}")))
            }
            Ok(Received::TooLong) => Err(self.protocol(
                label,
                format!(
                    "sent a line longer than {} MiB",
                    crate::worker::wire::MAX_LINE >> 20
                ),
            )),
            // A Ctrl-C reaches the whole foreground process group, the worker too.
            Ok(Received::Closed) | Err(RecvTimeoutError::Disconnected)
                if crate::interrupt::requested() =>
            {
                Err(self.interrupted(label))
            }
            Ok(Received::Closed) | Err(RecvTimeoutError::Disconnected) => Err(self.crashed(label)),
            Err(RecvTimeoutError::Timeout) => {
                self.kill();
                Err(WorkerError::TimedOut {
                    variant: self.variant.clone(),
                    request: label.into(),
                    secs: timeout.as_secs_f64(),
                    log: self.log_tail(),
                })
            }
        }
    }

    /// Stops every thread of the worker (SIGSTOP) and notes its CPU time then.
    fn freeze(&mut self) {
        if self.frozen_at_ns.is_some() {
            return;
        }
        let pid = self.pid();
        // A stopped process changes no memory, and sampling it would cost the other side's turn.
        self.sampler.pause();
        // SAFETY: signalling our own child, which has not been reaped (we hold its Child).
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        wait_until_stopped(pid, Duration::from_secs(2));
        self.frozen_at_ns = Some(self.cpu_ns());
    }

    /// Lets the worker run again (SIGCONT), after checking it used no CPU while frozen.
    fn thaw(&mut self, label: &str) -> Result<(), WorkerError> {
        let Some(at) = self.frozen_at_ns.take() else {
            return Ok(());
        };
        let used = self.cpu_ns().saturating_sub(at);
        // SAFETY: as in `freeze`.
        unsafe { libc::kill(self.pid(), libc::SIGCONT) };
        self.sampler.resume();
        if used > FROZEN_CPU_TOLERANCE_NS {
            self.kill();
            return Err(WorkerError::RanWhileFrozen {
                variant: self.variant.clone(),
                request: label.into(),
                cpu_ms: used as f64 / 1e6,
            });
        }
        Ok(())
    }

    /// The CPU time of every thread of the worker so far, in ns.
    fn cpu_ns(&self) -> u64 {
        process_cpu_ns(self.pid(), self.cpu_clock)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits briefly for the child to end and returns how it ended.
    fn reap(&mut self) -> Option<ExitStatus> {
        // SAFETY: as in `freeze`; a frozen worker must run to end.
        unsafe { libc::kill(self.pid(), libc::SIGCONT) };
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// Kills the worker because a stop was asked for.
    fn interrupted(&mut self, label: &str) -> WorkerError {
        self.kill();
        WorkerError::Interrupted {
            variant: self.variant.clone(),
            request: label.into(),
        }
    }

    fn crashed(&mut self, label: &str) -> WorkerError {
        let how = describe_exit(self.reap());
        WorkerError::Crashed {
            variant: self.variant.clone(),
            request: label.into(),
            how,
            log: self.log_tail(),
        }
    }

    fn log_tail(&self) -> String {
        // Give the stderr thread a moment to drain what the dying worker wrote.
        std::thread::sleep(Duration::from_millis(50));
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.is_empty() {
            String::new()
        } else {
            let lines: Vec<String> = tail.iter().map(|l| format!("\n  | {l}")).collect();
            format!("; its last output:{}", lines.concat())
        }
    }

    fn failed(&self, label: &str, message: String) -> WorkerError {
        WorkerError::Failed {
            variant: self.variant.clone(),
            request: label.into(),
            message: shorten(&message, 2000),
        }
    }

    fn protocol(&mut self, label: &str, what: String) -> WorkerError {
        self.kill();
        WorkerError::Protocol {
            variant: self.variant.clone(),
            request: label.into(),
            what: shorten(&what, 300),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Its reader threads drain what is left and end with the pipes.
        self.gate.set(false);
        // Closing stdin ends a healthy worker (thawed first); a stuck one is killed.
        self.stdin.take();
        // SAFETY: as in `freeze`.
        unsafe { libc::kill(self.pid(), libc::SIGCONT) };
        let mut ended = false;
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                ended = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !ended {
            self.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Samples a process's memory while it runs (not while it is frozen: then it changes nothing,
/// and the sampling would take the other side's turn; its thread sleeps until the thaw) and
/// keeps the highest figure seen: its high-water mark, or its resident size plus what it keeps
/// in files ([`outside::Outside`]). Resetting the high-water mark (writing `clear_refs`) can
/// then hide only what is allocated and freed between two samples, and a store of files is
/// seen for as long as it is kept.
struct MemorySampler {
    peak_kib: Arc<AtomicU64>,
    /// The first time a sample could not measure what the process keeps in files.
    unmeasurable: Arc<Mutex<Option<outside::Unmeasurable>>>,
    /// Whether the process may run (it is not frozen).
    running: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// The sampling thread, unparked when the process is let run again.
    thread: std::thread::Thread,
    pid: libc::pid_t,
    outside: outside::Outside,
}

/// How often [`MemorySampler`] reads a process's memory, and every how many reads it also
/// reads what the process keeps in files (about 0.1 ms a read).
#[derive(Debug, Clone, Copy)]
struct Cadence {
    every: Duration,
    outside_every: u64,
}

impl Cadence {
    /// A CUDA worker may reset its high-water mark, so its resident size is read often; the
    /// machines that run one have cores to spare.
    const GPU: Cadence = Cadence {
        every: Duration::from_millis(10),
        outside_every: 5,
    };
    /// A CPU worker cannot reset its mark (Landlock), so only a store of files needs reading,
    /// and one is worth keeping only for far longer than this. Each wake-up takes a core from
    /// the worker's threads: at every 10 ms, a 2-core VM's `host bench` tg128 read 6-7% slower.
    const CPU: Cadence = Cadence {
        every: Duration::from_millis(100),
        outside_every: 1,
    };
}

impl MemorySampler {
    fn start(pid: libc::pid_t, outside: outside::Outside, cadence: Cadence) -> MemorySampler {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let unmeasurable = Arc::new(Mutex::new(None));
        let (peak, run, done) = (peak_kib.clone(), running.clone(), stop.clone());
        let failure = unmeasurable.clone();
        let files = outside.clone();
        let thread = std::thread::spawn(move || {
            let (mut kept_kib, mut samples) = (0, 0u64);
            while !done.load(Ordering::Relaxed) {
                if !run.load(Ordering::Relaxed) {
                    std::thread::park();
                    continue;
                }
                if samples % cadence.outside_every == 0 {
                    // An unmeasurable store is an error at the request's end (`measure`).
                    match files.kib(pid) {
                        Ok(kib) => kept_kib = kib,
                        Err(e) => {
                            let mut first = failure.lock().unwrap_or_else(|e| e.into_inner());
                            first.get_or_insert(e);
                        }
                    }
                }
                samples += 1;
                let Some(kib) = memory_kib(pid, kept_kib) else {
                    return; // gone
                };
                peak.fetch_max(kib, Ordering::Relaxed);
                std::thread::park_timeout(cadence.every);
            }
        })
        .thread()
        .clone();
        MemorySampler {
            peak_kib,
            unmeasurable,
            running,
            stop,
            thread,
            pid,
            outside,
        }
    }

    /// The process is stopped: sampling waits for [`MemorySampler::resume`].
    fn pause(&self) {
        self.running.store(false, Ordering::Relaxed);
    }

    /// The process runs again.
    fn resume(&self) {
        self.running.store(true, Ordering::Relaxed);
        self.thread.unpark();
    }

    /// The process's memory now, as a sample reads it (0 once it is gone); an error if this
    /// reading, or any sample's, could not measure what it keeps in files.
    fn measure(&self) -> Result<u64, outside::Unmeasurable> {
        let earlier = self
            .unmeasurable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(e) = earlier {
            return Err(e);
        }
        Ok(memory_kib(self.pid, self.outside.kib(self.pid)?).unwrap_or(0))
    }
}

/// Process `pid`'s memory in KiB: the larger of its high-water mark and its resident size plus
/// `kept_kib` (what it keeps in files). `None` once it is gone.
fn memory_kib(pid: libc::pid_t, kept_kib: u64) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(status_kib(&status, "VmHWM:").max(status_kib(&status, "VmRSS:") + kept_kib))
}

/// The KiB of field `key` (`VmHWM:`, say) in a `/proc/<pid>/status` text; 0 when absent.
fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
}

impl Drop for MemorySampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.unpark();
    }
}

/// The CPU-time clock of process `pid`, readable from outside it.
fn cpu_clock(pid: libc::pid_t) -> Option<libc::clockid_t> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: writes one clockid into `clock`.
    (unsafe { libc::clock_getcpuclockid(pid, &mut clock) } == 0).then_some(clock)
}

/// The CPU time of every thread of process `pid`, in ns: from its CPU-time clock, else from
/// `/proc/<pid>/stat` (in clock ticks). 0 when the process is gone.
pub fn process_cpu_ns(pid: libc::pid_t, clock: Option<libc::clockid_t>) -> u64 {
    if let Some(clock) = clock {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: writes one timespec.
        if unsafe { libc::clock_gettime(clock, &mut ts) } == 0 {
            return ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        }
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) start at ") ".
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks: u64 = [11, 12] // utime, stime (fields 14 and 15 of the whole line)
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    ticks * 1_000_000_000 / hz
}

/// Waits until every thread of `pid` is stopped (state `T`), or `limit` passes.
fn wait_until_stopped(pid: libc::pid_t, limit: Duration) {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return; // gone
        };
        let all_stopped = tasks.flatten().all(|task| {
            std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(") ")
                        .and_then(|(_, rest)| rest.chars().next())
                })
                .is_none_or(|state| matches!(state, 'T' | 't' | 'Z' | 'X'))
        });
        if all_stopped {
            return;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The resident-memory high-water mark (VmHWM) of process `pid`, in KiB; 0 when unreadable.
#[cfg(test)]
fn peak_rss_kib(pid: libc::pid_t) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_or(0, |status| status_kib(&status, "VmHWM:"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_worker_gets_a_directory_name_of_one_length_and_an_empty_scratch_directory() {
        let dirs: Vec<PathBuf> = (0..12).map(|_| worker_dir().unwrap()).collect();
        let lengths: Vec<usize> = dirs.iter().map(|d| d.as_os_str().len()).collect();
        let scratch_entries: Vec<usize> = dirs
            .iter()
            .map(|d| std::fs::read_dir(d.join(WORKER_SCRATCH)).unwrap().count())
            .collect();
        for dir in &dirs {
            std::fs::remove_dir_all(dir).unwrap();
        }
        assert!(lengths.iter().all(|&n| n == lengths[0]), "{lengths:?}");
        assert!(
            scratch_entries.iter().all(|&n| n == 0),
            "{scratch_entries:?}"
        );
    }

    #[test]
    fn a_library_that_cannot_be_copied_is_named() {
        let lib = Path::new("/nonexistent/autoinfer/libmissing.so");
        let err = Worker::spawn(&Spawn {
            variant: "variants/missing",
            lib,
            model: Path::new("/nonexistent/model.gguf"),
            timeout: Duration::from_secs(5),
            echo_log: false,
            load: LoadRequest::default(),
            protect: &[],
        })
        .err()
        .expect("no worker starts without its library");
        let text = format!("{:#}", anyhow::Error::from(err));
        assert!(
            text.contains("variants/missing") && text.contains(&lib.display().to_string()),
            "{text}"
        );
    }

    #[test]
    fn a_worker_is_timed_by_its_own_turns_only() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut clock = ActiveClock::starting(ms(0));
        assert_eq!(clock.active_ns_at(ms(60)), 60_000_000);
        clock.pause(ms(100)); // ran 0..100, then stopped until 350
        clock.resume(ms(350));
        // Read during the second turn: 100 ms of the first and 50 of this one.
        assert_eq!(clock.active_ns_at(ms(400)), 150_000_000);
        // Written before the pause but read while stopped: counted at the pause.
        assert_eq!(clock.active_ns_at(ms(200)), 100_000_000);
        // The timeout counts the turns only: 150 ms used of 1 s at 400.
        assert_eq!(clock.deadline(ms(400), Duration::from_secs(1)), ms(1250));
        clock.pause(ms(500));
        assert_eq!(clock.total_at(ms(900)), Duration::from_millis(250));
        assert_eq!(clock.paused(), Duration::from_millis(250));
        // A worker never paused (one request after the other) is timed by the wall clock.
        let alone = ActiveClock::starting(ms(0));
        assert_eq!(alone.active_ns_at(ms(900)), 900_000_000);
        assert_eq!(alone.paused(), Duration::ZERO);
    }

    #[test]
    fn a_closed_gate_leaves_the_output_in_the_pipe_until_it_opens() {
        use std::os::unix::net::UnixStream;
        let (mut writer, mut reader) = UnixStream::pair().unwrap();
        let gate = Arc::new(ReadGate::default());
        gate.set(true);
        let read = Arc::new(AtomicUsize::new(0));
        let (g, r) = (gate.clone(), read.clone());
        let thread = std::thread::spawn(move || {
            let mut chunk = [0u8; 64];
            loop {
                g.pass();
                match reader.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => r.fetch_add(n, Ordering::SeqCst),
                };
            }
        });
        writer.write_all(&[b'\n'; 1000]).unwrap();
        // Closed: nothing is read, however long it waits (a quarter of a second here).
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(read.load(Ordering::SeqCst), 0, "read through a closed gate");
        gate.set(false);
        drop(writer);
        thread.join().unwrap();
        assert_eq!(read.load(Ordering::SeqCst), 1000, "all read once it opened");
    }

    #[test]
    fn signals_are_named() {
        assert!(describe_exit(Some(ExitStatus::from_raw(libc::SIGSEGV))).contains("SIGSEGV"));
        assert!(describe_exit(Some(ExitStatus::from_raw(libc::SIGABRT))).contains("SIGABRT"));
        assert!(describe_exit(Some(ExitStatus::from_raw(3 << 8))).contains("status 3"));
    }

    #[test]
    fn sampling_keeps_a_peak_that_clear_refs_resets() {
        // A child that touches 256 MiB, frees it, then resets its high-water mark as a worker
        // allowed to write its /proc entries could, and waits.
        let script = "import time\nb = bytearray(256 << 20)\ntime.sleep(0.3)\ndel b\n\
                      open('/proc/self/clear_refs', 'w').write('5')\ntime.sleep(60)\n";
        let mut child = Command::new("python3")
            .args(["-c", script])
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        let empty = std::env::temp_dir().join(format!("sampler-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        let sampler = MemorySampler::start(pid, outside::Outside::new(&empty), Cadence::GPU);
        // Wait for the allocation, then for the reset, however slowly a loaded machine runs
        // python (no fixed sleep): each wait ends on what it waits for, or after 30 s.
        let wait_for = |done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !done() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        wait_for(&|| peak_rss_kib(pid) >= 250 << 10);
        wait_for(&|| peak_rss_kib(pid) < 128 << 10);
        let after = peak_rss_kib(pid);
        let sampled = sampler.peak_kib.load(Ordering::Relaxed);
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_dir_all(&empty).unwrap();
        assert!(
            after < 128 << 10,
            "the reset took effect: VmHWM {after} KiB"
        );
        assert!(
            sampled >= 250 << 10,
            "the sampler kept the 256 MiB peak: {sampled} KiB (VmHWM now {after} KiB)"
        );
    }

    #[test]
    fn a_stopped_process_uses_no_cpu_and_its_memory_is_read_from_outside() {
        // A child that spins: its CPU clock advances while it runs and not while it is stopped.
        let mut child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        let clock = cpu_clock(pid);
        std::thread::sleep(Duration::from_millis(300));
        let running = process_cpu_ns(pid, clock);
        assert!(running > 50_000_000, "a spinning child used {running} ns");
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        wait_until_stopped(pid, Duration::from_secs(2));
        let stopped = process_cpu_ns(pid, clock);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(process_cpu_ns(pid, clock), stopped, "a stopped child ran");
        // The /proc fallback agrees with the clock to within a tick or two.
        let from_proc = process_cpu_ns(pid, None);
        assert!(
            from_proc.abs_diff(stopped) < 30_000_000,
            "{from_proc} vs {stopped}"
        );
        assert!(peak_rss_kib(pid) > 0);
        unsafe { libc::kill(pid, libc::SIGCONT) };
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
