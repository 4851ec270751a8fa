//! Linux process plumbing: CPU time from `/proc/PID/task/*/schedstat`, memory from
//! `/proc/PID/status` and `smaps_rollup`, core pinning, the fd limit, and the ctrl-c flag.
//!
//! Everything here reads or sets process attributes; nothing here knows about WebSockets.

use std::fs;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the SIGINT/SIGTERM handler; loops poll it and unwind, so child servers are killed by
/// their guards' `Drop`.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Installs the ctrl-c / SIGTERM handler that sets the interrupted flag.
pub fn install_signal_handlers() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

/// Whether ctrl-c (or SIGTERM) arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Scheduler time of all threads of a process, in ns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sched {
    /// Time spent running on a CPU (schedstat field 1).
    pub run: u64,
    /// Time spent runnable but waiting for a CPU (schedstat field 2): high when other processes
    /// compete for the server's core.
    pub wait: u64,
}

/// Sums `/proc/PID/task/*/schedstat` over the threads of `pid`. Threads that exited before the
/// call are not counted, so callers take deltas over a window in which the server's threads live
/// throughout.
pub fn process_sched(pid: u32) -> io::Result<Sched> {
    let mut total = Sched::default();
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = entry?.path().join("schedstat");
        // A thread may exit between listing and reading; skip it.
        if let Ok(text) = fs::read_to_string(path) {
            let mut fields = text
                .split_whitespace()
                .map(|v| v.parse::<u64>().unwrap_or(0));
            total.run += fields.next().unwrap_or(0);
            total.wait += fields.next().unwrap_or(0);
        }
    }
    Ok(total)
}

/// Memory of a process, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// Resident set size: `Rss` in `/proc/PID/smaps_rollup`, which walks the page tables.
    /// (`VmRSS` in `/proc/PID/status` reads per-CPU counters that may lag by 64 pages or more:
    /// 26 B per connection at 10,000, a CI run of `tests/memory.rs` read 256 B too many at 1,000.)
    /// `VmRSS` only where `smaps_rollup` cannot be read.
    pub rss: u64,
    /// Proportional set size (`Pss` in `/proc/PID/smaps_rollup`); shared pages are split.
    pub pss: u64,
}

/// Reads `pid`'s resident and proportional memory.
pub fn memory(pid: u32) -> io::Result<Memory> {
    let kib = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| {
                l[key.len()..]
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .map(|k| k * 1024)
            .unwrap_or(0)
    };
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Ok(Memory {
        rss: match kib(&rollup, "Rss:") {
            0 => kib(&status, "VmRSS:"),
            exact => exact,
        },
        pss: kib(&rollup, "Pss:"),
    })
}

/// Peak resident set size of a process (`VmHWM` in `/proc/PID/status`), in bytes.
pub fn peak_rss(pid: u32) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no VmHWM line"))
}

/// The pid of the kernel thread `ksoftirqd/<core>`, which runs the softirq work (network
/// receive and transmit completion, on loopback also the receiver's TCP input) that the kernel
/// defers from `core` when there is too much of it to run on the way out of interrupts and
/// system calls.
pub fn ksoftirqd_pid(core: usize) -> Option<u32> {
    let name = format!("ksoftirqd/{core}");
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim_end() == name).then_some(pid)
    })
}

/// The calling thread's own on-CPU time in ns, from its schedstat (0 if unreadable).
pub fn thread_cpu_ns() -> u64 {
    fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Pins the calling thread (or, called in a child before exec, the new process) to `core`.
pub fn pin_to_core(core: usize) -> io::Result<()> {
    check_core(core)?;
    // SAFETY: an all-zero `cpu_set_t` is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `check_core` keeps `core` below CPU_SETSIZE, so the bit is inside `set`.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t and the size passed matches it.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Rejects a core number that does not fit in a `cpu_set_t` (CPU_SETSIZE bits).
pub fn check_core(core: usize) -> io::Result<()> {
    if core < libc::CPU_SETSIZE as usize {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no core {core}"),
        ))
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit. Child servers
/// inherit it across fork and exec, so the peers need no change of their own.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit whose soft value does not exceed its hard value.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

/// The 1-minute load average (`/proc/loadavg`); above ~2 on this 2-core machine, other
/// processes compete with the server and generator, and timings are noisy.
pub fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The CPU model name from `/proc/cpuinfo`, for reports.
pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_cpu_time_covers_a_busy_thread_and_memory_is_readable() {
        let pid = std::process::id();
        let before = thread_cpu_ns();
        // Busy for 50 ms of wall time: schedstat is updated at scheduler ticks, not per call.
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(50) {
            std::hint::spin_loop();
        }
        let own = thread_cpu_ns();
        assert!(own > before);
        // Other test threads may come and go, but this one is in the sum.
        assert!(process_sched(pid).unwrap().run >= own);
        assert!(memory(pid).unwrap().rss > 0);
        assert!(peak_rss(pid).unwrap() >= memory(pid).unwrap().rss / 2);
    }

    #[test]
    fn ksoftirqd_of_core_0_is_found_and_readable() {
        let pid = ksoftirqd_pid(0).expect("every Linux system has ksoftirqd/0");
        process_sched(pid).unwrap();
        assert_eq!(ksoftirqd_pid(100_000), None);
    }
}
