//! Confining variant code with the kernel, at run time and at build time.
//!
//! Variant code runs in two places: in a worker, once its library is opened, and in its build
//! (cargo runs its build scripts and proc macros). Both are confined before any of that code
//! runs, by mechanisms the confined process cannot undo:
//! - **Landlock** (files, TCP, signals, abstract sockets): a [`Policy`] lists what may be read
//!   (system directories, the toolchain) and written (a scratch or build directory); everything
//!   else, the checkout, the results and the oracle's cache included, is out of reach. A
//!   Landlock-confined process also cannot trace or open the memory of a process outside its
//!   own domain.
//! - **seccomp** ([`worker_filters`], [`build_filters`]): no tracing or writing into other
//!   processes, signals only to itself (a worker), no new processes or programs (a worker), no
//!   network sockets, no kernel stores that outlive a process (SysV IPC, message queues, key
//!   rings), no clock changes, no io_uring (which seccomp cannot see into).
//! - **a CPU budget** ([`pin_to_cpus`]): a worker asked to compute with N threads runs on N
//!   CPUs, and seccomp takes away `sched_setaffinity`, so no thread it starts can leave them.
//! - **no capabilities** ([`drop_capabilities`]) and `no_new_privs`, so a worker started as
//!   root has no more power than its user.
//!
//! [`Support`] probes what the running kernel offers and [`Level`] is what a results row
//! records: `full`, `partial: ...` naming what is missing, or `none: ...`.

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use serde::Serialize;

/// Why a process could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("Landlock: {0}")]
    Landlock(String),
    #[error("seccomp: {0}")]
    Seccomp(String),
    #[error("cannot drop capabilities: {0}")]
    Capabilities(std::io::Error),
    #[error("{0}")]
    Setup(String),
}

/// The oldest Landlock ABI that confines files fully: ABI 3 adds truncation, without which a
/// confined process could truncate any file it may read.
const FILES_ABI: i32 = 3;
/// The Landlock ABI that scopes signals and abstract unix sockets to the sandbox.
const SIGNALS_ABI: i32 = 6;

/// What the running kernel offers for confinement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Support {
    /// The kernel's Landlock ABI version, 0 when Landlock is missing or disabled.
    pub landlock_abi: i32,
    /// Whether seccomp filters can be installed.
    pub seccomp: bool,
}

impl Support {
    /// Asks the kernel.
    pub fn probe() -> Support {
        // SAFETY: the documented version query: a null attribute, size 0 and the VERSION flag.
        let abi = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<u8>(),
                0usize,
                1u32, // LANDLOCK_CREATE_RULESET_VERSION
            )
        };
        let seccomp = std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Seccomp_filters:")));
        Support {
            landlock_abi: abi.max(0) as i32,
            seccomp,
        }
    }

    /// How fully a worker is confined on this kernel.
    pub fn worker_level(&self) -> Level {
        let mut missing = Vec::new();
        if self.landlock_abi == 0 {
            missing.push("no Landlock in this kernel: files are not confined".to_string());
        } else if self.landlock_abi < FILES_ABI {
            missing.push(format!(
                "Landlock ABI {} < {FILES_ABI}: files may be truncated",
                self.landlock_abi
            ));
        }
        if !self.seccomp {
            missing.push(
                "no seccomp: other processes, sockets and kernel stores are reachable".into(),
            );
        }
        Level::from_missing(missing, self.landlock_abi == 0 && !self.seccomp)
    }

    /// How fully a build (cargo, build scripts, proc macros) is confined on this kernel.
    pub fn build_level(&self) -> Level {
        let mut missing = Vec::new();
        if self.landlock_abi == 0 {
            missing.push("no Landlock in this kernel: the build may write anywhere".to_string());
        } else {
            if self.landlock_abi < FILES_ABI {
                missing.push(format!(
                    "Landlock ABI {} < {FILES_ABI}: files may be truncated",
                    self.landlock_abi
                ));
            }
            if self.landlock_abi < SIGNALS_ABI {
                missing.push(format!(
                    "Landlock ABI {} < {SIGNALS_ABI}: build scripts may signal other processes",
                    self.landlock_abi
                ));
            }
        }
        if !self.seccomp {
            missing.push("no seccomp: build scripts may trace other processes".into());
        }
        Level::from_missing(missing, self.landlock_abi == 0)
    }
}

/// How fully variant code was confined: what a results row records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Every mechanism of this module was in force.
    Full,
    /// Some were; the list says what was missing.
    Partial(Vec<String>),
    /// Nothing confined the code; the text says why.
    None(String),
}

impl Level {
    fn from_missing(missing: Vec<String>, nothing: bool) -> Level {
        match (missing.is_empty(), nothing) {
            (true, _) => Level::Full,
            (false, true) => Level::None(missing.join("; ")),
            (false, false) => Level::Partial(missing),
        }
    }

    /// The weaker of two levels, their reasons merged.
    pub fn and(self, other: Level) -> Level {
        match (self, other) {
            (Level::None(a), Level::None(b)) if a == b => Level::None(a),
            (Level::None(a), Level::None(b)) => Level::None(format!("{a}; {b}")),
            (Level::None(a), _) | (_, Level::None(a)) => Level::None(a),
            (Level::Partial(mut a), Level::Partial(b)) => {
                for reason in b {
                    if !a.contains(&reason) {
                        a.push(reason);
                    }
                }
                Level::Partial(a)
            }
            (Level::Partial(a), Level::Full) | (Level::Full, Level::Partial(a)) => {
                Level::Partial(a)
            }
            (Level::Full, Level::Full) => Level::Full,
        }
    }

    /// A library the host did not build (`--no-build`): nothing is known of how its build
    /// was confined.
    pub fn not_built_by_host() -> Level {
        Level::Partial(vec![
            "--no-build: the library was built outside the host, its build not confined".into(),
        ])
    }

    /// Whether every mechanism was in force.
    pub fn is_full(&self) -> bool {
        *self == Level::Full
    }

