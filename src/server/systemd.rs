//! Running as a systemd service, without libsystemd: readiness and stop notifications
//! (`sd_notify`), the watchdog, and socket activation (`sd_listen_fds`).
//!
//! [`Server::start`](super::Server::start) notifies by itself when the service manager asks
//! for it. With `NOTIFY_SOCKET` set it sends `READY=1` once every shard listens and
//! `STOPPING=1` when a graceful shutdown begins ([`ServerHandle::request_shutdown`],
//! [`ServerHandle::shutdown`], or a signal in [`ServerHandle::run_until_signal`]; not when a
//! failed shard brings the server down). With `WATCHDOG_USEC` set for this process as well,
//! a thread sends `WATCHDOG=1` every half interval, but only when every running shard's loop
//! has ticked since the previous look (shards tick at least every quarter interval then): a
//! shard stuck in a handler stops the pings, and systemd kills and restarts the service.
//! Socket activation is opt-in, with [`Builder::systemd_socket`].
//!
//! This module never touches the environment: it reads variables, it does not unset them (see
//! [`listen_fds`] for why that is enough).
//!
//! A service for a program whose `main` is
//! `Builder::new().systemd_socket().build(Echo).run()`:
//!
//! ```ini
//! # /etc/systemd/system/ringsock-echo.service
//! [Service]
//! Type=notify
//! ExecStart=/usr/local/bin/ringsock-echo
//! # No WATCHDOG=1 for 10 s (a shard stuck for that long): killed, then restarted.
//! WatchdogSec=10
//! Restart=on-failure
//! ```
//!
//! ```ini
//! # /etc/systemd/system/ringsock-echo.socket
//! # systemd holds the port; connections made while the service (re)starts wait in its queue.
//! [Socket]
//! ListenStream=0.0.0.0:9001
//! Backlog=1024
//!
//! [Install]
//! WantedBy=sockets.target
//! ```
//!
//! Without the `.socket` unit, use [`Builder::addr`] instead of `systemd_socket` (and add an
//! `[Install]` section with `WantedBy=multi-user.target` to the service).
//!
//! [`ServerHandle::request_shutdown`]: super::ServerHandle::request_shutdown
//! [`ServerHandle::shutdown`]: super::ServerHandle::shutdown
//! [`ServerHandle::run_until_signal`]: super::ServerHandle::run_until_signal
//! [`Builder::systemd_socket`]: super::Builder::systemd_socket
//! [`Builder::addr`]: super::Builder::addr

