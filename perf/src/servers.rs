//! The servers under test: the peers' echo servers (run in-process by the hidden `serve`
//! subcommand) and [`ServerProc`], a pinned child process that is always killed when dropped.
//!
//! Each peer runs in its fastest single-threaded setup: a tokio current_thread runtime,
//! TCP_NODELAY, no compression, limits raised to carry 16 MiB messages in up to 65536 fragments.
//! The echo loops are written the way each crate's own echo example is, with write batching
//! where the crate offers it (feed, then flush when the read side would block).

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{ready, Poll};
use std::time::{Duration, Instant};

use futures_util::{Sink, Stream};
use tokio::net::TcpListener;

/// Largest message the peers are configured to accept: the biggest scenario uses 16 MiB.
const MAX_MESSAGE: usize = 32 << 20;

/// A server the comparison can start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// ringsock's `examples/echo`, run from the given binary with `--shards 1`.
    Ringsock(PathBuf),
    /// A peer, run by this binary's `serve` subcommand.
    Peer(Peer),
}

/// The peer crates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// tokio-websockets 0.13.
    TokioWebsockets,
    /// fastwebsockets 0.10 behind hyper 1.
    Fastwebsockets,
    /// tokio-tungstenite 0.30.
    TokioTungstenite,
    /// tokio-tungstenite 0.30 as a publish/subscribe server on `tokio::sync::broadcast`
    /// (fan-out scenarios).
    TokioTungsteniteFanout,
    /// tokio-tungstenite 0.30 on tokio-rustls 0.26 (`ring` provider): the wss:// peer.
    TokioTungsteniteTls,
}

impl Peer {
    /// Every peer, in table order.
    pub const ALL: [Peer; 5] = [
        Peer::TokioWebsockets,
        Peer::Fastwebsockets,
        Peer::TokioTungstenite,
        Peer::TokioTungsteniteFanout,
        Peer::TokioTungsteniteTls,
    ];

    /// The name used on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Peer::TokioWebsockets => "tokio-websockets",
            Peer::Fastwebsockets => "fastwebsockets",
            Peer::TokioTungstenite => "tokio-tungstenite",
            Peer::TokioTungsteniteFanout => "tokio-tungstenite-fanout",
            Peer::TokioTungsteniteTls => "tokio-tungstenite-tls",
        }
    }

    /// Whether this peer serves the fan-out scenarios (publish/subscribe), not echo.
    pub fn is_fanout(self) -> bool {
        self == Peer::TokioTungsteniteFanout
    }

    /// Whether this peer serves wss:// (and needs `--cert` and `--key`).
    pub fn is_tls(self) -> bool {
        self == Peer::TokioTungsteniteTls
    }

    /// Parses a peer name.
    pub fn parse(name: &str) -> Option<Peer> {
        Peer::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl Kind {
    /// The name used in tables.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Ringsock(_) => "ringsock",
            Kind::Peer(p) => p.name(),
        }
    }

    /// The command line that starts this server on `addr`.
    fn command(&self, addr: SocketAddr) -> io::Result<(String, PathBuf, Vec<String>)> {
        let addr = addr.to_string();
        Ok(match self {
            Kind::Ringsock(bin) => (
                self.name().into(),
                bin.clone(),
                vec!["--addr".into(), addr, "--shards".into(), "1".into()],
            ),
            Kind::Peer(p) => (
                self.name().into(),
                std::env::current_exe()?,
                vec!["serve".into(), p.name().into(), "--addr".into(), addr],
            ),
        })
    }
}

/// A running server child. Dropping it kills the child (SIGTERM, then SIGKILL after 2 s); the
/// child also gets SIGKILL if this process dies (PR_SET_PDEATHSIG).
#[derive(Debug)]
pub struct ServerProc {
    child: Child,
}

impl ServerProc {
    /// Starts `kind` on `addr`, pinned to `core` if given, optionally under `wrapper` (e.g.
    /// valgrind), and waits until it accepts connections.
    ///
    /// # Errors
    ///
    /// The binary cannot be started, or does not accept connections within `ready_timeout`.
    pub fn start(
        kind: &Kind,
        addr: SocketAddr,
        core: Option<usize>,
        wrapper: &[String],
        ready_timeout: Duration,
    ) -> Result<ServerProc, String> {
        ServerProc::start_with(kind, addr, core, wrapper, &[], None, ready_timeout)
    }

