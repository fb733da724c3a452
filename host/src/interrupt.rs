//! Ctrl-C and SIGTERM during a measurement: the first one asks the host to stop, the second
//! one ends it at once.
//!
//! [`install`] replaces the default action of SIGINT and SIGTERM (which would end the host
//! without a record) with a handler that only sets a flag. Whatever waits on a worker polls
//! [`requested`] ([`crate::supervisor::Worker`] does, every 100 ms), kills the worker and
//! returns [`crate::supervisor::WorkerError::Interrupted`]; `run` and `compare` then record
//! what was measured with the status `interrupted` and exit with [`EXIT_CODE`]. The handler
//! resets itself, so a second signal takes the default action: a host that does not stop soon
//! enough can still be ended, and its workers die with it (`PR_SET_PDEATHSIG`).

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the signal handler; never cleared.
static REQUESTED: AtomicBool = AtomicBool::new(false);

/// The exit status of an interrupted command (128 + SIGINT, as shells report Ctrl-C).
pub const EXIT_CODE: u8 = 130;

extern "C" fn on_signal(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Makes the first SIGINT or SIGTERM set [`requested`] instead of ending the process.
pub fn install() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler only stores to an
        // atomic, and SA_RESETHAND restores the default action after the first delivery.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
