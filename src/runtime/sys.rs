//! Plain system calls the shards make outside the ring, all cold-path: creating listeners and
//! eventfds, socket options, `shutdown`/`close`, `poll` and CPU pinning; and, at shutdown,
//! reading the kernel's listener table and `tcp_migrate_req` from `/proc`.
//!
//! Every `unsafe` here is a libc call on integers or on memory owned by the calling frame.

use std::fmt::Write as _;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Opens a listening TCP socket with SO_REUSEADDR and SO_REUSEPORT (so every shard can bind
/// the same address and the kernel spreads connections across them).
///
/// # Errors
/// socket/bind/listen failures.
pub(crate) fn listen(addr: &SocketAddr, backlog: i32) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall on integers.
    let fd = check(unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket(2) just returned this descriptor; nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    let (storage, len) = to_sockaddr(addr);
    // SAFETY: `storage` is a valid sockaddr of `len` bytes living on this frame.
    check(unsafe { libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) })?;
    // SAFETY: plain syscall.
    check(unsafe { libc::listen(fd, backlog) })?;
    Ok(socket)
}

/// Fails with `AddrInUse` if something already listens on `addr`. A listener of another
/// process with SO_REUSEPORT (and the same user) would otherwise silently share the port with
/// ours, splitting connections between two servers.
///
/// # Errors
/// `AddrInUse`, or the bind failure.
pub(crate) fn ensure_free(addr: &SocketAddr) -> io::Result<()> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall on integers.
    let fd = check(unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SO_REUSEADDR only, so connections in TIME_WAIT do not count as "in use".
    let result = set_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).and_then(|()| {
        let (storage, len) = to_sockaddr(addr);
        // SAFETY: `storage` is a valid sockaddr of `len` bytes living on this frame.
        check(unsafe { libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) })
            .map(drop)
    });
    close(fd);
    result
}

/// `net.ipv4.tcp_migrate_req` in the calling thread's network namespace (Linux 5.14+;
/// `None` before): whether a listener that closes hands the connections waiting in its
/// accept queue to another listener of its `SO_REUSEPORT` group instead of resetting them.
pub(crate) fn migrate_req() -> Option<bool> {
    let value = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").ok()?;
    Some(value.trim() != "0")
}

/// How many TCP sockets listen on exactly `addr` in the calling thread's network namespace,
/// ours included; `None` if the table cannot be read.
pub(crate) fn listeners_on(addr: &SocketAddr) -> Option<usize> {
    let table = if addr.is_ipv4() { "tcp" } else { "tcp6" };
    let text = std::fs::read_to_string(format!("/proc/thread-self/net/{table}")).ok()?;
    Some(count_listeners(&text, addr))
}

/// Counts the rows of a `/proc/net/tcp` or `tcp6` table in state `0A` (`LISTEN`) whose local
/// address is `addr`. The kernel prints each 32-bit word of the address as it lies in memory
/// (network order) read as a native integer, and the port in host order.
fn count_listeners(table: &str, addr: &SocketAddr) -> usize {
    let mut want = String::new();
    let octets = match addr.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    for word in octets.chunks_exact(4) {
        let word = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
        let _ = write!(want, "{word:08X}");
    }
    let _ = write!(want, ":{:04X}", addr.port());
    table
        .lines()
        .skip(1)
        .filter(|row| {
            let mut fields = row.split_whitespace().skip(1);
            let local = fields.next();
            let state = fields.nth(1);
            local == Some(want.as_str()) && state == Some("0A")
        })
        .count()
}

fn set_int_opt(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` lives on this frame and its size is passed.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Gives free heap memory back to the kernel (glibc's `malloc_trim`). Small blocks freed by
/// the idle sweep stay in the allocator's arena, and its pages resident, until trimmed: glibc
/// returns memory on `free` only from the top of an arena. Does nothing on other C libraries.
pub(crate) fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer; it works on the allocator's own free lists under
    // the allocator's locks, and only releases pages of free blocks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Disables Nagle's algorithm: the shard already batches writes per connection.
pub(crate) fn set_nodelay(fd: RawFd) {
    let _ = set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
}

/// The local address of a socket.
///
/// # Errors
/// getsockname failures.
pub(crate) fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    sock_name(fd, false)
}

/// The peer address of a connected socket.
///
/// # Errors
/// getpeername failures (for example a peer that already reset).
pub(crate) fn peer_addr(fd: RawFd) -> io::Result<SocketAddr> {
    sock_name(fd, true)
}

fn sock_name(fd: RawFd, peer: bool) -> io::Result<SocketAddr> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` and `len` live on this frame; `len` is its size.
    check(unsafe {
        if peer {
            libc::getpeername(fd, storage.as_mut_ptr().cast(), &mut len)
        } else {
            libc::getsockname(fd, storage.as_mut_ptr().cast(), &mut len)
        }
    })?;
    // SAFETY: zero-initialized and then filled by the kernel.
    let storage = unsafe { storage.assume_init() };
    from_sockaddr(&storage).ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))
}