use std::ffi::OsStr;
use std::io;
use std::mem::size_of;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use crate::runtime::command::Mailbox;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`): after stdin, stdout, stderr.
const LISTEN_FDS_START: RawFd = 3;

/// Set once [`listen_fds`] has wrapped the passed descriptors, so no second call wraps them
/// again.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Sends state changes to the service manager over the datagram socket `NOTIFY_SOCKET` names
/// (`sd_notify(3)`).
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    address: SocketAddr,
}

impl Notifier {
    /// A notifier for `NOTIFY_SOCKET`; `None` when it is not set (not run by systemd, or not
    /// as `Type=notify`), so every notification is skipped.
    ///
    /// # Errors
    /// As [`Notifier::new`], naming the variable.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(value) => Notifier::new(&value).map(Some),
        }
    }

    /// A notifier for `address`: an absolute path, or `@name` for an abstract socket.
    ///
    /// # Errors
    /// Any other address (`vsock:` ones are not supported), a path too long for a socket
    /// address, or no socket (descriptor limits).
    pub fn new(address: &OsStr) -> io::Result<Notifier> {
        let bytes = address.as_bytes();
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET={address:?}: {why}"),
            )
        };
        let address = match bytes.split_first() {
            Some((b'@', name)) if !name.is_empty() => SocketAddr::from_abstract_name(name),
            Some((b'/', _)) => SocketAddr::from_pathname(address),
            _ => return Err(bad("neither an absolute path nor an @abstract name")),
        }
        .map_err(|e| bad(&e.to_string()))?;
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            address,
        })
    }

    /// Sends one notification: newline-separated `KEY=value` assignments, such as `READY=1`.
    ///
    /// # Errors
    /// When the datagram cannot be sent (the service manager's socket is gone).
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.address)
            .map(drop)
    }

    /// `READY=1`: startup is complete.
    ///
    /// # Errors
    /// As [`Notifier::notify`].
    pub fn ready(&self) -> io::Result<()> {
        self.notify("READY=1")
    }

    /// `STOPPING=1`: shutdown has begun.
    ///
    /// # Errors
    /// As [`Notifier::notify`].
    pub fn stopping(&self) -> io::Result<()> {
        self.notify("STOPPING=1")
    }

    /// `WATCHDOG=1`: the service is alive.
    ///
    /// # Errors
    /// As [`Notifier::notify`].
    pub fn watchdog(&self) -> io::Result<()> {
        self.notify("WATCHDOG=1")
    }

    /// `STATUS=...`: one line `systemctl status` shows (line breaks become spaces).
    ///
    /// # Errors
    /// As [`Notifier::notify`].
    pub fn status(&self, text: &str) -> io::Result<()> {
        self.notify(&format!("STATUS={}", text.replace(['\n', '\r'], " ")))
    }
}

/// The watchdog interval systemd expects `WATCHDOG=1` within (`WatchdogSec=`), from
/// `WATCHDOG_USEC`; `None` when it is not set, or `WATCHDOG_PID` names another process.
///
/// # Errors
/// A value that is not a positive number (or a pid), naming the variable.
pub fn watchdog_interval() -> io::Result<Option<Duration>> {
    parse_watchdog(
        env("WATCHDOG_USEC")?.as_deref(),
        env("WATCHDOG_PID")?.as_deref(),
        std::process::id(),
    )
}

/// A socket passed by systemd.
#[derive(Debug)]
#[non_exhaustive]
pub struct ListenFd {
    /// The listening socket.
    pub fd: OwnedFd,
    /// Its name (`FileDescriptorName=` in the socket unit, by default the unit's name);
    /// `unknown` when systemd passed no names.
    pub name: String,
}

/// The sockets systemd passed to this process (socket activation, `sd_listen_fds(3)`): the
/// `LISTEN_FDS` descriptors from 3 on, named by `LISTEN_FDNAMES`, when `LISTEN_PID` is this
/// process; else none. Each is checked to be a listening stream socket and gets
/// `FD_CLOEXEC`, so programs this one starts do not inherit it.
///
/// The variables are left as they are. Unsetting them is sound only before any other thread
/// runs (another thread may be reading the environment), which a library cannot know; and
/// there is no need: a child process has another pid, so `LISTEN_PID` does not name it, and
/// within this process only the first call takes the descriptors.
///
/// # Errors
/// A malformed variable or a passed descriptor that is not a listening stream socket (the
/// message names the variable or the descriptor), or a second call after one that returned
/// sockets.
pub fn listen_fds() -> io::Result<Vec<ListenFd>> {
    let passed = parse_listen_env(
        env("LISTEN_PID")?.as_deref(),
        env("LISTEN_FDS")?.as_deref(),
        env("LISTEN_FDNAMES")?.as_deref(),
        std::process::id(),
    )?;
    if passed.is_empty() {
        return Ok(Vec::new());
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "LISTEN_FDS: the passed sockets were already taken by an earlier call",
        ));
    }
    for (fd, _) in &passed {
        check_listening(*fd)
            .and_then(|()| set_cloexec(*fd))
            .map_err(|e| io::Error::new(e.kind(), format!("LISTEN_FDS: descriptor {fd}: {e}")))?;
    }
    passed
        .into_iter()
        .map(|(fd, name)| {
            // SAFETY: LISTEN_PID names this process, so the service manager passed it these
            // descriptors; each is open (`check_listening` succeeded on it) and has no owner
            // in this process yet, since `TAKEN` lets only this one call wrap them.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            Ok(ListenFd { fd, name })
        })
        .collect()
}

/// Checks that `fd` is a listening stream socket.
///
/// # Errors
/// Not open, not a socket, not a stream socket, or not listening.
pub(crate) fn check_listening(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an integer descriptor; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not open"));
    }
    let socket_type = int_option(fd, libc::SO_TYPE).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTSOCK) => io::Error::new(io::ErrorKind::InvalidInput, "not a socket"),
        _ => e,
    })?;
    if socket_type != libc::SOCK_STREAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a stream socket",
        ));
    }
    if int_option(fd, libc::SO_ACCEPTCONN)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a socket that does not listen",
        ));
    }
    Ok(())
}

/// Sets `FD_CLOEXEC`: programs this one starts do not inherit `fd`.
fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an integer descriptor; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An integer `SOL_SOCKET` option.
fn int_option(fd: RawFd, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` live on this frame and `len` is the size of `value`.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// An environment variable, `None` when unset.
fn env(name: &str) -> io::Result<Option<String>> {
    match std::env::var(name) {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(value)) => Err(invalid(name, &value, "not UTF-8")),
    }
}

