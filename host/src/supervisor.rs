//! The supervisor's handle on a worker process: spawn, send requests, enforce timeouts, and turn
//! a crash into a verdict that names the variant and the request.
//!
//! [`Worker::spawn`] starts this same executable as `host worker`, waits for `Ready`, and keeps
//! two reader threads: replies (one JSON line each) and stderr (echoed when asked, and its last
//! lines kept for error messages). The supervisor never loads a variant itself.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::wire::{Reply, Request};

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
    #[error("variant {variant}: the worker sent an unreadable reply during {request}: {line}")]
    Protocol {
        variant: String,
        request: String,
        line: String,
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
        None => "closed its reply pipe".into(),
    }
}

enum Line {
    Reply(String),
    Eof,
}

/// A running worker with one variant loaded.
pub struct Worker {
    variant: String,
    child: Child,
    stdin: Option<ChildStdin>,
    replies: Receiver<Line>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// Time the variant's `load` took, from the worker's `Ready`.
    pub load_ms: f64,
}

const TAIL_LINES: usize = 12;

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

impl Worker {
    /// Starts a worker for the library `lib` over the model at `model`, waiting up to `timeout`
    /// for the variant to load, which gets `load` as its load options. `variant` names it in
    /// every message.
    pub fn spawn(
        variant: &str,
        lib: &Path,
        model: &Path,
        timeout: Duration,
        echo_log: bool,
        load: &LoadRequest,
    ) -> Result<Worker, WorkerError> {
        // /proc/self/exe is this very binary even after a rebuild has replaced the file on
        // disk (a run takes minutes, and the oracle's worker starts at its end).
        let proc_exe = Path::new("/proc/self/exe");
        let exe = if proc_exe.exists() {
            Ok(proc_exe.to_path_buf())
        } else {
            std::env::current_exe()
        };
        let exe = exe.map_err(|source| WorkerError::Spawn {
            variant: variant.into(),
            source,
        })?;
        let mut command = Command::new(exe);
        command
            .arg("worker")
            .arg("--lib")
            .arg(lib)
            .arg("--model")
            .arg(model);
        if let Some(n) = load.threads {
            command.arg("--threads").arg(n.to_string());
        }
        if let Some(device) = load.device {
            command.arg("--device").arg(device.to_string());
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| WorkerError::Spawn {
                variant: variant.into(),
                source,
            })?;
        let (tx, replies) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout was piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(Line::Reply(l)).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send(Line::Eof);
        });
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr_tail.clone();
        let stderr = child.stderr.take().expect("stderr was piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo_log {
                    eprintln!("  | {line}");
                }
                let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let stdin = child.stdin.take();
        let mut worker = Worker {
            variant: variant.into(),
            child,
            stdin,
            replies,
            stderr_tail,
            load_ms: 0.0,
        };
        match worker.wait_reply("loading the variant", timeout)? {
            Reply::Ready { load_ms } => {
                worker.load_ms = load_ms;
                Ok(worker)
            }
            Reply::Failed { message } => Err(worker.failed("loading the variant", message)),
            other => Err(worker.protocol("loading the variant", format!("{other:?}"))),
        }
    }

    /// Sends `request` (described as `label` in errors) and waits up to `timeout` for the reply.
    /// A `Failed` reply becomes [`WorkerError::Failed`].
    pub fn request(
        &mut self,
        request: &Request,
        label: &str,
        timeout: Duration,
    ) -> Result<Reply, WorkerError> {
        let mut line = serde_json::to_string(request).expect("requests always serialise");
        line.push('\n');
        let sent = self
            .stdin
            .as_mut()
            .map(|s| s.write_all(line.as_bytes()).and_then(|_| s.flush()));
        if !matches!(sent, Some(Ok(()))) {
            let how = describe_exit(self.reap());
            return Err(WorkerError::Crashed {
                variant: self.variant.clone(),
                request: label.into(),
                how,
                log: self.log_tail(),
            });
        }
        match self.wait_reply(label, timeout)? {
            Reply::Failed { message } => Err(self.failed(label, message)),
            reply => Ok(reply),
        }
    }

    fn wait_reply(&mut self, label: &str, timeout: Duration) -> Result<Reply, WorkerError> {
        match self.replies.recv_timeout(timeout) {
            Ok(Line::Reply(line)) => {
                serde_json::from_str(&line).map_err(|_| self.protocol(label, line))
            }
            Ok(Line::Eof) | Err(RecvTimeoutError::Disconnected) => {
                let how = describe_exit(self.reap());
                Err(WorkerError::Crashed {
                    variant: self.variant.clone(),
                    request: label.into(),
                    how,
                    log: self.log_tail(),
                })
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(WorkerError::TimedOut {
                    variant: self.variant.clone(),
                    request: label.into(),
                    secs: timeout.as_secs_f64(),
                    log: self.log_tail(),
                })
            }
        }
    }

    /// Waits briefly for the child to end and returns how it ended.
    fn reap(&mut self) -> Option<ExitStatus> {
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
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
            message,
        }
    }

    fn protocol(&self, label: &str, line: String) -> WorkerError {
        WorkerError::Protocol {
            variant: self.variant.clone(),
            request: label.into(),
            line,
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing stdin ends a healthy worker; a stuck one is killed.
        self.stdin.take();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_named() {
        assert!(describe_exit(Some(ExitStatus::from_raw(libc::SIGSEGV))).contains("SIGSEGV"));
        assert!(describe_exit(Some(ExitStatus::from_raw(libc::SIGABRT))).contains("SIGABRT"));
        assert!(describe_exit(Some(ExitStatus::from_raw(3 << 8))).contains("status 3"));
    }
}