    /// The row's text: `full`, `partial: ...` or `none: ...`.
    pub fn label(&self) -> String {
        match self {
            Level::Full => "full".into(),
            Level::Partial(missing) => format!("partial: {}", missing.join("; ")),
            Level::None(why) => format!("none: {why}"),
        }
    }
}

/// What a confined process may touch. Paths need not exist (missing ones are skipped).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Readable and executable hierarchies (system libraries, the toolchain, sources).
    pub read: Vec<PathBuf>,
    /// Hierarchies with every right: reading, writing, creating, removing.
    pub write: Vec<PathBuf>,
    /// Device files to open for reading and writing (`/dev/null`, a GPU's nodes).
    pub devices: Vec<PathBuf>,
    /// Single files to read as named, even inside a protected path: a worker's own program,
    /// which it runs anyway (the CUDA driver opens it).
    pub exact: Vec<PathBuf>,
    /// Paths that must stay out of reach even where they lie inside a `read` hierarchy: the
    /// checkout's build outputs, the results, the oracle's cache, the model cache.
    pub protect: Vec<PathBuf>,
}

/// The system directories every confined process may read: programs, libraries, their
/// configuration, and the kernel's views of processes and devices (read only).
pub const SYSTEM_READ: [&str; 11] = [
    "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc", "/opt", "/proc", "/sys",
];

/// Device files every confined process may open: the null and zero sinks, randomness.
pub const SYSTEM_DEVICES: [&str; 5] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/urandom",
    "/dev/random",
];

impl Policy {
    /// The system's part of every policy: [`SYSTEM_READ`], [`SYSTEM_DEVICES`], and every
    /// directory of `LD_LIBRARY_PATH` (where a GPU's libraries may be).
    pub fn system() -> Policy {
        let mut read: Vec<PathBuf> = SYSTEM_READ.iter().map(PathBuf::from).collect();
        if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
            read.extend(std::env::split_paths(&paths).filter(|p| p.is_absolute()));
        }
        Policy {
            read,
            devices: SYSTEM_DEVICES.iter().map(PathBuf::from).collect(),
            ..Policy::default()
        }
    }

    /// The NVIDIA device nodes (`/dev/nvidia*`), which a CUDA worker opens read-write.
    pub fn nvidia_devices() -> Vec<PathBuf> {
        let mut nodes: Vec<PathBuf> = std::fs::read_dir("/dev")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("nvidia"))
            .map(|e| e.path())
            .collect();
        nodes.sort();
        nodes
    }

    /// The read rules after carving out [`Policy::protect`]: each `read` hierarchy, or, where a
    /// protected path lies inside one, its other children (recursively), never one that is,
    /// lies inside or leads (as a symlink) into a protected path.
    pub fn read_grants(&self) -> Vec<PathBuf> {
        let protect: Vec<PathBuf> = self
            .protect
            .iter()
            .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
            .collect();
        let mut out = Vec::new();
        for root in &self.read {
            carve(root, &protect, &mut out, 0);
        }
        out.sort();
        out.dedup();
        out
    }
}

/// Adds `path` to `out`, or, when a protected path lies inside it, its children minus the
/// protected ones. Paths are resolved first, so a symlink is judged by where it leads.
fn carve(path: &Path, protect: &[PathBuf], out: &mut Vec<PathBuf>, depth: usize) {
    let Ok(real) = path.canonicalize() else {
        return;
    };
    if protect.iter().any(|p| real.starts_with(p)) {
        return;
    }
    if !protect.iter().any(|p| p.starts_with(&real)) {
        out.push(real);
        return;
    }
    if depth > 32 {
        return;
    }
    for entry in std::fs::read_dir(&real).into_iter().flatten().flatten() {
        carve(&entry.path(), protect, out, depth + 1);
    }
}

/// The Landlock rights on `path` for `wanted`, restricted to what applies to a file when it is
/// not a directory (the kernel refuses directory rights on a file).
fn rights_for(path: &Path, wanted: landlock::BitFlags<AccessFs>) -> landlock::BitFlags<AccessFs> {
    if path.is_dir() {
        wanted
    } else {
        wanted & AccessFs::from_file(ABI::V3)
    }
}

/// Applies `policy` with Landlock to the calling thread and the processes it starts. Handles
/// every file right of ABI 3, TCP (ABI 4) and the signal and abstract-socket scopes (ABI 6),
/// each as far as the kernel supports it. Returns the kernel's enforcement status.
pub fn landlock(policy: &Policy) -> Result<RulesetStatus, SandboxError> {
    let err = |e: &dyn std::fmt::Display| SandboxError::Landlock(e.to_string());
    let all = AccessFs::from_all(ABI::V3);
    let read = AccessFs::from_read(ABI::V3);
    let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
    let mut ruleset = Ruleset::default()
        .handle_access(all)
        .map_err(|e| err(&e))?
        .handle_access(AccessNet::from_all(ABI::V4))
        .map_err(|e| err(&e))?
        .scope(Scope::from_all(ABI::V6))
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?;
    let mut rules: Vec<(PathBuf, landlock::BitFlags<AccessFs>)> = Vec::new();
    for path in policy.read_grants() {
        rules.push((path, read));
    }
    for path in &policy.write {
        rules.push((path.clone(), all));
    }
    for path in &policy.devices {
        rules.push((path.clone(), device));
    }
    for path in &policy.exact {
        rules.push((path.clone(), AccessFs::ReadFile.into()));
    }
    for (path, wanted) in rules {
        // A missing path grants nothing; that is not an error.
        let Ok(fd) = PathFd::new(&path) else { continue };
        let rights = rights_for(&path, wanted);
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, rights))
            .map_err(|e| SandboxError::Landlock(format!("rule for {}: {e}", path.display())))?;
    }
    let status = ruleset.restrict_self().map_err(|e| err(&e))?;
    Ok(status.ruleset)
}

