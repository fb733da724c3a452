//! Memory a worker holds outside its resident set: [`Outside`].
//!
//! Peak memory is read from a worker's resident set, but a process can keep data the resident
//! set does not show: in files of its scratch directory (their pages sit in the page cache), in
//! a memfd, in a file it unlinked but still holds open or mapped, or in a shared anonymous
//! mapping it unmapped all but a page of (the pages stay with the mapping's object, and
//! `mremap` grows the page back over them). Mapped a window at a time, such a store keeps the
//! resident set small while the variant uses as much memory as it likes: repacked weights at
//! no cost to the peak-memory guard. The worker can create files only in its scratch directory
//! (Landlock), so every such store is a file there, or a file with no name left (`st_nlink`
//! 0), reached through one of the worker's descriptors or mappings. [`Outside::kib`] adds up
//! the blocks those files hold, as seen from outside the worker.
//!
//! The kernel's own buffers are a store too: a pipe holds up to 1 MiB (`F_SETPIPE_SZ`) that
//! is in no process's resident set, and a worker may make as many pipes as it has descriptors.
//! So [`Outside::kib`] also counts the bytes queued in every pipe the worker holds, a named
//! one in its scratch directory included, and the bytes queued in its unix sockets (a socket
//! pair, which only a GPU worker may make).

use std::collections::HashSet;
use std::fs::Metadata;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The most directories [`Outside::kib`] walks in a scratch directory. Honest code makes a
/// few at most (a library's cache); a tree with more cannot be measured, and is an error.
pub const MAX_DIRS: usize = 256;

/// What a worker keeps that cannot be measured from outside it. A reading the host cannot take
/// is an error, never a 0: a worker that hides a store from the host (a directory tree too
/// deep to walk, a pipe it made unreadable with `fchmod`, descriptors it hid with
/// `PR_SET_DUMPABLE`, which stop a host that runs without root's rights) is refused by name.
#[derive(Debug, thiserror::Error)]
pub enum Unmeasurable {
    /// A scratch directory of more than [`MAX_DIRS`] directories, or one that would not open.
    #[error("its scratch directory {dir} cannot be measured for the files it keeps: {why}")]
    Scratch { dir: PathBuf, why: String },
    /// One of the worker's `/proc` entries (its descriptors, a pipe it holds, its mappings)
    /// that the host could not read while the worker was still there.
    #[error("what it holds through {entry} cannot be measured from outside it: {why}")]
    Process { entry: PathBuf, why: String },
}

/// The error for `/proc` entry `entry` that could not be read, or `None` where the reason is
/// that what it named is gone (the worker exited, a thread ended, a descriptor was closed):
/// nothing is kept there any more.
fn unreadable(entry: &Path, e: &std::io::Error) -> Option<Unmeasurable> {
    if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
        return None;
    }
    Some(Unmeasurable::Process {
        entry: entry.to_path_buf(),
        why: e.to_string(),
    })
}

/// What a worker keeps in files, measured from outside it.
#[derive(Debug, Clone)]
pub struct Outside {
    /// The worker's scratch directory, its only writable place: everything in it is the
    /// worker's (the host keeps the library beside it, not in it).
    scratch: PathBuf,
}

impl Outside {
    /// For a worker whose scratch directory is `scratch`.
    pub fn new(scratch: &Path) -> Outside {
        Outside {
            scratch: scratch.to_path_buf(),
        }
    }

    /// KiB that process `pid` holds in files: the files of its scratch directory, and every
    /// regular file with no name left that one of its descriptors or mappings reaches (memfds,
    /// unlinked files, shared anonymous mappings), each file once, by the blocks it has
    /// allocated; and the bytes queued in the pipes and unix sockets it holds, each once. 0 for
    /// a process that keeps nothing so; an error where a store cannot be read ([`Unmeasurable`]).
    pub fn kib(&self, pid: libc::pid_t) -> Result<u64, Unmeasurable> {
        let mut tally = Tally::default();
        let mut bytes = self.scratch_bytes(&mut tally)?;
        bytes += descriptor_bytes(pid, &mut tally)?;
        bytes += mapping_bytes(pid, &mut tally)?;
        Ok(bytes / 1024)
    }

