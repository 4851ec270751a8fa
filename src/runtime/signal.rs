//! SIGINT and SIGTERM as a graceful shutdown, per server.
//!
//! A server waiting in `ServerHandle::run_until_signal` ([`super::fleet::Fleet::run_until_signal`]) registers an eventfd
//! of its own here; the signal handler writes to every registered eventfd and nothing else,
//! and the waiting thread turns that into an ordinary shutdown request. Dropping the
//! registration removes the eventfd before it is closed, and waits out a handler that may be
//! running, so a signal never writes into a descriptor number that was reused. A signal that
//! arrives while no server waits gets its default action (the process ends), as without us.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

use super::sys;

const SLOTS: usize = 64;
static FDS: [AtomicI32; SLOTS] = [const { AtomicI32::new(-1) }; SLOTS];
/// Handlers running now (unregistering waits for zero before the eventfd is closed).
static RUNNING: AtomicUsize = AtomicUsize::new(0);

extern "C" fn handle_signal(signal: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno slot; write(2) below may change
    // it, and the interrupted code must find it as it was.
    let saved_errno = unsafe { *libc::__errno_location() };
    RUNNING.fetch_add(1, Ordering::SeqCst);
    let mut woke = false;
    for slot in &FDS {
        let fd = slot.load(Ordering::SeqCst);
        if fd >= 0 {
            sys::wake(fd);
            woke = true;
        }
    }
    RUNNING.fetch_sub(1, Ordering::SeqCst);
    if !woke {
        // No server is waiting: the signal does what it would have done without us.
        // SAFETY: signal(2) and raise(3) are async-signal-safe.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// One server's registration: its eventfd becomes readable on SIGINT or SIGTERM.
pub(crate) struct SignalWatch {
    slot: usize,
    fd: RawFd,
}

impl SignalWatch {
    /// Registers a fresh eventfd and (re)installs the process's handlers. With no
    /// registration left, a signal gets its default action again.
    ///
    /// # Errors
    /// No eventfd, every slot taken (more than 64 servers waiting at once), or sigaction
    /// failures.
    pub fn register() -> io::Result<SignalWatch> {
        let fd = sys::eventfd()?;
        for (slot, cell) in FDS.iter().enumerate() {
            if cell
                .compare_exchange(-1, fd, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                let watch = SignalWatch { slot, fd };
                install_handlers()?;
                return Ok(watch);
            }
        }
        sys::close(fd);
        Err(io::Error::other("too many servers waiting for signals"))
    }

    /// The eventfd a signal makes readable.
    pub fn fd(&self) -> RawFd {
        self.fd
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        FDS[self.slot].store(-1, Ordering::SeqCst);
        // A handler that loaded our fd before the store may still write to it.
        while RUNNING.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
        sys::close(self.fd);
    }
}

fn install_handlers() -> io::Result<()> {
    // SAFETY: installs an async-signal-safe handler (atomics and write(2) only); the
    // sigaction struct lives on this frame.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handle_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        for signal in [libc::SIGINT, libc::SIGTERM] {
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}