/// Drops every capability: the bounding set (where this process may), then the effective,
/// permitted, inheritable and ambient sets. A worker started as root keeps uid 0 but none of
/// its privileges (no reading files it does not own, no tracing, no clock changes).
pub fn drop_capabilities() -> Result<(), SandboxError> {
    // SAFETY: plain prctl/capset calls on this process with valid arguments.
    unsafe {
        let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
            .unwrap_or(40);
        for cap in 0..=last {
            // Fails without CAP_SETPCAP (an unprivileged user): then the bounding set cannot
            // matter, since no_new_privs keeps exec from granting anything.
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let header = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
            return Err(SandboxError::Capabilities(std::io::Error::last_os_error()));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(SandboxError::Capabilities(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn arch() -> Result<seccompiler::TargetArch, SandboxError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| SandboxError::Seccomp(format!("{e:?}")))
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| SandboxError::Seccomp(format!("{e:?}")))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conditions).map_err(|e| SandboxError::Seccomp(format!("{e:?}")))
}

/// A filter that answers `errno` to every call in `deny` whose rules match (an empty rule list
/// matches every call) and lets everything else through.
fn deny_filter(deny: Vec<(i64, Vec<SeccompRule>)>, errno: i32) -> Result<BpfProgram, SandboxError> {
    let mut rules = std::collections::BTreeMap::new();
    for (nr, r) in deny {
        rules.entry(nr).or_insert_with(Vec::new).extend(r);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch()?,
    )
    .map_err(|e| SandboxError::Seccomp(format!("{e:?}")))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(format!("{e:?}")))
}

/// Calls no confined process needs, denied outright: tracing and the memory of other
/// processes, descriptors of other processes, kernel stores that outlive a process (SysV IPC,
/// POSIX message queues, key rings), io_uring (its operations bypass seccomp), BPF and perf
/// events, new namespaces and mounts, changes to the system's clocks, and secret memory
/// (`memfd_secret`: a file that keeps what it was written after it is unmapped, with one link
/// and no blocks, so neither the resident set nor the count of a worker's files sees it).
fn always_denied() -> Vec<i64> {
    vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_process_madvise,
        libc::SYS_pidfd_getfd,
        libc::SYS_kcmp,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_shmget,
        libc::SYS_shmat,
        libc::SYS_shmctl,
        libc::SYS_msgget,
        libc::SYS_msgsnd,
        libc::SYS_msgrcv,
        libc::SYS_msgctl,
        libc::SYS_semget,
        libc::SYS_semop,
        libc::SYS_semtimedop,
        libc::SYS_semctl,
        libc::SYS_mq_open,
        libc::SYS_mq_unlink,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_memfd_secret,
        libc::SYS_io_uring_register,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_adjtimex,
        libc::SYS_clock_adjtime,
        libc::SYS_clock_settime,
        libc::SYS_settimeofday,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
    ]
}

/// Calls whose first argument names a process, allowed only on the caller itself (`0`, or
/// `pid` where given): scheduling, CPU affinity, priorities and resource limits of other
/// processes (the other side of a comparison) are out of reach.
fn own_process_only(pid: Option<u32>) -> Result<Vec<(i64, Vec<SeccompRule>)>, SandboxError> {
    let mut out = Vec::new();
    for nr in [
        libc::SYS_sched_setaffinity,
        libc::SYS_sched_setscheduler,
        libc::SYS_sched_setparam,
        libc::SYS_sched_setattr,
        libc::SYS_prlimit64,
        libc::SYS_migrate_pages,
        libc::SYS_move_pages,
        libc::SYS_get_robust_list,
    ] {
        let mut conditions = vec![cond(0, SeccompCmpOp::Ne, 0)?];
        if let Some(pid) = pid {
            conditions.push(cond(0, SeccompCmpOp::Ne, pid as u64)?);
        }
        out.push((nr, vec![rule(conditions)?]));
    }
    // setpriority(which, who, prio) and ioprio_set(which, who, prio): only one's own process.
    for (nr, own_kind) in [
        (libc::SYS_setpriority, libc::PRIO_PROCESS as u64),
        (libc::SYS_ioprio_set, 1 /* IOPRIO_WHO_PROCESS */),
    ] {
        let mut other_who = vec![cond(1, SeccompCmpOp::Ne, 0)?];
        if let Some(pid) = pid {
            other_who.push(cond(1, SeccompCmpOp::Ne, pid as u64)?);
        }
        out.push((
            nr,
            vec![
                rule(vec![cond(0, SeccompCmpOp::Ne, own_kind)?])?,
                rule(other_who)?,
            ],
        ));
    }
    Ok(out)
}

/// What a worker's filters hold it to beyond the defaults ([`worker_filters`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerLimits {
    /// Held to the CPUs it was pinned to ([`pin_to_cpus`]).
    pub pinned: bool,
    /// A CPU worker (not a CUDA one): its peak memory is read from its resident high-water
    /// mark, so it may not drop resident pages; and it may not make unix socket pairs, whose
    /// buffers are in no resident set. A CUDA worker is sampled instead (the supervisor's
    /// `outside` module counts what its sockets queue), and the driver's own use of madvise is
    /// not ours to refuse; but it may make stream and sequenced-packet pairs only: a datagram
    /// socket shows only its first queued datagram, so what a closed sender left queued could
    /// not be counted.
    /// No worker can send a descriptor over a pair (`sendmsg` is refused: [`worker_filters`]).
    pub cpu: bool,
}

/// `madvise` advice that takes pages out of a process's resident set while their contents stay
/// in memory (a file mapping's pages stay in the page cache, and the next read maps them back,
/// a whole large folio at a time). The model is the host's read-only mapping: a variant that
/// released its pages behind every matmul would read 90 MB of weights a token and show a
/// fraction of them in its peak memory, and could spend the difference on memory of its own
/// without the peak-memory guard seeing it (the drift fixture's `release` mode). Denied, the
/// model's pages count for every variant that reads them. Freeing memory never lowers a
/// high-water mark, so honest code loses nothing (the C library ignores a refused trim).
pub const RESIDENCY_DROPPING_ADVICE: [i32; 3] = [
    libc::MADV_DONTNEED,
    21, /* MADV_PAGEOUT */
    24, /* MADV_DONTNEED_LOCKED */
];