    /// The blocks of every regular file under the scratch directory (links not followed).
    /// Each directory is opened through its parent's descriptor (`/proc/self/fd/N/name`), so
    /// no depth makes a path too long to open. An entry gone between its listing and its
    /// reading (renamed or deleted meanwhile) is skipped: a store kept is seen by another
    /// sample, and peak memory is the most any sample saw.
    fn scratch_bytes(&self, tally: &mut Tally) -> Result<u64, Unmeasurable> {
        let unmeasurable = |why: String| Unmeasurable::Scratch {
            dir: self.scratch.clone(),
            why,
        };
        let mut bytes = 0;
        let top = std::fs::File::open(&self.scratch)
            .map_err(|e| unmeasurable(format!("cannot open it: {e}")))?;
        let (mut pending, mut walked) = (vec![top], 0);
        while let Some(dir) = pending.pop() {
            walked += 1;
            if walked > MAX_DIRS {
                return Err(unmeasurable(format!(
                    "it holds more than {MAX_DIRS} directories"
                )));
            }
            let handle = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
            // One it cannot list (a mode the host may not read past, when it runs without
            // root's rights) would hide what it holds: an error, as one it cannot open.
            let entries = std::fs::read_dir(&handle)
                .map_err(|e| unmeasurable(format!("cannot list a directory: {e}")))?;
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    match std::fs::File::open(handle.join(entry.file_name())) {
                        Ok(child) => pending.push(child),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(unmeasurable(format!("cannot open a directory: {e}")))
                        }
                    }
                } else {
                    bytes += tally.add(&meta);
                }
            }
        }
        Ok(bytes)
    }
}

/// The files one reading has counted, each once.
#[derive(Default)]
struct Tally {
    /// Every regular file seen so far, by (device, inode).
    seen: HashSet<(u64, u64)>,
}

impl Tally {
    /// The bytes a regular file holds, the first time its (device, inode) is seen; else 0.
    fn add(&mut self, meta: &Metadata) -> u64 {
        if !meta.is_file() || !self.seen.insert((meta.dev(), meta.ino())) {
            return 0;
        }
        meta.blocks() * 512
    }
}

/// A file with no name left: only a descriptor or a mapping holds it.
fn nameless(meta: &Metadata) -> bool {
    meta.is_file() && meta.nlink() == 0
}

/// What process `pid` holds through its descriptors, in the table of every thread (a thread
/// made without CLONE_FILES has a table of its own): the nameless files (memfds, unlinked and
/// O_TMPFILE files), by their blocks, and the bytes queued in its pipes ([`pipe_bytes`]) and
/// unix sockets ([`socket_bytes`]), each once. An error where a table it still has cannot be
/// read.
fn descriptor_bytes(pid: libc::pid_t, tally: &mut Tally) -> Result<u64, Unmeasurable> {
    use std::os::unix::fs::FileTypeExt;
    let task_dir = PathBuf::from(format!("/proc/{pid}/task"));
    let tasks = match std::fs::read_dir(&task_dir) {
        Ok(tasks) => tasks,
        Err(e) => return unreadable(&task_dir, &e).map_or(Ok(0), Err),
    };
    // The pipes and sockets counted so far, each once whatever holds it.
    let mut queues = HashSet::new();
    let mut bytes = 0;
    for task in tasks.flatten() {
        // A pidfd of this thread, opened for its first socket only ([`socket_bytes`]).
        let mut pidfd = None;
        let fd_dir = task.path().join("fd");
        let entries = match std::fs::read_dir(&fd_dir) {
            Ok(entries) => entries,
            Err(e) => match unreadable(&fd_dir, &e) {
                Some(e) => return Err(e),
                None => continue,
            },
        };
        for entry in entries.flatten() {
            let meta = match std::fs::metadata(entry.path()) {
                Ok(meta) => meta,
                Err(e) => match unreadable(&entry.path(), &e) {
                    Some(e) => return Err(e),
                    None => continue,
                },
            };
            if nameless(&meta) {
                bytes += tally.add(&meta);
            } else if meta.file_type().is_fifo() && queues.insert((meta.dev(), meta.ino())) {
                bytes += pipe_bytes(&entry.path(), &meta)?;
            } else if meta.file_type().is_socket() && queues.insert((meta.dev(), meta.ino())) {
                let tid = task.file_name().to_str().and_then(|t| t.parse().ok());
                let fd = entry.file_name().to_str().and_then(|n| n.parse().ok());
                if let (Some(tid), Some(fd)) = (tid, fd) {
                    let Some(pidfd) = thread_pidfd(&mut pidfd, tid, &task.path())? else {
                        break; // the thread is gone
                    };
                    bytes += socket_bytes(pidfd, fd, &entry.path(), &meta)?;
                }
            }
        }
    }
    Ok(bytes)
}