/// Half-closes (`SHUT_WR`) or fully shuts down a socket; errors (already reset) are moot.
pub(crate) fn shutdown(fd: RawFd, write_only: bool) {
    let how = if write_only {
        libc::SHUT_WR
    } else {
        libc::SHUT_RDWR
    };
    // SAFETY: plain syscall on integers.
    unsafe { libc::shutdown(fd, how) };
}

/// Closes a file descriptor.
pub(crate) fn close(fd: RawFd) {
    // SAFETY: plain syscall; callers close each fd they own exactly once.
    unsafe { libc::close(fd) };
}

/// A non-blocking eventfd.
///
/// # Errors
/// eventfd failures (fd limits).
pub(crate) fn eventfd() -> io::Result<RawFd> {
    // SAFETY: plain syscall.
    check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
}

/// Adds one to an eventfd's counter, waking the shard that reads it. Async-signal-safe.
pub(crate) fn wake(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a local; EAGAIN (counter saturated) still leaves it readable.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Resets a (non-blocking) eventfd's counter.
pub(crate) fn drain_eventfd(fd: RawFd) {
    let mut word = 0u64;
    // SAFETY: reads 8 bytes into a local; EAGAIN (already zero) is fine.
    unsafe { libc::read(fd, (&mut word as *mut u64).cast(), 8) };
}

/// Waits until one of `fds` is readable and returns its index (EINTR retried).
///
/// # Errors
/// poll failures.
pub(crate) fn wait_readable(fds: &[RawFd]) -> io::Result<usize> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `polls` is a live array of `polls.len()` pollfd structs.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, -1) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err);
        }
        if let Some(i) = polls.iter().position(|p| p.revents != 0) {
            return Ok(i);
        }
    }
}

/// Pins the calling thread to one CPU.
///
/// # Errors
/// sched_setaffinity failures (a CPU outside the allowed set).
pub(crate) fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain old data; CPU_SET writes inside it (the index is checked
    // against its capacity first).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * size_of::<libc::cpu_set_t>() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        libc::CPU_SET(cpu, &mut set);
        check(libc::sched_setaffinity(
            0,
            size_of::<libc::cpu_set_t>(),
            &set,
        ))
        .map(drop)
    }
}

/// The CPUs this process may run on, in order.
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` lives on this frame; CPU_ISSET reads inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        }
        (0..8 * size_of::<libc::cpu_set_t>())
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn a_port_someone_listens_on_is_reported_in_use() {
        let socket = listen(&"127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = local_addr(socket.as_raw_fd()).unwrap();
        let err = ensure_free(&addr).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(socket);
        assert!(ensure_free(&addr).is_ok());
    }

    #[test]
    fn listeners_on_an_address_are_counted() {
        let first = listen(&"127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = local_addr(first.as_raw_fd()).unwrap();
        assert_eq!(listeners_on(&addr), Some(1));
        let second = listen(&addr, 16).unwrap();
        assert_eq!(listeners_on(&addr), Some(2));
        drop((first, second));
        assert_eq!(listeners_on(&addr), Some(0));
    }

    #[test]
    fn listen_rows_are_matched_by_address_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n\
                     0: 0100007F:2329 00000000:0000 0A 00000000:00000000\n\
                     1: 0100007F:2329 0100007F:9C40 01 00000000:00000000\n\
                     2: 00000000:2329 00000000:0000 0A 00000000:00000000\n";
        let addr: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(count_listeners(table, &addr), 1);
        }
        let v6 = "  sl  local_address                         remote_address st\n\
                  0: 00000000000000000000000001000000:2329 00000000000000000000000000000000:0000 0A\n";
        let loopback: SocketAddr = "[::1]:9001".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(count_listeners(v6, &loopback), 1);
        }
    }

    #[test]
    fn listeners_share_a_port_with_reuseport() {
        let first = listen(&"127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = local_addr(first.as_raw_fd()).unwrap();
        assert_ne!(addr.port(), 0);
        let second = listen(&addr, 16).unwrap();
        assert_eq!(local_addr(second.as_raw_fd()).unwrap(), addr);
    }
}