    /// [`ServerProc::start`] with `extra` arguments after the server's own (e.g. a broker URL),
    /// and with its stdout and stderr appended to `log` if given.
    ///
    /// # Errors
    ///
    /// As [`ServerProc::start`]; also when `log` cannot be opened.
    pub fn start_with(
        kind: &Kind,
        addr: SocketAddr,
        core: Option<usize>,
        wrapper: &[String],
        extra: &[String],
        log: Option<&Path>,
        ready_timeout: Duration,
    ) -> Result<ServerProc, String> {
        let (name, bin, mut args) = kind.command(addr).map_err(|e| e.to_string())?;
        args.extend_from_slice(extra);
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.args(&args);
        let Some(log) = log else {
            let output = (Stdio::null(), Stdio::inherit());
            return ServerProc::spawn(&name, cmd, addr, core, output, ready_timeout);
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let copy = file.try_clone().map_err(|e| e.to_string())?;
        let output = (Stdio::from(copy), Stdio::from(file));
        ServerProc::spawn(&name, cmd, addr, core, output, ready_timeout)
            .map_err(|e| format!("{e} (log: {})", log.display()))
    }

    /// Starts `cmd` (stdin closed, stdout and stderr to `output`) as a child that dies with
    /// this process, pinned to `core` if given, and waits until `addr` accepts connections.
    ///
    /// # Errors
    ///
    /// The binary cannot be started, exits, or does not accept connections in time.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        addr: SocketAddr,
        core: Option<usize>,
        output: (Stdio, Stdio),
        ready_timeout: Duration,
    ) -> Result<ServerProc, String> {
        if let Some(core) = core {
            crate::sys::check_core(core).map_err(|e| e.to_string())?;
        }
        cmd.stdin(Stdio::null()).stdout(output.0).stderr(output.1);
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (prctl, sched_setaffinity); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(core) = core {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(core, &mut set);
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("start {name} ({:?}): {e}", cmd.get_program()))?;
        let mut server = ServerProc { child };
        let start = Instant::now();
        loop {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("{name} exited at start: {status}"));
            }
            if start.elapsed() > ready_timeout || crate::sys::interrupted() {
                return Err(format!(
                    "{name} not accepting on {addr} after {ready_timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the child: SIGTERM, then SIGKILL if it has not exited after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        self.stop_poking(grace, None);
    }

    /// Like [`stop`](Self::stop), but while waiting, connects to `poke` every 200 ms. Valgrind
    /// runs one guest thread at a time and (3.19) holds its lock across `io_uring_enter`, so a
    /// server blocked there never runs its SIGTERM handler until some I/O completes; a connection
    /// provides that I/O, and the server exits and valgrind writes its counts.
    pub fn stop_poking(&mut self, grace: Duration, poke: Option<SocketAddr>) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet (try_wait above
        // returned no status), so the pid cannot have been reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        let mut last_poke = start;
        while start.elapsed() < grace {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            if let Some(addr) = poke.filter(|_| last_poke.elapsed() >= Duration::from_millis(200)) {
                last_poke = Instant::now();
                let _ = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

/// A free loopback port: bind port 0, note the port, release it.
pub fn free_addr() -> Result<SocketAddr, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map_err(|e| e.to_string())
}

/// Entry point of `serve PEER --addr ADDR [--cert CERT --key KEY]`: runs that peer's echo
/// server until killed; the TLS peer serves wss:// with `tls`.
///
/// # Errors
///
/// The address cannot be bound.
pub fn serve(
    peer: Peer,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| e.to_string())?;
    if peer.is_fanout() {
        return rt.block_on(fanout::serve(addr));
    }
    if peer.is_tls() {
        let tls = tls.ok_or("tokio-tungstenite-tls needs --cert and --key")?;
        return rt.block_on(serve_tls(addr, tokio_rustls::TlsAcceptor::from(tls)));
    }
    rt.block_on(async move {
        let listener = TcpListener::bind(addr).await.map_err(|e| e.to_string())?;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            // Each crate's example runs the connection task unconstrained (no coop budget).
            tokio::spawn(tokio::task::unconstrained(async move {
                match peer {
                    Peer::TokioWebsockets => tokio_websockets_conn(stream).await,
                    Peer::Fastwebsockets => fastwebsockets_conn(stream).await,
                    Peer::TokioTungstenite => tokio_tungstenite_conn(stream).await,
                    Peer::TokioTungsteniteFanout | Peer::TokioTungsteniteTls => {
                        unreachable!("served by fanout::serve and serve_tls")
                    }
                }
            }));
        }
    })
}

/// The wss:// peer: tokio-tungstenite on a tokio-rustls stream, as tokio-tungstenite's own
/// TLS setup does it (accept TLS, then the WebSocket handshake on the TLS stream), with the
/// plain peer's batched echo. rustls' default buffers and record sizes.
async fn serve_tls(addr: SocketAddr, acceptor: tokio_rustls::TlsAcceptor) -> Result<(), String> {
    let listener = TcpListener::bind(addr).await.map_err(|e| e.to_string())?;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(tokio::task::unconstrained(async move {
            let Ok(stream) = acceptor.accept(stream).await else {
                return;
            };
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .max_message_size(Some(MAX_MESSAGE))
                .max_frame_size(Some(MAX_MESSAGE));
            let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
            else {
                return;
            };
            echo_batched(ws, |m: &tokio_tungstenite::tungstenite::Message| {
                m.is_binary() || m.is_text()
            })
            .await;
        }));
    }
}

/// tokio-websockets: `ServerBuilder::accept`, whole-message frames out, batched echo.
async fn tokio_websockets_conn(stream: tokio::net::TcpStream) {
    let builder = tokio_websockets::ServerBuilder::new()
        .config(tokio_websockets::Config::default().frame_size(MAX_MESSAGE))
        .limits(tokio_websockets::Limits::default().max_payload_len(Some(MAX_MESSAGE)));
    let Ok((_, ws)) = builder.accept(stream).await else {
        return;
    };
    echo_batched(ws, |m: &tokio_websockets::Message| {
        m.is_binary() || m.is_text()
    })
    .await;
}

/// tokio-tungstenite: `accept_async_with_config`, batched echo.
async fn tokio_tungstenite_conn(stream: tokio::net::TcpStream) {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    echo_batched(ws, |m: &tokio_tungstenite::tungstenite::Message| {
        m.is_binary() || m.is_text()
    })
    .await;
}

/// fastwebsockets behind hyper 1's upgrade, with `FragmentCollector` as in its echo example.
async fn fastwebsockets_conn(stream: tokio::net::TcpStream) {
    use hyper::service::service_fn;
    let io = hyper_util::rt::TokioIo::new(stream);
    let service = service_fn(
        |mut req: hyper::Request<hyper::body::Incoming>| async move {
            let (response, fut) = fastwebsockets::upgrade::upgrade(&mut req)?;
            tokio::spawn(tokio::task::unconstrained(async move {
                let Ok(mut ws) = fut.await else { return };
                ws.set_max_message_size(MAX_MESSAGE);
                ws.set_auto_close(true);
                ws.set_auto_pong(true);
                let mut ws = fastwebsockets::FragmentCollector::new(ws);
                while let Ok(frame) = ws.read_frame().await {
                    use fastwebsockets::OpCode;
                    let echo = matches!(frame.opcode, OpCode::Text | OpCode::Binary);
                    if frame.opcode == OpCode::Close
                        || (echo && ws.write_frame(frame).await.is_err())
                    {
                        break;
                    }
                }
            }));
            Ok::<_, fastwebsockets::WebSocketError>(response)
        },
    );
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .with_upgrades()
        .await;
}

/// Echoes every data message of a `Stream + Sink` WebSocket: messages are fed while more are
/// ready and flushed once the read side would block, so a pipelined burst is one write.
async fn echo_batched<W, M, E>(mut ws: W, is_data: fn(&M) -> bool)
where
    W: Stream<Item = Result<M, E>> + Sink<M> + Unpin,
{
    let mut held: Option<M> = None;
    poll_fn(|cx| loop {
        if let Some(m) = held.take() {
            match Pin::new(&mut ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    if Pin::new(&mut ws).start_send(m).is_err() {
                        return Poll::Ready(());
                    }
                }
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => {
                    held = Some(m);
                    return Poll::Pending;
                }
            }
        }
        match Pin::new(&mut ws).poll_next(cx) {
            Poll::Ready(Some(Ok(m))) => {
                if is_data(&m) {
                    held = Some(m);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                let _ = ready!(Pin::new(&mut ws).poll_flush(cx));
                return Poll::Ready(());
            }
            Poll::Pending => {
                return match Pin::new(&mut ws).poll_flush(cx) {
                    Poll::Ready(Ok(())) | Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(_)) => Poll::Ready(()),
                };
            }
        }
    })
    .await;
}

/// The fan-out peer: tokio-tungstenite with one `tokio::sync::broadcast` channel per topic, the
/// way a tokio application fans out. `/sub/TOPIC` subscribes the connection's task to the
/// topic's channel; every message from `/pub/TOPIC` is sent into it unchanged. One task per
/// connection on the current-thread runtime, with tokio's cooperative budget left on (a
/// publisher task yields to subscribers after its budget instead of running ahead).
mod fanout {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    use tokio_tungstenite::tungstenite::http::StatusCode;
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
    use tokio_tungstenite::tungstenite::Message;