/// The bytes queued in the pipe that descriptor entry `fd` (`/proc/<pid>/fd/N`) holds: an
/// anonymous pipe, or a named one (a FIFO the worker made in its scratch directory, which the
/// walk of its files does not count). The entry is opened as a new read end that does not
/// wait for a writer and asked how much the pipe holds (`FIONREAD`): opening it takes nothing
/// out of it. Only if what was opened is still the pipe `seen` describes: the worker may put
/// another file at that descriptor between the look and the open, and nothing but a pipe is
/// asked. 0 where the descriptor is gone; an error where the pipe would not open (a worker
/// can `fchmod` its pipe to mode 0, which stops a host without root's rights).
fn pipe_bytes(fd: &Path, seen: &Metadata) -> Result<u64, Unmeasurable> {
    use std::os::unix::fs::OpenOptionsExt;
    let pipe = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(fd)
    {
        Ok(pipe) => pipe,
        // Only if the descriptor is still that pipe: in a moment between the look and the open
        // an honest process may close it and open something else there (a socket, which its
        // `/proc` entry cannot open).
        Err(_) if !still(fd, seen) => return Ok(0),
        Err(e) => return unreadable(fd, &e).map_or(Ok(0), Err),
    };
    match pipe.metadata() {
        Ok(now) if now.dev() == seen.dev() && now.ino() == seen.ino() => {}
        _ => return Ok(0),
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is a live int; the descriptor
    // is our own open pipe end.
    if unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut queued) } != 0 {
        let e = std::io::Error::last_os_error();
        return unreadable(fd, &e).map_or(Ok(0), Err);
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// Whether `/proc` descriptor entry `fd` still names the file `seen` describes.
fn still(fd: &Path, seen: &Metadata) -> bool {
    std::fs::metadata(fd).is_ok_and(|now| now.dev() == seen.dev() && now.ino() == seen.ino())
}

/// The bytes queued in the unix socket at descriptor `fd` of thread `task` (`entry`, its
/// `/proc` entry, as `seen`): a socket pair is a store as a pipe is, each end holding up to its
/// send buffer (4 MiB here, `net.core.wmem_max`). A socket's `/proc` entry cannot be opened, so
/// the supervisor takes a copy of the descriptor (`pidfd_getfd`, which takes nothing out of the
/// socket) and asks it: a stream (or sequenced-packet) socket the bytes waiting to be read from
/// it (`SIOCINQ`), wherever they came from and whether or not their sender is still open; a
/// datagram socket the bytes it has sent that are still queued (`SIOCOUTQ`), since a datagram
/// socket's `SIOCINQ` shows only the first datagram. Each queued byte is so counted once. Only
/// a unix socket can be there (seccomp lets a worker make no other), and only a GPU worker can
/// make a pair, of stream or sequenced-packet sockets only (a CPU worker's `socketpair` is
/// refused, and every worker's `connect` and addressed sends are answered ENOENT): a datagram
/// socket here came from elsewhere, and what a closed sender left queued in it is not seen.
/// 0 where the thread or the descriptor is gone, or the descriptor is no longer that socket;
/// an error where the copy is refused (an undumpable worker under a host without root's
/// rights).
fn socket_bytes(
    pidfd: &OwnedFd,
    fd: libc::c_int,
    entry: &Path,
    seen: &Metadata,
) -> Result<u64, Unmeasurable> {
    let refused = |e: std::io::Error| unreadable(entry, &e).map_or(Ok(0), Err);
    // SAFETY: pidfd_getfd takes our pidfd, the target's descriptor number and flags 0; it
    // returns a new descriptor of ours or -1.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBADF) {
            return Ok(0); // closed since the walk saw it
        }
        return refused(e);
    }
    // SAFETY: as above, a descriptor just returned to us.
    let socket = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(copy as libc::c_int) });
    match socket.metadata() {
        Ok(now) if now.dev() == seen.dev() && now.ino() == seen.ino() => {}
        _ => return Ok(0),
    }
    let (mut kind, mut len): (libc::c_int, libc::socklen_t) = (0, 4);
    // SAFETY: SO_TYPE writes one int into `kind`, whose size `len` gives.
    let got = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if got != 0 {
        return refused(std::io::Error::last_os_error());
    }
    // SIOCINQ and SIOCOUTQ are FIONREAD's and TIOCOUTQ's numbers.
    let ask = if kind == libc::SOCK_DGRAM {
        libc::TIOCOUTQ
    } else {
        libc::FIONREAD
    };
    let mut queued: libc::c_int = 0;
    // SAFETY: the request writes one int through the pointer, which is a live int; the
    // descriptor is our own copy of a unix socket.
    if unsafe { libc::ioctl(socket.as_raw_fd(), ask, &mut queued) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Ok(0); // a listening socket, which queues connections, not bytes
        }
        return refused(e);
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// The pidfd of thread `tid` (`/proc` entry `task`) in `slot`, opened there the first time
/// (`PIDFD_THREAD`, Linux 6.9: a pidfd of this thread, whose descriptor table may be its own);
/// `None` where the thread is gone, an error where it cannot be opened.
fn thread_pidfd<'a>(
    slot: &'a mut Option<OwnedFd>,
    tid: libc::pid_t,
    task: &Path,
) -> Result<Option<&'a OwnedFd>, Unmeasurable> {
    if slot.is_none() {
        // SAFETY: pidfd_open takes a thread id and flags; it returns a new descriptor or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid, libc::O_EXCL) };
        if pidfd < 0 {
            let e = std::io::Error::last_os_error();
            return unreadable(task, &e).map_or(Ok(None), Err);
        }
        // SAFETY: the descriptor was just returned to us and nothing else owns it.
        *slot = Some(unsafe { OwnedFd::from_raw_fd(pidfd as libc::c_int) });
    }
    Ok(slot.as_ref())
}