/// The seccomp filters of a worker, for the process `pid`: [`always_denied`], other
/// processes' scheduling ([`own_process_only`]), signals to anything but itself, new
/// processes and programs (threads only: a frozen worker must have no process that keeps
/// running), and the network and other processes' sockets ([`no_sockets`]). `clone3` answers
/// ENOSYS, so that the C library falls back to `clone`, whose flags a filter can read.
///
/// With [`WorkerLimits`]: a worker `pinned` to a CPU budget ([`pin_to_cpus`]) may not change
/// any thread's affinity at all, its own included: every thread it starts inherits the budget
/// and keeps it. A `cpu` worker may not drop resident pages with `madvise`
/// ([`RESIDENCY_DROPPING_ADVICE`]) nor call `socketpair`; a CUDA worker may make stream and
/// sequenced-packet socket pairs only (not datagram ones, nor `SOCK_RAW`, which a unix socket
/// takes as a datagram).
pub fn worker_filters(pid: u32, limits: WorkerLimits) -> Result<Vec<BpfProgram>, SandboxError> {
    let mut deny: Vec<(i64, Vec<SeccompRule>)> =
        always_denied().into_iter().map(|nr| (nr, vec![])).collect();
    deny.extend(own_process_only(Some(pid))?);
    if limits.cpu {
        let advice = RESIDENCY_DROPPING_ADVICE
            .iter()
            .map(|&a| rule(vec![cond(2, SeccompCmpOp::Eq, a as u64)?]))
            .collect::<Result<Vec<_>, _>>()?;
        deny.push((libc::SYS_madvise, advice));
    }
    for nr in [
        libc::SYS_kill,
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
    ] {
        deny.push((
            nr,
            vec![rule(vec![cond(0, SeccompCmpOp::Ne, pid as u64)?])?],
        ));
    }
    for nr in [
        libc::SYS_tkill,
        libc::SYS_pidfd_open,
        libc::SYS_pidfd_send_signal,
        libc::SYS_execve,
        libc::SYS_execveat,
    ] {
        deny.push((nr, vec![]));
    }
    let refused = no_sockets(&mut deny)?;
    if limits.cpu {
        deny.push((libc::SYS_socketpair, vec![]));
    } else {
        // socketpair(domain, type, ...): every type but a stream's and a sequenced-packet's,
        // the type without its CLOEXEC and NONBLOCK flags. A list of what may pass, not of what
        // may not: a unix SOCK_RAW pair is a datagram pair by another name.
        let others = (0..=SOCKET_TYPE_MASK)
            .filter(|&t| t != libc::SOCK_STREAM as u64 && t != libc::SOCK_SEQPACKET as u64)
            .map(|t| rule(vec![cond(1, SeccompCmpOp::MaskedEq(SOCKET_TYPE_MASK), t)?]))
            .collect::<Result<Vec<_>, _>>()?;
        deny.push((libc::SYS_socketpair, others));
    }
    #[cfg(target_arch = "x86_64")]
    for nr in [libc::SYS_fork, libc::SYS_vfork] {
        deny.push((nr, vec![]));
    }
    // clone(flags, ...): a thread (CLONE_THREAD) only.
    deny.push((
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            0,
        )?])?],
    ));
    let mut filters = vec![
        deny_filter(deny, libc::EPERM)?,
        deny_filter(vec![(libc::SYS_clone3, vec![])], libc::ENOSYS)?,
        refused,
    ];
    if limits.pinned {
        filters.push(deny_filter(
            vec![(libc::SYS_sched_setaffinity, vec![])],
            libc::EPERM,
        )?);
    }
    Ok(filters)
}

/// The bits of `socket`'s and `socketpair`'s type argument that name the type (the kernel's
/// `SOCK_TYPE_MASK`); the rest are flags (`SOCK_CLOEXEC`, `SOCK_NONBLOCK`).
const SOCKET_TYPE_MASK: u64 = 0xf;

