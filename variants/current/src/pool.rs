//! A persistent pool of helper threads for the many short parallel steps of a forward pass.
//!
//! Decoding one token runs about 200 matmuls of 10-100 µs each. A fork-join pool (rayon) parks
//! the calling thread on a latch and wakes it when the last task ends, a round trip through the
//! kernel per matmul. [`Pool::run`] instead has the caller do a share of the work itself while
//! the helpers, which spin on an atomic counter between jobs, do the rest; the caller then
//! spins until they are done. Helpers that find no job for a while sleep on a condition
//! variable, so an idle engine costs no CPU.
//!
//! [`Pool::for_chunks`] deals the chunks of a slice out to the threads, one at a time, as each
//! thread asks for the next.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

/// Spins a helper makes, waiting for a job, before it sleeps (a few hundred microseconds: longer
/// than the gap between two steps of a forward pass, far shorter than a pause between requests).
const SPINS_BEFORE_SLEEP: u32 = 1 << 16;

/// The job a [`Pool::run`] publishes: its closure, called with the thread's index.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

/// What the caller and the helpers share.
struct Shared {
    /// Bumped once per job; a helper runs a job when it sees a new value.
    epoch: AtomicUsize,
    /// Helpers done with the current job.
    done: AtomicUsize,
    /// The current job, set before `epoch` is bumped and read after it is seen.
    job: UnsafeCell<Option<Job<'static>>>,
    /// Set when a helper's share panicked.
    panicked: AtomicBool,
    /// Set when the pool is dropped.
    stop: AtomicBool,
    /// Helpers asleep (or about to be), and what they sleep on.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread inside `Pool::run`, while no helper reads it (all
// have finished the previous job, which `run` waited for), and read by helpers only after they
// observe the new epoch with acquire ordering, which orders the write before their read.
unsafe impl Sync for Shared {}

/// A caller plus `threads - 1` helper threads.
pub struct Pool {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
    /// Serialises callers: one job at a time.
    busy: Mutex<()>,
}

impl Pool {
    /// A pool computing on `threads` threads in all (the caller included; at least 1).
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let helpers = (1..threads.max(1))
            .map(|index| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("pool-{index}"))
                    .spawn(move || helper(&shared, index))
                    .expect("cannot start a pool thread")
            })
            .collect();
        Pool {
            shared,
            helpers,
            busy: Mutex::new(()),
        }
    }

    /// Threads computing a job, the caller included.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Calls `job(i)` once on every thread `i` of the pool (0 is the caller) and returns when
    /// all have returned. A panic in any of them is raised here, after all have stopped.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        if self.helpers.is_empty() {
            return job(0);
        }
        let _one_at_a_time = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &*self.shared;
        shared.done.store(0, Ordering::Relaxed);
        // SAFETY: see `Shared`'s Sync; the `'static` is a lie that `Wait` makes harmless: no
        // helper touches the job after `done` reaches their count, and `Wait` (also on unwind)
        // returns only then, before `job` goes out of scope.
        unsafe {
            *shared.job.get() = Some(std::mem::transmute::<Job<'_>, Job<'static>>(job));
        }
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        let wait = Wait {
            shared,
            helpers: self.helpers.len(),
        };
        job(0);
        drop(wait);
        if shared.panicked.swap(false, Ordering::Relaxed) {
            panic!("a pool thread panicked");
        }
    }

    /// Splits `items` into chunks of `chunk` (the last may be shorter) and calls `f(start,
    /// chunk)` for every one, on whichever thread asks first; `start` is the chunk's index in
    /// `items`.
    pub fn for_chunks<T: Send>(
        &self,
        items: &mut [T],
        chunk: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        let chunk = chunk.max(1);
        let (len, chunks) = (items.len(), items.len().div_ceil(chunk));
        let base = SendPtr(items.as_mut_ptr());
        let next = AtomicUsize::new(0);
        self.run(&|_| loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= chunks {
                break;
            }
            let start = c * chunk;
            let n = chunk.min(len - start);
            // SAFETY: every chunk index is claimed once (fetch_add), so the slices are
            // disjoint and inside `items`, which `for_chunks` borrows mutably until `run`
            // returns, after every thread is done with them.
            let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
            f(start, part);
        });
    }
}

/// A raw pointer the threads of one job may share (see the SAFETY note in `for_chunks`).
struct SendPtr<T>(*mut T);
// SAFETY: only used by `for_chunks`, whose threads write disjoint chunks of `T: Send` items.
unsafe impl<T: Send> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Waits, on drop (normal return or unwind), until every helper is done with the job.
struct Wait<'a> {
    shared: &'a Shared,
    helpers: usize,
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        while self.shared.done.load(Ordering::Acquire) < self.helpers {
            std::hint::spin_loop();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for handle in self.helpers.drain(..) {
            let _ = handle.join();
        }
    }
}

/// A helper's life: wait for a new epoch, run its share, report done.
fn helper(shared: &Shared, index: usize) {
    let mut seen = 0;
    loop {
        let mut spins = 0u32;
        loop {
            let epoch = shared.epoch.load(Ordering::Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            if spins < SPINS_BEFORE_SLEEP {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.sleepers.fetch_add(1, Ordering::SeqCst);
            if shared.epoch.load(Ordering::SeqCst) == seen && !shared.stop.load(Ordering::SeqCst) {
                drop(shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
            }
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        }
        // SAFETY: the epoch was bumped after the job was stored (acquire/release), and the
        // job stays alive until this helper reports done below.
        let job = unsafe { *shared.job.get() };
        if let Some(job) = job {
            if catch_unwind(AssertUnwindSafe(|| job(index))).is_err() {
                shared.panicked.store(true, Ordering::Relaxed);
            }
        }
        shared.done.fetch_add(1, Ordering::Release);
    }
}

/// The engine's pool, made by [`init`] (or with one thread per core on first use).
static POOL: OnceLock<Pool> = OnceLock::new();

/// Sizes the engine's pool; returns false when it already exists with another size.
pub fn init(threads: usize) -> bool {
    POOL.get_or_init(|| Pool::new(threads)).threads() == threads.max(1)
}

/// The engine's pool.
pub fn global() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(std::thread::available_parallelism().map_or(1, |n| n.get())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_each_job_once() {
        let pool = Pool::new(3);
        for _ in 0..100 {
            let calls: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|i| {
                calls[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(calls.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn chunks_cover_the_slice_once_with_their_start() {
        let pool = Pool::new(2);
        let mut items = vec![0usize; 1001];
        pool.for_chunks(&mut items, 64, |start, part| {
            for (i, v) in part.iter_mut().enumerate() {
                *v += start + i + 1;
            }
        });
        assert!(items.iter().enumerate().all(|(i, &v)| v == i + 1));
    }

    #[test]
    fn helpers_that_fell_asleep_wake_for_the_next_job() {
        let pool = Pool::new(2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let ran = AtomicUsize::new(0);
        pool.run(&|_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_panicking_share_is_raised_and_the_pool_still_works() {
        let pool = Pool::new(2);
        let caught = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|i| assert_ne!(i, 1, "helper fails"));
        }));
        assert!(caught.is_err());
        let ran = AtomicUsize::new(0);
        pool.run(&|_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn one_thread_runs_on_the_caller() {
        let pool = Pool::new(1);
        let me = std::thread::current().id();
        pool.run(&|i| {
            assert_eq!(i, 0);
            assert_eq!(std::thread::current().id(), me);
        });
    }
}
