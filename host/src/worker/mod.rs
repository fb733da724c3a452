//! Worker mode: the process that loads one variant and runs the supervisor's requests.
//!
//! Everything in this process becomes the variant's once its library is opened, so the worker
//! does all it must do before that, and nothing that counts after it:
//! 1. it keeps only descriptors 0-2 (whatever started the host may have left others open),
//!    takes a private copy of stdout for its messages and points fd 1 at stderr, so a variant
//!    that prints cannot garble them;
//! 2. it dies with the supervisor (`PR_SET_PDEATHSIG`) and maps the model; its library is the
//!    copy the supervisor made in its worker directory, beside its scratch directory;
//! 3. given a thread count, it pins itself to that many CPUs ([`crate::sandbox::pin_to_cpus`]);
//!    it confines itself ([`crate::sandbox::confine_worker`]): from then on it can read only
//!    system files and its library, write only its scratch directory and, when pinned, not
//!    change affinity;
//! 4. it leaves a random number of bytes allocated ([`shift_heap`]), so that the variant's
//!    buffers land at offsets drawn afresh in every worker, then opens the library and
//!    answers requests. Its sink ([`StreamSink`]) forwards every `emit` at once as a
//!    [`Message::Tokens`] line: the supervisor timestamps it on arrival and counts the tokens
//!    itself. Nothing here measures anything.

pub mod plugin;
pub mod wire;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::path::PathBuf;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::RSlice;
use anyhow::{Context, Result};
use plugin_api::{Device, TokenSink, TokenSink_TO};

use crate::gguf::Model;
use crate::sandbox::{self, Policy, Support};
use crate::worker::wire::LoadRequest;
use crate::worker::wire::{Message, Request};

/// What the supervisor starts a worker with (its hidden command line).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The worker's private directory (the supervisor makes it and removes it afterwards):
    /// the fresh copy of the variant's library, [`WorkerArgs::library`], beside the scratch
    /// directory, [`WorkerArgs::scratch`], which the worker may write.
    #[arg(long)]
    pub dir: PathBuf,
    /// The GGUF model.
    #[arg(long)]
    pub model: PathBuf,
    /// Paths that stay out of reach even inside a readable system directory.
    #[arg(long = "protect")]
    pub protect: Vec<PathBuf>,
    /// The variant's `threads` load option, and the number of CPUs the worker is pinned to.
    #[arg(long)]
    pub threads: Option<usize>,
    /// The variant's `device` load option.
    #[arg(long)]
    pub device: Option<Device>,
}

/// The host-owned sink: every emit goes to the supervisor at once, untimed and unjudged here.
struct StreamSink<'a> {
    out: &'a mut File,
    max: usize,
    sent: usize,
    /// The line being written, reused: no allocation per token.
    line: String,
}

impl TokenSink for StreamSink<'_> {
    fn emit(&mut self, tokens: RSlice<'_, u32>) -> bool {
        tokens_line(&mut self.line, tokens.as_slice());
        if self.out.write_all(self.line.as_bytes()).is_err() {
            return false; // the supervisor is gone
        }
        self.sent += tokens.len();
        self.sent < self.max
    }
}

/// Writes `tokens` into `line` as a [`Message::Tokens`] line, as serde would, without
/// allocating (the per-token path of every generation).
fn tokens_line(line: &mut String, tokens: &[u32]) {
    use std::fmt::Write as _;
    line.clear();
    line.push_str("{\"Tokens\":{\"ids\":[");
    for (i, t) in tokens.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        let _ = write!(line, "{t}");
    }
    line.push_str("]}}\n");
}