/// The network and other processes' sockets, out of reach: `deny` (an EPERM filter's rules)
/// gains the rule that only local (unix) sockets can be made, and the filter returned answers
/// every `connect`, addressed `sendto`, `sendmsg` and `sendmmsg` with ENOENT, as if no one
/// listened there (the CUDA driver tries the MPS daemon's address at start-up; told there is
/// none, it carries on). A unix socket's path is not a file Landlock guards, so without this a
/// confined process could ask any daemon listening on the machine to act for it. With
/// `sendmsg` refused, no descriptor travels over a socket either (`SCM_RIGHTS`), so none can
/// be kept in flight, out of every process's descriptors, where no count of memory sees it.
fn no_sockets(deny: &mut Vec<(i64, Vec<SeccompRule>)>) -> Result<BpfProgram, SandboxError> {
    deny.push((
        libc::SYS_socket,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::Ne,
            libc::AF_UNIX as u64,
        )?])?],
    ));
    let addressed = SeccompCondition::new(4, SeccompCmpArgLen::Qword, SeccompCmpOp::Ne, 0)
        .map_err(|e| SandboxError::Seccomp(format!("{e:?}")))?;
    let refused = vec![
        (libc::SYS_connect, vec![]),
        (libc::SYS_sendto, vec![rule(vec![addressed])?]),
        (libc::SYS_sendmsg, vec![]),
        (libc::SYS_sendmmsg, vec![]),
    ];
    deny_filter(refused, libc::ENOENT)
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Result<Vec<usize>, SandboxError> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a valid, writable cpu_set_t of `size` bytes; pid 0 is this thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return Err(SandboxError::Setup(format!(
            "cannot read this process's CPU affinity: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, inside the set.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Restricts this process's one thread, and every thread it starts from now on, to the first
/// `n` of the CPUs it may run on; returns them. This is how a worker is held to a thread
/// count: with seccomp's ban on `sched_setaffinity` ([`worker_filters`] with `pinned`), a
/// variant that starts more threads than it was asked for only shares the same `n` CPUs.
/// Call it while the process has one thread (affinity is per thread, inherited at creation).
pub fn pin_to_cpus(n: usize) -> Result<Vec<usize>, SandboxError> {
    let allowed = allowed_cpus()?;
    if n == 0 || n > allowed.len() {
        return Err(SandboxError::Setup(format!(
            "cannot compute with {n} thread(s): this process may run on {} CPU(s) ({allowed:?})",
            allowed.len()
        )));
    }
    if thread_count() != 1 {
        return Err(SandboxError::Setup(format!(
            "the worker has {} threads before pinning; it must have one",
            thread_count()
        )));
    }
    let chosen = allowed[..n].to_vec();
    // SAFETY: as in `allowed_cpus`; CPU_SET is given CPUs below CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in &chosen {
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size given; pid 0 is this (only) thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(SandboxError::Setup(format!(
            "cannot pin the worker to CPUs {chosen:?}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(chosen)
}

/// The seccomp filter of a build: [`always_denied`], other processes' scheduling, and leaving
/// the build's process group (`setsid`, `setpgid`), so that killing the group after cargo
/// exits ends every process a build script started.
pub fn build_filters() -> Result<Vec<BpfProgram>, SandboxError> {
    Ok(vec![deny_filter(build_denials()?, libc::EPERM)?])
}

/// The rules of [`build_filters`].
fn build_denials() -> Result<Vec<(i64, Vec<SeccompRule>)>, SandboxError> {
    let mut deny: Vec<(i64, Vec<SeccompRule>)> =
        always_denied().into_iter().map(|nr| (nr, vec![])).collect();
    deny.extend(own_process_only(None)?);
    for nr in [
        libc::SYS_setsid,
        libc::SYS_setpgid,
        libc::SYS_pidfd_send_signal,
    ] {
        deny.push((nr, vec![]));
    }
    Ok(deny)
}

/// The seccomp filters of variant code run outside a worker (`host confine --variant-run`: a
/// GPU screen's test binary): a build's ([`build_filters`]), no network or other process's
/// socket ([`no_sockets`]), as for a worker, and no parent-death signal but SIGKILL, so that
/// the binary cannot undo the tie [`run_in_pid_namespace`] gives it to its supervisor.
pub fn run_filters() -> Result<Vec<BpfProgram>, SandboxError> {
    let mut deny = build_denials()?;
    deny.push((
        libc::SYS_prctl,
        vec![rule(vec![
            cond(0, SeccompCmpOp::Eq, libc::PR_SET_PDEATHSIG as u64)?,
            cond(1, SeccompCmpOp::Ne, libc::SIGKILL as u64)?,
        ])?],
    ));
    let refused = no_sockets(&mut deny)?;
    Ok(vec![deny_filter(deny, libc::EPERM)?, refused])
}

/// Installs `filters` on every thread of this process (and what it starts afterwards).
pub fn seccomp(filters: &[BpfProgram]) -> Result<(), SandboxError> {
    for filter in filters {
        seccompiler::apply_filter_all_threads(filter)
            .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    }
    Ok(())
}

/// Closes every descriptor from 3 up except `keep`: a worker starts with what its parent left
/// open (a terminal's, a build tool's), and must hold only what the host gave it.
pub fn close_inherited_descriptors(keep: &[i32]) -> Result<(), SandboxError> {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| SandboxError::Setup(format!("cannot list /proc/self/fd: {e}")))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing a descriptor this process owns and no Rust object wraps (the
            // directory listing's own descriptor is closed already, or fails harmlessly).
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// The number of threads of this process (Landlock confines the calling thread and what it
/// starts, so a worker confines itself while it has one thread).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Confines a worker about to open a variant's library: capabilities, Landlock with `policy`,
/// then the worker's seccomp filters. Fails (and the worker must not open the library) when
/// the kernel supports a mechanism and applying it fails.
///
/// `limits`: what the filters hold it to beyond the defaults ([`WorkerLimits`]).
pub fn confine_worker(
    policy: &Policy,
    support: Support,
    limits: WorkerLimits,
) -> Result<(), SandboxError> {
    if thread_count() != 1 {
        return Err(SandboxError::Setup(format!(
            "the worker has {} threads before confinement; it must have one",
            thread_count()
        )));
    }
    confine(policy, support, || {
        worker_filters(std::process::id(), limits)
    })
}

/// Confines a build helper before it runs cargo: no capabilities, Landlock with `policy` and
/// the build's seccomp filter.
pub fn confine_build(policy: &Policy, support: Support) -> Result<(), SandboxError> {
    confine(policy, support, build_filters)
}

/// Drops the capabilities, applies Landlock with `policy` and installs the seccomp `filters`,
/// each mechanism the kernel offers; one that it offers but enforces nothing of is an error.
fn confine(
    policy: &Policy,
    support: Support,
    filters: impl FnOnce() -> Result<Vec<BpfProgram>, SandboxError>,
) -> Result<(), SandboxError> {
    drop_capabilities()?;
    if support.landlock_abi > 0 && landlock(policy)? == RulesetStatus::NotEnforced {
        return Err(SandboxError::Landlock(
            "the kernel reports Landlock but enforced nothing".into(),
        ));
    }
    if support.seccomp {
        seccomp(&filters()?)?;
    }
    Ok(())
}

/// This very program, to start confined children from (`host worker`, `host confine`):
/// /proc/self/exe stays this binary even after a rebuild has replaced the file on disk (a run
/// takes minutes, and the oracle's worker starts at its end).
pub fn this_program() -> std::io::Result<PathBuf> {
    let proc_exe = Path::new("/proc/self/exe");
    if proc_exe.exists() {
        Ok(proc_exe.to_path_buf())
    } else {
        std::env::current_exe()
    }
}

/// What cargo needs to read to build: cargo's and rustup's homes (`CARGO_HOME`, `RUSTUP_HOME`,
/// or their defaults under `HOME`), and the toolchain the cargo binary on `PATH` (or `CARGO`)
/// really lives in (its lib/ holds rustc's libraries).
pub fn toolchain_paths() -> Vec<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut paths = Vec::new();
    for (var, default) in [("CARGO_HOME", ".cargo"), ("RUSTUP_HOME", ".rustup")] {
        match std::env::var_os(var) {
            Some(dir) => paths.push(PathBuf::from(dir)),
            None => paths.extend(home.as_ref().map(|h| h.join(default))),
        }
    }
    let cargo_bin = std::env::var_os("CARGO").map(PathBuf::from).or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|dir| dir.join("cargo"))
            .find(|p| p.is_file())
    });
    if let Some(real) = cargo_bin.and_then(|p| p.canonicalize().ok()) {
        paths.extend(real.parent().and_then(Path::parent).map(Path::to_path_buf));
    }
    paths
}

/// The hidden `host confine` command line: a [`Policy`] and the program to run under it.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfineArgs {
    /// A hierarchy to read (and execute from).
    #[arg(long)]
    pub read: Vec<PathBuf>,
    /// A hierarchy to write.
    #[arg(long)]
    pub write: Vec<PathBuf>,
    /// A device file to open for reading and writing.
    #[arg(long)]
    pub device: Vec<PathBuf>,
    /// A variant's build run from a script (tools/confined-cargo.sh): also read the Rust
    /// toolchain ([`toolchain_paths`]), as the host's own confined builds do, and refuse to run
    /// at all where the kernel cannot confine files (no Landlock, or an ABI before 3).
    #[arg(long)]
    pub variant_build: bool,
    /// Variant code run outside a worker (a GPU screen's test binary, tools/gpu-probe.sh's
    /// run.sh): refuse to run at all where the kernel cannot confine files, as for a build,
    /// read no toolchain, and reach no socket ([`run_filters`]).
    #[arg(long, conflicts_with = "variant_build")]
    pub variant_run: bool,
    /// With --variant-run, run the program in this PID namespace, not a new one of its own:
    /// for a machine where none can be made, by the operator's choice (run.sh's
    /// SCREEN_SHARED_PID_NAMESPACE=1), never the program's. A SIGKILL of the script that
    /// started it then leaves whatever the program started running.
    #[arg(long, requires = "variant_run")]
    pub shared_pid_namespace: bool,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<std::ffi::OsString>,
}

/// Confines this process as a build ([`confine_build`]) with the system's part of a policy
/// ([`Policy::system`]) and `args`' paths, and replaces it with the program. With
/// `--variant-run` the program runs confined by [`run_filters`] as the first process of a PID
/// namespace of its own, under this process as its supervisor ([`run_in_pid_namespace`]), or
/// with `--shared-pid-namespace` confined so in this process's place.
pub fn confine_and_exec(args: &ConfineArgs) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let mut policy = Policy::system();
    policy.read.extend(args.read.iter().cloned());
    policy.write.extend(args.write.iter().cloned());
    policy.devices.extend(args.device.iter().cloned());
    let support = Support::probe();
    if (args.variant_build || args.variant_run) && support.landlock_abi < FILES_ABI {
        let (flag, what) = if args.variant_build {
            ("--variant-build", "built")
        } else {
            ("--variant-run", "run")
        };
        anyhow::bail!(
            "host confine {flag}: this kernel's Landlock ABI is {} (3 or later is needed to \
             confine variant code's files), so variant code is not {what} here",
            support.landlock_abi
        );
    }
    if args.variant_build {
        policy.read.extend(toolchain_paths());
    }
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("host confine: no program to run"))?;
    if !args.variant_run {
        confine_build(&policy, support)?;
    } else if args.shared_pid_namespace {
        confine(&policy, support, run_filters)?;
    } else {
        return run_in_pid_namespace(&policy, support, program, rest);
    }
    let err = std::process::Command::new(program).args(rest).exec();
    Err(anyhow::anyhow!(
        "host confine: cannot run {}: {err}",
        program.to_string_lossy()
    ))
}