/// The nameless files process `pid` maps: `/proc/<pid>/maps` names them `/memfd:...` or
/// `... (deleted)` (a shared anonymous mapping is `/dev/zero (deleted)`). Each is measured
/// through `/proc/<pid>/map_files`, which needs CAP_SYS_ADMIN (or CAP_CHECKPOINT_RESTORE);
/// without it the mapping's own length is counted, which misses what lies beyond it. An error
/// where the list of mappings cannot be read while the process is there.
fn mapping_bytes(pid: libc::pid_t, tally: &mut Tally) -> Result<u64, Unmeasurable> {
    let maps_path = PathBuf::from(format!("/proc/{pid}/maps"));
    let maps = match std::fs::read_to_string(&maps_path) {
        Ok(maps) => maps,
        Err(e) => return unreadable(&maps_path, &e).map_or(Ok(0), Err),
    };
    // Mappings measured by their length, by the (device, inode) that maps prints.
    let mut unmeasured: HashSet<(String, u64)> = HashSet::new();
    let mut bytes = 0;
    for line in maps.lines() {
        let Some(mapping) = Mapping::parse(line) else {
            continue;
        };
        if mapping.inode == 0
            || !(mapping.path.starts_with("/memfd:") || mapping.path.ends_with(" (deleted)"))
        {
            continue;
        }
        match std::fs::metadata(format!("/proc/{pid}/map_files/{}", mapping.range)) {
            Ok(meta) if nameless(&meta) => bytes += tally.add(&meta),
            Ok(_) => {}
            Err(_) => {
                if unmeasured.insert((mapping.device.to_string(), mapping.inode)) {
                    bytes += mapping.length;
                }
            }
        }
    }
    Ok(bytes)
}