/// Takes fd 1 for messages and sends everything else written to stdout to stderr.
fn private_stdout() -> Result<File> {
    // SAFETY: plain fd duplication at start-up, before any other thread exists.
    unsafe {
        let fd = libc::dup(1);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            anyhow::bail!(
                "cannot set up the worker's message pipe: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(File::from_raw_fd(fd))
    }
}

fn send(out: &mut File, message: &Message) -> Result<()> {
    out.write_all(message.line().as_bytes())
        .context("the supervisor closed the message pipe")
}

fn fail(out: &mut File, message: String) -> Result<()> {
    send(out, &Message::Failed { message })
}

/// What the worker may touch once confined: the system's files, its scratch directory, and
/// its library, to read only (so it cannot keep data in the library's copy, which is not
/// counted as its own: [`crate::supervisor::WORKER_SCRATCH`]); on
/// a GPU also what the CUDA driver needs: the device nodes, its own program (the driver opens
/// it), and its threads' /proc entries (the driver names its threads there; they include
/// `clear_refs`, which resets the peak-memory counter, so the supervisor samples a CUDA
/// worker's memory instead of trusting the counter: [`crate::supervisor`]).
fn policy(args: &WorkerArgs) -> Policy {
    let mut policy = Policy::system();
    policy.write.push(args.scratch());
    policy.exact.push(args.library());
    if matches!(args.device, Some(Device::Cuda(_))) {
        policy.devices.extend(Policy::nvidia_devices());
        policy
            .exact
            .extend(std::fs::read_link("/proc/self/exe").ok());
        policy.write.push("/proc/self/task".into());
    }
    policy.protect = args.protect.clone();
    policy
}

/// The most bytes [`shift_heap`] leaves allocated.
const HEAP_SHIFT_MAX: usize = 4096;

/// Leaves `16 * (draw mod 256)` bytes allocated on the heap for good, and returns how many.
///
/// Called with a random draw before the variant is opened, so that where the variant's
/// buffers land on the heap (their offset in a cache line and in a page) is drawn afresh in
/// every worker. Without it the layout is a function of what the process allocated before,
/// the same in every worker of one variant and different between two: a comparison's two
/// sides whose library paths differed in length read prefill 7.5% apart with the same machine
/// code, and a change that only moves an allocation could be kept (or reverted) for where its
/// buffers happen to fall. Drawn per worker, that offset becomes part of each pair's noise,
/// which the test sees, instead of a bias it cannot.
fn shift_heap(draw: u64) -> usize {
    let bytes = (draw % (HEAP_SHIFT_MAX as u64 / 16)) as usize * 16;
    std::mem::forget(Vec::<u8>::with_capacity(bytes));
    bytes
}

impl WorkerArgs {
    /// The library to open: the fresh copy the supervisor made in the worker directory
    /// ([`crate::supervisor::WORKER_LIBRARY`]). glibc caches a loaded library by path and
    /// inode, so only a fresh copy loads rebuilt code, and every worker loads the same path,
    /// whatever the library's own name.
    pub fn library(&self) -> PathBuf {
        self.dir.join(crate::supervisor::WORKER_LIBRARY)
    }

    /// The only directory the worker may write ([`crate::supervisor::WORKER_SCRATCH`]); the
    /// library lies beside it, not in it.
    pub fn scratch(&self) -> PathBuf {
        self.dir.join(crate::supervisor::WORKER_SCRATCH)
    }
}

/// Runs the worker: confine, load the variant, then answer requests until stdin closes.
pub fn run(args: &WorkerArgs) -> Result<()> {
    sandbox::close_inherited_descriptors(&[])?;
    // Drawn now, before confinement, from the kernel's random source.
    let heap_draw = crate::stats::rng::fresh_seed();
    let mut out = private_stdout()?;
    // SAFETY: asks the kernel to kill this process when its parent, the supervisor, dies; a
    // worker frozen by the supervisor must not outlive it.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() == 1 {
            std::process::exit(1);
        }
    }
    let model = match Model::open(&args.model) {
        Ok(m) => m,
        Err(e) => return fail(&mut out, e.to_string()),
    };
    // A thread count is a CPU budget: the worker runs on that many CPUs and cannot leave them.
    if let Some(n) = args.threads {
        if let Err(e) = sandbox::pin_to_cpus(n) {
            return fail(
                &mut out,
                format!("the worker could not be held to {n} CPU(s): {e}"),
            );
        }
    }
    let limits = sandbox::WorkerLimits {
        pinned: args.threads.is_some(),
        cpu: !matches!(args.device, Some(Device::Cuda(_))),
    };
    if let Err(e) = sandbox::confine_worker(&policy(args), Support::probe(), limits) {
        return fail(
            &mut out,
            format!("the worker could not confine itself, so the variant was not opened: {e}"),
        );
    }
    let load = LoadRequest {
        threads: args.threads,
        device: args.device,
    };
    shift_heap(heap_draw);
    let mut variant =
        match crate::worker::plugin::load(&args.library(), model.view, &load.options()) {
            Ok(v) => v,
            Err(e) => return fail(&mut out, e.to_string()),
        };
    send(&mut out, &Message::Ready)?;

    for line in BufReader::new(std::io::stdin()).lines() {
        let line = line.context("reading a request")?;
        let request: Request = serde_json::from_str(&line).context("a malformed request")?;
        let reply = match request {
            Request::Generate {
                prompt,
                max_new_tokens,
            } => {
                let mut sink = StreamSink {
                    out: &mut out,
                    max: max_new_tokens as usize,
                    sent: 0,
                    line: String::with_capacity(64),
                };
                let result = variant.generate(
                    RSlice::from_slice(&prompt),
                    max_new_tokens,
                    TokenSink_TO::from_ptr(&mut sink, TD_Opaque),
                );
                match result.into_result() {
                    Ok(()) => Message::Done,
                    Err(e) => Message::Failed {
                        message: e.into_string(),
                    },
                }
            }
            Request::Score { tokens, from } => {
                match variant
                    .score(RSlice::from_slice(&tokens), from)
                    .into_result()
                {
                    Ok(positions) => Message::Scored {
                        positions: positions.into_vec(),
                    },
                    Err(e) => Message::Failed {
                        message: e.into_string(),
                    },
                }
            }
        };
        send(&mut out, &reply)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_line_is_the_message_serde_writes() {
        let mut line = String::new();
        for tokens in [&[][..], &[7], &[1, 49151, 0]] {
            tokens_line(&mut line, tokens);
            let ids = tokens.to_vec();
            assert_eq!(line, Message::Tokens { ids }.line());
        }
    }

    /// The worker writes only its scratch directory, and reads its library as one file
    /// outside it: a library it could write would be a store the count of its files (the
    /// scratch directory, [`crate::supervisor::outside`]) leaves out.
    #[test]
    fn the_library_is_readable_only_and_outside_the_writable_directory() {
        for device in [None, Some(Device::Cuda(0))] {
            let args = WorkerArgs {
                dir: PathBuf::from("/tmp/autoinfer-worker-1-00"),
                model: PathBuf::from("/models/m.gguf"),
                protect: Vec::new(),
                threads: None,
                device,
            };
            let policy = policy(&args);
            let library = args.library();
            assert_eq!(
                library,
                PathBuf::from("/tmp/autoinfer-worker-1-00/variant.so")
            );
            assert!(policy.exact.contains(&library), "{policy:?}");
            assert!(policy.write.contains(&args.scratch()), "{policy:?}");
            for root in policy.write.iter().chain(&policy.read) {
                assert!(
                    !library.starts_with(root),
                    "{} under {}",
                    library.display(),
                    root.display()
                );
            }
        }
    }

    #[test]
    fn the_heap_shift_takes_every_16_byte_step_below_its_bound() {
        let mut seen = std::collections::BTreeSet::new();
        for draw in [0, 1, 255, 256, 257, u64::MAX]
            .into_iter()
            .chain(1000..2000)
        {
            let bytes = shift_heap(draw);
            assert!(
                bytes.is_multiple_of(16) && bytes < HEAP_SHIFT_MAX,
                "{draw}: {bytes}"
            );
            seen.insert(bytes);
        }
        assert_eq!(seen.len(), HEAP_SHIFT_MAX / 16);
        assert_eq!((shift_heap(0), shift_heap(1), shift_heap(257)), (0, 16, 16));
    }
}