/// Runs `program` confined ([`run_filters`]) as the first process of a PID namespace of its
/// own, and exits with its status. This process stays outside as its supervisor, so that
/// nothing the program starts can outlive the script that started `host confine` (a GPU
/// screen's run.sh), even when that script is killed with SIGKILL and cannot kill the group
/// itself:
/// - the supervisor gets SIGKILL when its parent (the script) dies (`PR_SET_PDEATHSIG`);
/// - the program gets SIGKILL when the supervisor dies, and seccomp keeps it from choosing any
///   other parent-death signal (a signal from the ancestor namespace reaches a namespace's
///   first process even where it ignores signals);
/// - when a namespace's first process dies, the kernel kills every other process in it, and
///   no process there may leave its namespace (`unshare`, `setns`) or its process group.
///
/// The namespace needs CAP_SYS_ADMIN (root, as on the GPU machine) or, failing that, a user
/// namespace of one's own, which maps only one's own user and group. Where neither can be
/// made, variant code is not run at all.
fn run_in_pid_namespace(
    policy: &Policy,
    support: Support,
    program: &std::ffi::OsStr,
    rest: &[std::ffi::OsString],
) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::process::CommandExt;
    // SAFETY: getppid and prctl(PR_SET_PDEATHSIG) act on this process only.
    let parent = unsafe { libc::getppid() };
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        anyhow::bail!(
            "host confine --variant-run: cannot tie itself to its parent: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: as above.
    if unsafe { libc::getppid() } != parent {
        anyhow::bail!("host confine --variant-run: the process that started it is gone");
    }
    let threads = thread_count();
    if threads != 1 {
        anyhow::bail!(
            "host confine --variant-run: {threads} threads before the namespace is made; it \
             needs one"
        );
    }
    new_pid_namespace().context(
        "host confine --variant-run: variant code is not run where its processes cannot be \
         held in a PID namespace of their own (SCREEN_SHARED_PID_NAMESPACE=1 for run.sh runs \
         it without one: then a SIGKILL of run.sh leaves what it started running)",
    )?;
    // SAFETY: this process has one thread (checked above), so the child starts with no lock
    // held by a thread that does not exist in it, and may allocate before it runs the program.
    match unsafe { libc::fork() } {
        -1 => anyhow::bail!(
            "host confine --variant-run: cannot start the program: {}",
            std::io::Error::last_os_error()
        ),
        0 => {
            // The namespace's first process. A supervisor killed between the fork and the
            // prctl would leave it untied; only the script's own death (which no confined
            // process can cause) kills the supervisor, so that window is not the variant's.
            // SAFETY: prctl on this process.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
            // Confined here, not before the fork, and after /proc is this namespace's own:
            // Landlock's rules are opened now, so /proc/self/task (the CUDA driver names its
            // threads there, by their ids in this namespace) is this process's.
            let err = match own_proc().and_then(|()| confine(policy, support, run_filters)) {
                Ok(()) => {
                    let e = std::process::Command::new(program).args(rest).exec();
                    format!("cannot run {}: {e}", program.to_string_lossy())
                }
                Err(e) => format!(
                    "cannot confine {}: {e} (SCREEN_SHARED_PID_NAMESPACE=1 for run.sh runs it \
                     in run.sh's namespace)",
                    program.to_string_lossy()
                ),
            };
            eprintln!("host confine --variant-run: {err}");
            // SAFETY: ends this child without running the parent's exit handlers twice.
            unsafe { libc::_exit(127) }
        }
        child => {
            let mut status = 0;
            loop {
                // SAFETY: waits for this process's own child; `status` is a valid int.
                if unsafe { libc::waitpid(child, &mut status, 0) } == child {
                    break;
                }
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    anyhow::bail!("host confine --variant-run: cannot wait for the program: {err}");
                }
            }
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            std::process::exit(code)
        }
    }
}