/// One line of `/proc/<pid>/maps`.
struct Mapping<'a> {
    /// `start-end`, in hex, as `map_files` names the mapping.
    range: &'a str,
    length: u64,
    device: &'a str,
    inode: u64,
    path: &'a str,
}

impl<'a> Mapping<'a> {
    /// `start-end perms offset device inode [path]`; the path may hold spaces.
    fn parse(line: &'a str) -> Option<Mapping<'a>> {
        let mut rest = line;
        let mut field = || {
            let trimmed = rest.trim_start();
            let end = trimmed.find(' ').unwrap_or(trimmed.len());
            let (word, tail) = trimmed.split_at(end);
            rest = tail;
            word
        };
        let range = field();
        let (_perms, _offset, device, inode) = (field(), field(), field(), field());
        let path = rest.trim_start();
        let (start, end) = range.split_once('-')?;
        let length = u64::from_str_radix(end, 16)
            .ok()?
            .checked_sub(u64::from_str_radix(start, 16).ok()?)?;
        Some(Mapping {
            range,
            length,
            device,
            inode: inode.parse().ok()?,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    /// A python child running `script` (with `SCRATCH` its scratch directory), once it has
    /// written `ready` to its stdout.
    fn child(scratch: &Path, script: &str) -> Child {
        use std::io::Read;
        let mut child = Command::new("python3")
            .args(["-c", script])
            .env("SCRATCH", scratch)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = [0u8; 5];
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut ready)
            .unwrap();
        assert_eq!(&ready, b"ready");
        child
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("outside-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Runs `script` as a worker would, with the scratch directory `$SCRATCH`, and returns
    /// what [`Outside::kib`] reads of it.
    fn kept(name: &str, script: &str) -> u64 {
        let dir = scratch(name);
        let outside = Outside::new(&dir);
        let mut child = child(&dir, script);
        let kib = outside.kib(child.id() as libc::pid_t).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        kib
    }

    const MIB_16: u64 = 16 << 10;

    // Each script fills 16 MiB with data a page apart, so the file's blocks are allocated.
    const PRELUDE: &str = "import os, mmap, sys, time\n\
        data = os.urandom(1 << 20) * 16\n\
        def ready():\n    sys.stdout.write('ready'); sys.stdout.flush(); time.sleep(60)\n";

    #[test]
    fn a_process_that_keeps_nothing_in_files_reads_zero() {
        let kib = kept("none", &format!("{PRELUDE}ready()\n"));
        assert_eq!(kib, 0);
    }

    #[test]
    fn a_file_in_the_scratch_directory_counts() {
        let script = format!(
            "{PRELUDE}os.makedirs(os.environ['SCRATCH'] + '/a/b')\n\
             open(os.environ['SCRATCH'] + '/a/b/stash', 'wb').write(data)\nready()\n"
        );
        let kib = kept("file", &script);
        assert!((MIB_16..MIB_16 + 1024).contains(&kib), "{kib} KiB");
    }

    #[test]
    fn a_memfd_counts_while_open_and_while_only_mapped() {
        let open = format!("{PRELUDE}fd = os.memfd_create('stash')\nos.write(fd, data)\nready()\n");
        let kib = kept("memfd-open", &open);
        assert!((MIB_16..MIB_16 + 1024).contains(&kib), "{kib} KiB");
        // Mapped one page, its descriptor closed: the rest of the file is out of the
        // resident set and still the process's (mremap grows the page back over it).
        let mapped = format!(
            "{PRELUDE}fd = os.memfd_create('stash')\nos.write(fd, data)\n\
             m = mmap.mmap(fd, 4096)\nos.close(fd)\nready()\n"
        );
        let kib = kept("memfd-mapped", &mapped);
        assert!(kib >= MIB_16, "{kib} KiB");
    }

    #[test]
    fn an_unlinked_file_held_open_counts() {
        let script = format!(
            "{PRELUDE}p = os.environ['SCRATCH'] + '/stash'\nf = open(p, 'wb+')\n\
             f.write(data); f.flush()\nos.unlink(p)\nready()\n"
        );
        let kib = kept("unlinked", &script);
        assert!((MIB_16..MIB_16 + 1024).contains(&kib), "{kib} KiB");
    }

    #[test]
    fn a_shared_anonymous_mapping_shrunk_to_a_page_counts() {
        // python's mmap cannot unmap part of a mapping, so the C library's munmap does it.
        let script = format!(
            "{PRELUDE}import ctypes\nlibc = ctypes.CDLL(None)\n\
             libc.mmap.restype = ctypes.c_void_p\n\
             libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]\n\
             libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]\n\
             n = len(data)\np = libc.mmap(None, n, 3, 0x01 | 0x20, -1, 0)\n\
             ctypes.memmove(p, data, n)\nassert libc.munmap(p + 4096, n - 4096) == 0\nready()\n"
        );
        let kib = kept("shared-anon", &script);
        assert!(kib >= MIB_16, "{kib} KiB");
    }

    #[test]
    fn bytes_queued_in_pipes_count_each_pipe_once() {
        // 15 pipes of 1 MiB, each filled, its read end held once and its write end twice, and
        // a named pipe in the scratch directory filled as well: 16 MiB in kernel buffers, none
        // of it in the resident set or in a regular file, each pipe counted once.
        let script = format!(
            "{PRELUDE}import fcntl\npipes = []\n\
             for i in range(15):\n    r, w = os.pipe()\n\
             \x20   fcntl.fcntl(w, 1031, 1 << 20)\n    os.write(w, data[i << 20:(i + 1) << 20])\n\
             \x20   pipes.append((r, w, os.dup(w)))\n\
             os.mkfifo(os.environ['SCRATCH'] + '/fifo')\n\
             f = os.open(os.environ['SCRATCH'] + '/fifo', os.O_RDWR | os.O_NONBLOCK)\n\
             fcntl.fcntl(f, 1031, 1 << 20)\nos.write(f, data[15 << 20:])\nready()\n"
        );
        let kib = kept("pipes", &script);
        assert!((MIB_16..MIB_16 + 64).contains(&kib), "{kib} KiB");
    }

    #[test]
    fn maps_lines_parse_with_spaces_in_paths() {
        let line = "7f00a000-7f00c000 rw-s 00000000 00:01 4242    /memfd:a b (deleted)";
        let m = Mapping::parse(line).unwrap();
        assert_eq!(m.range, "7f00a000-7f00c000");
        assert_eq!(m.length, 0x2000);
        assert_eq!(m.device, "00:01");
        assert_eq!(m.inode, 4242);
        assert_eq!(m.path, "/memfd:a b (deleted)");
        let anon = Mapping::parse("7ffd0000-7ffd1000 rw-p 00000000 00:00 0").unwrap();
        assert_eq!((anon.inode, anon.path), (0, ""));
        assert!(Mapping::parse("garbage").is_none());
    }

    #[test]
    fn bytes_queued_in_unix_sockets_count_once_closed_senders_included() {
        // 8 stream pairs with 64 KiB sent one way, one of them sent both ways, a pair whose
        // sender is closed with 64 KiB still waiting, and a datagram pair with 32 KiB: 672 KiB
        // that no resident set or file holds, each byte counted once. A datagram's count
        // includes the kernel's bookkeeping, so it is a little more than its bytes.
        let script = format!(
            "{PRELUDE}import socket\nkeep = []\n\
             for i in range(8):\n    a, b = socket.socketpair()\n\
             \x20   a.sendall(data[:64 << 10])\n    keep.append((a, b))\n\
             keep[0][1].sendall(data[:64 << 10])\n\
             a, b = socket.socketpair()\na.sendall(data[:64 << 10])\na.close()\nkeep.append(b)\n\
             a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
             a.send(data[:32 << 10])\nkeep.append((a, b))\nready()\n"
        );
        let kib = kept("sockets", &script);
        assert!((672..672 + 64).contains(&kib), "{kib} KiB");
    }

    #[test]
    fn a_pipe_replaced_before_its_open_reads_zero_not_an_error() {
        // A descriptor seen as a pipe, then closed and reused for a socket before the open (an
        // honest process may do that between two system calls of the sampler): its `/proc`
        // entry no longer opens (ENXIO), and that is the race, not a store kept from the host.
        let (mut ends, socket) = ([0; 2], {
            // SAFETY: socket(2) with constant arguments; returns a descriptor of ours or -1.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) }
        });
        // SAFETY: `ends` is two ints for pipe(2) to fill.
        assert!(socket >= 0 && unsafe { libc::pipe(ends.as_mut_ptr()) } == 0);
        let entry = PathBuf::from(format!("/proc/self/fd/{}", ends[0]));
        let pipe = std::fs::metadata(&entry).unwrap();
        // SAFETY: dup2 and close on descriptors of this test's own.
        assert!(unsafe { libc::dup2(socket, ends[0]) } == ends[0]);
        let read = pipe_bytes(&entry, &pipe);
        for fd in [socket, ends[0], ends[1]] {
            // SAFETY: as above.
            unsafe { libc::close(fd) };
        }
        assert_eq!(read.expect("a replaced pipe is not an error"), 0);
    }

    #[test]
    fn a_store_deeper_than_a_path_can_name_counts() {
        // Directories of 200 characters, 40 deep (8,000 characters: twice PATH_MAX), made by
        // chdir, and the store at the bottom.
        let script = format!(
            "{PRELUDE}os.chdir(os.environ['SCRATCH'])\n\
             for i in range(40):\n    os.mkdir('d' * 200); os.chdir('d' * 200)\n\
             open('stash', 'wb').write(data)\nready()\n"
        );
        let kib = kept("deep", &script);
        assert!((MIB_16..MIB_16 + 1024).contains(&kib), "{kib} KiB");
    }

    #[test]
    fn a_tree_of_too_many_directories_is_an_error_that_names_it() {
        let dir = scratch("many");
        let outside = Outside::new(&dir);
        for i in 0..=MAX_DIRS {
            std::fs::create_dir(dir.join(i.to_string())).unwrap();
        }
        let err = outside.kib(std::process::id() as libc::pid_t).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        let text = err.to_string();
        assert!(
            text.contains(dir.to_str().unwrap()) && text.contains("more than 256 directories"),
            "{text}"
        );
    }

    /// How [`hiding_child`] hides the pipe it fills.
    #[derive(Clone, Copy, PartialEq)]
    enum Hide {
        Nothing,
        /// `fchmod` the pipe to mode 0: no one without CAP_DAC_OVERRIDE opens it.
        PipeMode,
        /// `PR_SET_DUMPABLE` 0: its `/proc` entries are closed to all but CAP_SYS_PTRACE.
        Dumpable,
    }

    /// The user the unprivileged side of [`a_store_hidden_from_a_host_without_root_is_an_error`]
    /// runs as when the tests run as root.
    const NOBODY: libc::uid_t = 65534;

    /// A forked child, as `NOBODY` when the tests run as root, that holds a pipe with 32 KiB
    /// queued and hides it as `hide` says; it waits to be killed. Only system calls run in it
    /// after the fork (no allocation: the test harness has other threads).
    fn hiding_child(hide: Hide, root: bool) -> libc::pid_t {
        static DATA: [u8; 32 << 10] = [7; 32 << 10];
        let mut ready = [0; 2];
        // SAFETY: `ready` is two ints for pipe(2) to fill. The child runs only system calls on
        // its own descriptors and the static buffer, then waits, so forking this multithreaded
        // process is sound (nothing in it takes a lock another thread may hold).
        unsafe {
            assert_eq!(libc::pipe(ready.as_mut_ptr()), 0);
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid > 0 {
                libc::close(ready[1]);
                let mut byte = 0u8;
                assert_eq!(
                    libc::read(ready[0], (&mut byte as *mut u8).cast(), 1),
                    1,
                    "the hiding child died before it was ready (as uid {NOBODY} when root)"
                );
                // The end of file: the child has closed its end too (below).
                assert_eq!(libc::read(ready[0], (&mut byte as *mut u8).cast(), 1), 0);
                libc::close(ready[0]);
                return pid;
            }
            if root {
                let (u, g) = (NOBODY as libc::c_long, NOBODY as libc::c_long);
                if libc::syscall(libc::SYS_setresgid, g, g, g) != 0
                    || libc::syscall(libc::SYS_setresuid, u, u, u) != 0
                {
                    libc::_exit(3);
                }
            }
            // The test harness's own descriptors (its captured output is a pipe of root's
            // that `NOBODY` may not open) are not the child's to hold, as a worker holds only
            // what the host gives it.
            for fd in 0..1024 {
                if fd != ready[1] {
                    libc::close(fd);
                }
            }
            // A change of user makes a process undumpable; an honest worker is not.
            libc::prctl(libc::PR_SET_DUMPABLE, 1);
            let mut store = [0; 2];
            if libc::pipe(store.as_mut_ptr()) != 0
                || libc::write(store[1], DATA.as_ptr().cast(), DATA.len()) != DATA.len() as isize
            {
                libc::_exit(4);
            }
            match hide {
                Hide::Nothing => {}
                Hide::PipeMode => {
                    libc::fchmod(store[0], 0);
                }
                Hide::Dumpable => {
                    libc::prctl(libc::PR_SET_DUMPABLE, 0);
                }
            }
            // Then it closes its end of the pipe to the parent, root's when the tests run as
            // root, and so one `NOBODY` may not open: it holds nothing but its store.
            libc::write(ready[1], b"r".as_ptr().cast(), 1);
            libc::close(ready[1]);
            loop {
                libc::pause();
            }
        }
    }

    /// Runs `f` in this thread alone as `NOBODY` when `root` (the system calls change only the
    /// calling thread's credentials, and the saved user stays root, so it can return), as the
    /// supervisor of a host without root's rights would.
    fn as_nobody<T>(root: bool, f: impl FnOnce() -> T) -> T {
        let set = |id: libc::uid_t| {
            let why = format!(
                "this thread cannot take user and group {id} (the test plays a host without \
                 root's rights as uid {NOBODY})"
            );
            // The group goes first when giving rights up, last when taking them back.
            let order = match id {
                0 => [libc::SYS_setresuid, libc::SYS_setresgid],
                _ => [libc::SYS_setresgid, libc::SYS_setresuid],
            };
            for nr in order {
                let (id, keep) = (id as libc::c_long, -1 as libc::c_long);
                // SAFETY: setresuid/setresgid on this thread only, with plain integer
                // arguments; -1 leaves the real and saved ids as they are.
                assert_eq!(unsafe { libc::syscall(nr, keep, id, keep) }, 0, "{why}");
            }
        };
        if root {
            set(NOBODY);
        }
        let result = f();
        if root {
            set(0);
        }
        result
    }

    #[test]
    fn a_store_hidden_from_a_host_without_root_is_an_error() {
        // A host without root's rights cannot open a pipe whose mode is 0 or read the /proc
        // entries of an undumpable worker: each reading is an error that names the entry, not
        // a store of 0 bytes. The same child that hides nothing is measured by the same user,
        // so the errors come from the hiding alone.
        // SAFETY: geteuid has no arguments and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let dir = scratch("hidden");
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let outside = Outside::new(&dir);
        let mut readings = Vec::new();
        for hide in [Hide::Nothing, Hide::PipeMode, Hide::Dumpable] {
            let pid = hiding_child(hide, root);
            readings.push((pid, as_nobody(root, || outside.kib(pid))));
            // SAFETY: kill and waitpid on our own child, with a null status pointer.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
        match &readings[0].1 {
            Ok(kib) => assert!(*kib >= 32, "the plain child's pipe read {kib} KiB"),
            Err(e) => panic!("the plain child could not be measured: {e}"),
        }
        let (pid, pipe) = &readings[1];
        let text = pipe
            .as_ref()
            .expect_err("a pipe of mode 0 was measured")
            .to_string();
        assert!(
            text.contains(&format!("/proc/{pid}/task/{pid}/fd/")) && text.contains("denied"),
            "{text}"
        );
        let (pid, dumpable) = &readings[2];
        let text = dumpable
            .as_ref()
            .expect_err("an undumpable child was measured")
            .to_string();
        assert!(
            text.contains(&format!("/proc/{pid}/")) && text.contains("denied"),
            "{text}"
        );
    }
}