    use super::MAX_MESSAGE;

    /// Messages a topic's channel holds. A subscriber that falls further behind skips to the
    /// oldest one still held (`RecvError::Lagged`), which the generator counts as lost.
    /// 1024 covers every closed-loop window the scenarios use.
    const CAPACITY: usize = 1024;

    type Topics = Arc<Mutex<HashMap<String, broadcast::Sender<Message>>>>;

    /// Accepts connections until killed.
    pub async fn serve(addr: SocketAddr) -> Result<(), String> {
        let listener = TcpListener::bind(addr).await.map_err(|e| e.to_string())?;
        let topics = Topics::default();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(conn(stream, Arc::clone(&topics)));
        }
    }

    /// The sender of `topic`'s channel, created on first use.
    fn channel(topics: &Topics, topic: &str) -> broadcast::Sender<Message> {
        let mut map = topics.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(topic.to_owned())
            .or_insert_with(|| broadcast::channel(CAPACITY).0)
            .clone()
    }

    // The handshake callback's error type is tungstenite's `ErrorResponse`, not ours to box.
    #[allow(clippy::result_large_err)]
    async fn conn(stream: TcpStream, topics: Topics) {
        let mut path = String::new();
        let route = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            path = req.uri().path().to_owned();
            if path.starts_with("/sub/") || path.starts_with("/pub/") {
                Ok(resp)
            } else {
                let mut not_found = ErrorResponse::new(None);
                *not_found.status_mut() = StatusCode::NOT_FOUND;
                Err(not_found)
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let Ok(mut ws) =
            tokio_tungstenite::accept_hdr_async_with_config(stream, route, Some(config)).await
        else {
            return;
        };
        if let Some(topic) = path.strip_prefix("/pub/") {
            let tx = channel(&topics, topic);
            while let Some(Ok(msg)) = ws.next().await {
                match msg {
                    // No subscribers is not an error for a publisher.
                    Message::Binary(_) | Message::Text(_) => drop(tx.send(msg)),
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            return;
        }
        let topic = path.strip_prefix("/sub/").unwrap_or_default();
        let mut rx = channel(&topics, topic).subscribe();
        loop {
            tokio::select! {
                got = rx.recv() => {
                    let msg = match got {
                        Ok(msg) => msg,
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => break,
                    };
                    // Everything else already waiting goes out in the same write.
                    if ws.feed(msg).await.is_err() {
                        break;
                    }
                    loop {
                        match rx.try_recv() {
                            Ok(msg) => {
                                if ws.feed(msg).await.is_err() {
                                    return;
                                }
                            }
                            Err(TryRecvError::Lagged(_)) => continue,
                            Err(_) => break,
                        }
                    }
                    if ws.flush().await.is_err() {
                        break;
                    }
                }
                incoming = ws.next() => match incoming {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
            }
        }
    }
}