fn invalid(name: &str, value: &dyn std::fmt::Debug, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{name}={value:?}: {why}"),
    )
}

/// A number in a variable (systemd writes plain decimal).
fn number<T: std::str::FromStr>(name: &str, value: &str) -> io::Result<T> {
    value
        .parse()
        .map_err(|_| invalid(name, &value, "not a number"))
}

/// `WATCHDOG_USEC` and `WATCHDOG_PID` as [`watchdog_interval`] reads them.
fn parse_watchdog(
    usec: Option<&str>,
    pid: Option<&str>,
    our_pid: u32,
) -> io::Result<Option<Duration>> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    if let Some(pid) = pid {
        if number::<u32>("WATCHDOG_PID", pid)? != our_pid {
            return Ok(None);
        }
    }
    match number::<u64>("WATCHDOG_USEC", usec)? {
        0 => Err(invalid("WATCHDOG_USEC", &usec, "zero")),
        usec => Ok(Some(Duration::from_micros(usec))),
    }
}

/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` as [`listen_fds`] reads them: each passed
/// descriptor with its name, none unless `LISTEN_PID` is `our_pid`.
fn parse_listen_env(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    our_pid: u32,
) -> io::Result<Vec<(RawFd, String)>> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    if number::<u32>("LISTEN_PID", pid)? != our_pid {
        return Ok(Vec::new());
    }
    let count: RawFd = number("LISTEN_FDS", fds)?;
    if !(0..=RawFd::MAX - LISTEN_FDS_START).contains(&count) {
        return Err(invalid("LISTEN_FDS", &fds, "out of range"));
    }
    if count == 0 {
        return Ok(Vec::new());
    }
    let names: Vec<String> = match names {
        Some(names) => names.split(':').map(str::to_owned).collect(),
        None => vec!["unknown".to_owned(); count as usize],
    };
    if names.len() != count as usize {
        return Err(invalid(
            "LISTEN_FDNAMES",
            &names.join(":"),
            &format!("{} names for LISTEN_FDS={count}", names.len()),
        ));
    }
    Ok((LISTEN_FDS_START..).zip(names).collect())
}

/// What this server tells the service manager: nothing without `NOTIFY_SOCKET`.
pub(crate) struct Service {
    notifier: Option<Arc<Notifier>>,
    /// The watchdog interval, when the watchdog applies to this process.
    watchdog: Option<Duration>,
    /// `STOPPING=1` was sent.
    stopping: AtomicBool,
    /// Ends the watchdog thread when sent to or dropped.
    stop_watchdog: Option<mpsc::Sender<()>>,
}

impl Service {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    ///
    /// # Errors
    /// A malformed variable, naming it.
    pub fn from_env() -> io::Result<Service> {
        let notifier = Notifier::from_env()?.map(Arc::new);
        let watchdog = match notifier {
            Some(_) => watchdog_interval()?,
            None => None,
        };
        Ok(Service {
            notifier,
            watchdog,
            stopping: AtomicBool::new(false),
            stop_watchdog: None,
        })
    }

    /// The longest sweep interval the shards may have: a quarter of the watchdog interval,
    /// so that each look, every half interval, finds a live shard's heartbeat advanced.
    pub fn max_tick(&self) -> Option<Duration> {
        self.watchdog.map(|interval| interval / 4)
    }

    /// Every shard listens: starts the watchdog thread, then sends `READY=1`.
    ///
    /// # Errors
    /// The watchdog thread cannot be spawned (without it systemd would kill the service).
    pub fn ready(&mut self, mailboxes: &Arc<[Arc<Mailbox>]>) -> io::Result<()> {
        let Some(notifier) = &self.notifier else {
            return Ok(());
        };
        if let Some(interval) = self.watchdog {
            let (tx, rx) = mpsc::channel();
            let (notifier, mailboxes) = (Arc::clone(notifier), Arc::clone(mailboxes));
            thread::Builder::new()
                .name("ringsock-watchdog".to_owned())
                .spawn(move || watch(&notifier, interval / 2, &mailboxes, &rx))?;
            self.stop_watchdog = Some(tx);
        }
        if let Err(e) = notifier.ready() {
            tracing::warn!(error = %e, "cannot send READY=1 to the service manager");
        }
        Ok(())
    }

    /// Graceful shutdown begins: `STOPPING=1`, once.
    pub fn stopping(&self) {
        if let Some(notifier) = &self.notifier {
            if !self.stopping.swap(true, Ordering::SeqCst) {
                if let Err(e) = notifier.stopping() {
                    tracing::warn!(error = %e, "cannot send STOPPING=1 to the service manager");
                }
            }
        }
    }

    /// Every shard has stopped: the watchdog thread ends.
    pub fn stopped(&self) {
        if let Some(stop) = &self.stop_watchdog {
            let _ = stop.send(());
        }
    }
}

/// The watchdog thread: every `period`, `WATCHDOG=1` if every running shard's heartbeat
/// advanced since the previous look. A stopped shard is not stuck and is left out; the
/// thread ends once every shard stopped, or when `stop` is sent to or dropped.
fn watch(
    notifier: &Notifier,
    period: Duration,
    mailboxes: &[Arc<Mailbox>],
    stop: &mpsc::Receiver<()>,
) {
    let mut seen: Vec<u64> = mailboxes.iter().map(|m| m.heartbeat()).collect();
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(period) {
        if mailboxes.iter().all(|m| m.is_stopped()) {
            return;
        }
        let mut alive = true;
        for (mailbox, seen) in mailboxes.iter().zip(&mut seen) {
            let beat = mailbox.heartbeat();
            if beat == *seen && !mailbox.is_stopped() {
                tracing::debug!(
                    shard = mailbox.id,
                    "watchdog: the shard has not ticked; no WATCHDOG=1"
                );
                alive = false;
            }
            *seen = beat;
        }
        if alive {
            if let Err(e) = notifier.watchdog() {
                tracing::debug!(error = %e, "cannot send WATCHDOG=1");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn kind<T: std::fmt::Debug>(result: io::Result<T>) -> (io::ErrorKind, String) {
        let e = result.unwrap_err();
        (e.kind(), e.to_string())
    }

    #[test]
    fn listen_fds_are_ours_only_when_listen_pid_names_us() {
        let ours = parse_listen_env(Some("42"), Some("2"), None, 42).unwrap();
        assert_eq!(
            ours,
            vec![(3, "unknown".to_owned()), (4, "unknown".to_owned())]
        );
        assert!(parse_listen_env(Some("41"), Some("2"), None, 42)
            .unwrap()
            .is_empty());
        assert!(parse_listen_env(None, Some("2"), None, 42)
            .unwrap()
            .is_empty());
        assert!(parse_listen_env(Some("42"), None, None, 42)
            .unwrap()
            .is_empty());
        assert!(parse_listen_env(Some("42"), Some("0"), None, 42)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn listen_fds_carry_their_names() {
        let named = parse_listen_env(Some("7"), Some("2"), Some("web:admin"), 7).unwrap();
        assert_eq!(named, vec![(3, "web".to_owned()), (4, "admin".to_owned())]);
    }

    #[test]
    fn malformed_listen_variables_are_named_in_the_error() {
        let (k, msg) = kind(parse_listen_env(Some("x"), Some("1"), None, 7));
        assert_eq!(k, io::ErrorKind::InvalidInput);
        assert!(msg.contains("LISTEN_PID"), "{msg}");
        let (_, msg) = kind(parse_listen_env(Some("7"), Some("-1"), None, 7));
        assert!(msg.contains("LISTEN_FDS"), "{msg}");
        let (_, msg) = kind(parse_listen_env(Some("7"), Some("2147483647"), None, 7));
        assert!(msg.contains("LISTEN_FDS"), "{msg}");
        let (_, msg) = kind(parse_listen_env(Some("7"), Some("2"), Some("one"), 7));
        assert!(msg.contains("LISTEN_FDNAMES"), "{msg}");
    }

    #[test]
    fn watchdog_applies_unless_another_pid_is_named() {
        let half = Some(Duration::from_millis(500));
        assert_eq!(parse_watchdog(Some("500000"), None, 9).unwrap(), half);
        assert_eq!(parse_watchdog(Some("500000"), Some("9"), 9).unwrap(), half);
        assert_eq!(parse_watchdog(Some("500000"), Some("8"), 9).unwrap(), None);
        assert_eq!(parse_watchdog(None, Some("9"), 9).unwrap(), None);
        let (_, msg) = kind(parse_watchdog(Some("0"), None, 9));
        assert!(msg.contains("WATCHDOG_USEC"), "{msg}");
        let (_, msg) = kind(parse_watchdog(Some("10s"), None, 9));
        assert!(msg.contains("WATCHDOG_USEC"), "{msg}");
        let (_, msg) = kind(parse_watchdog(Some("1"), Some("me"), 9));
        assert!(msg.contains("WATCHDOG_PID"), "{msg}");
    }

    #[test]
    fn notifies_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("ringsock-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let manager = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::new(path.as_os_str()).unwrap();
        notifier.ready().unwrap();
        notifier.status("serving\non 2 shards").unwrap();
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=serving on 2 shards");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn notifies_an_abstract_socket() {
        let name = format!("ringsock-notify-test-{}", std::process::id());
        let manager =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let notifier = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        notifier.stopping().unwrap();
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn rejects_notify_addresses_it_cannot_reach() {
        for bad in ["", "@", "relative/path", "vsock:2:1234"] {
            let (k, msg) = kind(Notifier::new(OsStr::new(bad)));
            assert_eq!(k, io::ErrorKind::InvalidInput, "{bad}");
            assert!(msg.contains("NOTIFY_SOCKET"), "{msg}");
        }
    }

    #[test]
    fn only_listening_stream_sockets_pass_the_check() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        check_listening(listener.as_raw_fd()).unwrap();
        let connected = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_, msg) = kind(check_listening(connected.as_raw_fd()));
        assert!(msg.contains("does not listen"), "{msg}");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (_, msg) = kind(check_listening(udp.as_raw_fd()));
        assert!(msg.contains("not a stream socket"), "{msg}");
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let (_, msg) = kind(check_listening(file.as_raw_fd()));
        assert!(msg.contains("not a socket"), "{msg}");
    }
}