/// Mounts a /proc of this process's PID namespace over the one it sees, in a mount namespace
/// of its own (changes there reach no other process). Without it, /proc is the parent
/// namespace's: a thread's id in this namespace (`gettid`, which the C library uses to name a
/// thread under /proc/self/task) names no entry there, or another process's. Confinement
/// afterwards denies `mount` and `umount2`, so the old /proc cannot be uncovered.
fn own_proc() -> Result<(), SandboxError> {
    let setup = |what: &str| {
        SandboxError::Setup(format!(
            "cannot {what}: {}",
            std::io::Error::last_os_error()
        ))
    };
    // SAFETY: unshare with a namespace flag changes only this process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(setup("make a mount namespace"));
    }
    // SAFETY: mount with valid NUL-terminated strings (or null where the call takes none).
    unsafe {
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(setup("make the mounts private to this namespace"));
        }
        if libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            return Err(setup("mount this PID namespace's /proc"));
        }
    }
    Ok(())
}

/// Moves this process's next children into a new PID namespace: directly with CAP_SYS_ADMIN,
/// else inside a new user namespace that maps only this process's user and group to
/// themselves (files keep their owners as seen from inside).
fn new_pid_namespace() -> Result<(), SandboxError> {
    // SAFETY: unshare with namespace flags only changes this process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } == 0 {
        return Ok(());
    }
    let direct = std::io::Error::last_os_error();
    // SAFETY: as above; getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWPID) } != 0 {
        return Err(SandboxError::Setup(format!(
            "cannot make a PID namespace ({direct}) nor one inside a user namespace ({})",
            std::io::Error::last_os_error()
        )));
    }
    for (file, text) in [
        ("setgroups", "deny".to_string()),
        ("uid_map", format!("{uid} {uid} 1")),
        ("gid_map", format!("{gid} {gid} 1")),
    ] {
        std::fs::write(format!("/proc/self/{file}"), &text).map_err(|e| {
            SandboxError::Setup(format!("cannot write /proc/self/{file} ({text}): {e}"))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_combine_to_the_weaker_one() {
        let partial = Level::Partial(vec!["a".into()]);
        assert_eq!(Level::Full.and(Level::Full), Level::Full);
        assert_eq!(Level::Full.and(partial.clone()), partial);
        assert_eq!(
            partial
                .clone()
                .and(Level::Partial(vec!["b".into(), "a".into()])),
            Level::Partial(vec!["a".into(), "b".into()])
        );
        assert!(matches!(
            partial.and(Level::None("x".into())),
            Level::None(_)
        ));
        assert_eq!(Level::Full.label(), "full");
        assert_eq!(Level::Partial(vec!["no x".into()]).label(), "partial: no x");
    }

    #[test]
    fn levels_follow_the_kernel() {
        let full = Support {
            landlock_abi: 7,
            seccomp: true,
        };
        assert_eq!(full.worker_level(), Level::Full);
        assert_eq!(full.build_level(), Level::Full);
        let old = Support {
            landlock_abi: 4,
            seccomp: true,
        };
        assert_eq!(old.worker_level(), Level::Full, "seccomp covers signals");
        assert!(
            old.build_level().label().contains("signal"),
            "{:?}",
            old.build_level()
        );
        let none = Support {
            landlock_abi: 0,
            seccomp: false,
        };
        assert!(matches!(none.worker_level(), Level::None(_)));
        assert!(matches!(none.build_level(), Level::None(_)));
    }

    #[test]
    fn protected_paths_are_carved_out_of_read_grants() {
        let dir = std::env::temp_dir().join(format!("autoinfer-carve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["a/keep", "a/secret/deep", "b"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("a/file"), "x").unwrap();
        // A symlink beside the secret that leads into it must not be granted either.
        std::os::unix::fs::symlink(dir.join("a/secret"), dir.join("a/link")).unwrap();
        // A hierarchy inside a protected path (an LD_LIBRARY_PATH entry in the target
        // directory) is not granted, and neither is the protected path itself.
        let policy = Policy {
            read: vec![
                dir.join("a"),
                dir.join("b"),
                dir.join("a/secret/deep"),
                dir.join("a/secret"),
            ],
            protect: vec![dir.join("a/secret")],
            ..Policy::default()
        };
        let real = dir.canonicalize().unwrap();
        let grants = policy.read_grants();
        assert_eq!(
            grants,
            vec![real.join("a/file"), real.join("a/keep"), real.join("b")],
            "{grants:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_budget_larger_than_the_machine_is_named() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        let err = pin_to_cpus(cpus.len() + 1).unwrap_err().to_string();
        assert!(
            err.contains(&format!("cannot compute with {} thread(s)", cpus.len() + 1)),
            "{err}"
        );
        assert!(pin_to_cpus(0).is_err());
    }

    /// What a worker's filters answer to its socket pairs, from a forked child that installs
    /// them: 0 when every call got the answer `expected` names, else the number of the first
    /// call that did not.
    fn socket_pair_answers(limits: WorkerLimits, expected: [i32; 5]) -> i32 {
        let filters = worker_filters(std::process::id(), limits).unwrap();
        // SAFETY: the child makes only system calls (the filters were built before the fork,
        // so nothing allocates there) and leaves by _exit.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
        if child == 0 {
            let answer = |result: libc::c_long| {
                if result >= 0 {
                    0
                } else {
                    // SAFETY: errno is this thread's, written by the call just made.
                    unsafe { *libc::__errno_location() }
                }
            };
            let mut code = 0;
            let mut check = |n: i32, got: i32| {
                if code == 0 && got != expected[n as usize - 1] {
                    code = n;
                }
            };
            for filter in &filters {
                // SAFETY (both): a seccomp filter on this (single-threaded) child alone; on
                // failure the child leaves without running the parent's exit handlers.
                if seccompiler::apply_filter(filter).is_err() {
                    unsafe { libc::_exit(100) };
                }
            }
            let mut pair = [-1i32; 2];
            let make = |kind: i32, pair: &mut [i32; 2]| {
                // SAFETY: `pair` has room for the two descriptors socketpair writes.
                answer(unsafe {
                    libc::socketpair(
                        libc::AF_UNIX,
                        kind | libc::SOCK_CLOEXEC,
                        0,
                        pair.as_mut_ptr(),
                    )
                } as libc::c_long)
            };
            check(1, make(libc::SOCK_DGRAM, &mut pair));
            check(2, make(libc::SOCK_RAW, &mut pair));
            check(3, make(libc::SOCK_SEQPACKET, &mut pair));
            check(4, make(libc::SOCK_STREAM, &mut pair));
            // A descriptor (stdin's) in an SCM_RIGHTS message over the stream pair.
            let mut byte = [0u8; 1];
            let mut iov = libc::iovec {
                iov_base: byte.as_mut_ptr().cast(),
                iov_len: 1,
            };
            let mut control = [0u64; 4];
            // SAFETY: msghdr and cmsghdr are plain data; the control buffer (32 bytes, 8-byte
            // aligned) holds one cmsghdr with one descriptor (CMSG_SPACE(4) = 24).
            let sent = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
                let header = libc::CMSG_FIRSTHDR(&msg);
                (*header).cmsg_level = libc::SOL_SOCKET;
                (*header).cmsg_type = libc::SCM_RIGHTS;
                (*header).cmsg_len = libc::CMSG_LEN(4) as usize;
                *(libc::CMSG_DATA(header) as *mut i32) = 0;
                libc::sendmsg(pair[0], &msg, 0)
            };
            check(
                5,
                if pair[0] < 0 {
                    -1
                } else {
                    answer(sent as libc::c_long)
                },
            );
            // SAFETY: leaving the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for the child forked above.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(
            libc::WIFEXITED(status),
            "the child ended by signal: {status}"
        );
        libc::WEXITSTATUS(status)
    }

    /// A CUDA worker may make a stream or sequenced pair (the supervisor counts everything
    /// they queue) but no datagram pair, under either name, and sends no descriptor over it; a
    /// CPU worker makes no pair at all.
    #[test]
    fn a_worker_sends_no_descriptor_and_a_cuda_worker_makes_no_datagram_pair() {
        // The attack the list of allowed types closes: unfiltered, a unix SOCK_RAW pair is
        // made, and it is a datagram pair.
        let mut raw = [-1i32; 2];
        // SAFETY: `raw` has room for the two descriptors socketpair writes.
        let made = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_RAW, 0, raw.as_mut_ptr()) };
        assert_eq!(made, 0, "{}", std::io::Error::last_os_error());
        let (mut kind, mut len): (libc::c_int, libc::socklen_t) = (0, 4);
        // SAFETY: SO_TYPE writes one int into `kind`, whose size `len` gives; then the two
        // descriptors of this test's own are closed.
        unsafe {
            libc::getsockopt(
                raw[0],
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut kind as *mut libc::c_int).cast(),
                &mut len,
            );
            libc::close(raw[0]);
            libc::close(raw[1]);
        }
        assert_eq!(kind, libc::SOCK_DGRAM, "a unix SOCK_RAW pair's type");
        let gpu = WorkerLimits {
            pinned: false,
            cpu: false,
        };
        let cpu = WorkerLimits {
            pinned: false,
            cpu: true,
        };
        // Answers: datagram pair, raw pair, sequenced pair, stream pair, sendmsg with a
        // descriptor (-1: no pair to send over).
        let gpu_answers = socket_pair_answers(gpu, [libc::EPERM, libc::EPERM, 0, 0, libc::ENOENT]);
        assert_eq!(
            gpu_answers, 0,
            "a CUDA worker's call {gpu_answers} was answered otherwise"
        );
        let cpu_answers = socket_pair_answers(
            cpu,
            [libc::EPERM, libc::EPERM, libc::EPERM, libc::EPERM, -1],
        );
        assert_eq!(
            cpu_answers, 0,
            "a CPU worker's call {cpu_answers} was answered otherwise"
        );
    }

    #[test]
    fn filters_compile_for_this_machine() {
        let limits = |pinned, cpu| WorkerLimits { pinned, cpu };
        assert_eq!(worker_filters(1234, limits(false, false)).unwrap().len(), 3);
        assert_eq!(worker_filters(1234, limits(false, true)).unwrap().len(), 3);
        assert_eq!(worker_filters(1234, limits(true, true)).unwrap().len(), 4);
        assert_eq!(build_filters().unwrap().len(), 1);
    }
}
