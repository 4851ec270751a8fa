//! Running ringsock as a service (issue 13): the metrics snapshot after a scripted exchange,
//! the Prometheus endpoint read by a real parser, plain HTTP with keep-alive, pipelining and
//! bodies, and upgrades decided at once, later from another thread, or never.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{wait_for, wait_idle, RawClient};
use ringsock::proto::handshake::{HttpError, Request};
use ringsock::proto::{CloseCode, ProtocolError};
use ringsock::server::{
    Builder, Decision, Handler, HttpResponse, Message, PendingUpgrade, ServerHandle, Upgrade, Ws,
};

/// A handler with a route for each behaviour under test.
#[derive(Default)]
struct Service {
    /// Deferred upgrades that are never answered (kept so their drop does not answer).
    parked: Mutex<Vec<PendingUpgrade<String>>>,
    /// Deferred decisions wait until the test opens this gate.
    gate: Arc<Gate>,
}

/// A gate threads wait on until it opens.
#[derive(Default)]
struct Gate(Mutex<bool>, Condvar);

impl Gate {
    fn open(&self) {
        *self.0.lock().unwrap() = true;
        self.1.notify_all();
    }

    fn wait(&self) {
        let mut open = self.0.lock().unwrap();
        while !*open {
            open = self.1.wait(open).unwrap();
        }
    }
}

impl Handler for Service {
    type State = String;

    fn on_upgrade(&self, req: &Request<'_>, upgrade: &mut Upgrade<String>) -> Decision<String> {
        match req.path_only() {
            "/ws" => Decision::Accept(String::new()),
            "/reject" => HttpError::Forbidden.into(),
            "/cookie" => match req.cookie("token") {
                Some("secret") => {
                    upgrade.header("Set-Cookie", "seen=1; HttpOnly");
                    Decision::Accept(req.query_param("user").unwrap_or("").to_owned())
                }
                _ => Decision::Reject(
                    HttpResponse::new(401)
                        .header("WWW-Authenticate", "Cookie")
                        .body("no token\n"),
                ),
            },
            "/defer" => {
                let mut pending = upgrade.defer();
                let user = req.query_param("user").unwrap_or("").to_owned();
                // Another thread decides, as a database lookup would, once the test lets it.
                let gate = Arc::clone(&self.gate);
                thread::spawn(move || {
                    gate.wait();
                    if user == "alice" {
                        pending.header("Set-Cookie", "session=alice");
                        pending.accept(user);
                    } else {
                        pending.reject(HttpResponse::new(403).body("unknown user\n"));
                    }
                });
                Decision::Defer
            }
            "/never" => {
                self.parked.lock().unwrap().push(upgrade.defer());
                Decision::Defer
            }
            _ => HttpError::NotFound.into(),
        }
    }

    fn on_open(&self, ws: &mut Ws<'_, String>) {
        if !ws.state().is_empty() {
            let hello = format!("hello {}", ws.state());
            ws.send_text(&hello);
        }
    }

    fn on_message(&self, ws: &mut Ws<'_, String>, msg: Message<'_>) {
        match msg {
            Message::Text("boom") => panic!("boom (on purpose)"),
            Message::Text("flood") => {
                for _ in 0..4 {
                    ws.send_binary(&[7u8; 65536]);
                }
            }
            msg => {
                ws.send(msg);
            }
        }
    }

    fn on_http(&self, req: &Request<'_>) -> Option<HttpResponse> {
        match (req.method(), req.path_only()) {
            ("GET" | "HEAD", "/healthz") => Some(HttpResponse::text("ok\n")),
            ("POST", "/echo") => Some(
                HttpResponse::new(200)
                    .header("Content-Type", "application/octet-stream")
                    .body(req.body()),
            ),
            ("GET", "/empty") => Some(HttpResponse::new(204).body("ignored")),
            ("GET", "/forged") => Some(HttpResponse {
                status: 200,
                headers: vec![
                    ("X-Ok".to_owned(), "1".to_owned()),
                    ("X-Bad".to_owned(), "a\r\nSet-Cookie: evil=1".to_owned()),
                ],
                body: b"forged\n".to_vec(),
                close: false,
            }),
            ("GET", "/odd-status") => Some(HttpResponse::new(42)),
            ("GET", "/bye") => {
                let mut response = HttpResponse::text("bye\n");
                response.close = true;
                Some(response)
            }
            _ => Some(HttpResponse::not_found()),
        }
    }
}

fn start(configure: impl FnOnce(Builder) -> Builder) -> ServerHandle {
    start_with(configure, Service::default())
}

fn start_with(configure: impl FnOnce(Builder) -> Builder, service: Service) -> ServerHandle {
    configure(
        Builder::new()
            .addr("127.0.0.1:0")
            .shards(1)
            .pin_threads(false)
            .close_timeout(Duration::from_secs(2)),
    )
    .build(service)
    .start()
    .expect("server starts")
}

fn upgraded(addr: std::net::SocketAddr, path: &str) -> RawClient {
    let mut c = RawClient::connect_tcp(addr);
    let head = c.request(path, "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    c
}

#[test]
fn the_metrics_snapshot_counts_a_scripted_exchange_exactly() {
    let handle = start(|b| {
        b.max_frame_size(1000)
            .high_water_mark(64 * 1024)
            .metrics_path("/metrics")
    });
    let addr = handle.local_addr();

    // 10 messages of 100 bytes echoed, then a clean close.
    let mut a = upgraded(addr, "/ws");
    for _ in 0..10 {
        a.send_frame(true, 1, &[b'x'; 100]);
        assert_eq!(a.read_frame().payload.len(), 100);
    }
    a.send_frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(a.read_close(), Some(1000));
    // An unmasked frame: 1002.
    let mut b = upgraded(addr, "/ws");
    b.send(&[0x81, 0x02, b'h', b'i']);
    assert_eq!(b.read_close(), Some(1002));
    // A frame over the 1000-byte limit: 1009.
    let mut c = upgraded(addr, "/ws");
    c.send_frame(true, 2, &[0u8; 2000]);
    assert_eq!(c.read_close(), Some(1009));
    // A handler panic: 1011.
    let mut d = upgraded(addr, "/ws");
    d.send_frame(true, 1, b"boom");
    assert_eq!(d.read_close(), Some(1011));
    // 256 KiB of replies over a 64 KiB mark: one backpressure episode, drained as we read.
    let mut e = upgraded(addr, "/ws");
    e.send_frame(true, 1, b"flood");
    thread::sleep(Duration::from_millis(200));
    for _ in 0..4 {
        assert_eq!(e.read_frame().payload.len(), 65536);
    }
    e.send_frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(e.read_close(), Some(1000));
    // A plain request and a refused upgrade.
    let mut h = RawClient::connect_tcp(addr);
    h.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(h.read_response().0.starts_with("HTTP/1.1 200"));
    let mut r = RawClient::connect_tcp(addr);
    assert!(r.request("/reject", "").starts_with("HTTP/1.1 403"));
    drop((a, b, c, d, e, h, r));
    wait_idle(&handle);

    let m = handle.metrics();
    assert_eq!(m.accepted, 7);
    assert_eq!(m.upgrades, 5);
    assert_eq!(m.http_requests, 1);
    assert_eq!(m.handshakes_failed.get(403), 1);
    assert_eq!(m.handshakes_failed.total(), 1);
    assert_eq!(m.received.messages, 12, "10 + boom + flood");
    assert_eq!(m.received.bytes, 1000 + 4 + 5);
    assert_eq!(m.received.compressed_messages, 0);
    assert_eq!(m.sent.messages, 14, "10 echoes + 4 flood messages");
    assert_eq!(m.sent.bytes, 1000 + 4 * 65536);
    assert_eq!(m.closes_received.get(Some(CloseCode::NORMAL)), 2);
    assert_eq!(m.closes_received.total(), 2);
    assert_eq!(m.closes_sent.get(Some(CloseCode::NORMAL)), 2);
    assert_eq!(m.closes_sent.get(Some(CloseCode::PROTOCOL)), 1);
    assert_eq!(m.closes_sent.get(Some(CloseCode::TOO_BIG)), 1);
    assert_eq!(m.closes_sent.get(Some(CloseCode::INTERNAL)), 1);
    assert_eq!(m.closes_sent.total(), 5);
    assert_eq!(m.protocol_errors.get(ProtocolError::UnmaskedFrame), 1);
    assert_eq!(m.protocol_errors.get(ProtocolError::FrameTooBig), 1);
    assert_eq!(m.protocol_errors.total(), 2);
    assert_eq!(m.handler_panics, 1);
    assert_eq!(m.backpressure_entered, 1);
    assert_eq!(m.backpressure_drained, 1);
    assert_eq!(m.dropped_over_cap, 0);
    assert_eq!(m.connections_open, 0);
    assert_eq!(m.queued_output_bytes, 0);

    // The same figures through the Prometheus endpoint, read by the Prometheus project's
    // own OpenMetrics parser (Debian's python3-prometheus-client; installed by .ci/run).
    // The endpoint serves the copies the shards make at each timer tick: ask until one has
    // everything above (one connection, kept alive).
    let mut s = RawClient::connect_tcp(addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (head, body) = loop {
        s.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let (head, body) = s.read_response();
        let text = String::from_utf8_lossy(&body);
        if text.contains("ringsock_closes_sent_total{code=\"1011\"} 1") || Instant::now() > deadline
        {
            break (head, body);
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    let text = String::from_utf8(body).unwrap();
    let Some(samples) = parse_openmetrics(&text) else {
        return;
    };
    for expected in [
        // As of the shards' last tick: before this scrape's own connection.
        "ringsock_accepted_total {} 7.0",
        "ringsock_upgrades_total {} 5.0",
        "ringsock_messages_received_total {'compressed': 'false'} 12.0",
        "ringsock_closes_sent_total {'code': '1002'} 1.0",
        "ringsock_closes_sent_total {'code': '1009'} 1.0",
        "ringsock_protocol_errors_total {'kind': 'unmasked_frame'} 1.0",
        "ringsock_handler_panics_total {} 1.0",
        "ringsock_backpressure_entered_total {} 1.0",
        "ringsock_handshakes_failed_total {'status': '403'} 1.0",
    ] {
        assert!(
            samples.contains(expected),
            "{expected:?} not in:\n{samples}"
        );
    }
    handle.shutdown().unwrap();
}

/// Parses OpenMetrics text with `prometheus_client`'s parser and returns one line per sample
/// (`name labels value`), or `None` (with a note) when the parser is not installed outside CI.
fn parse_openmetrics(text: &str) -> Option<String> {
    const SCRIPT: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        print(s.name, dict(sorted(s.labels.items())), float(s.value))
"#;
    // Debian's package installs into the system interpreter, which need not be the first
    // `python3` on PATH (pyenv, venvs).
    let python = ["/usr/bin/python3", "python3"].into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import prometheus_client.openmetrics.parser"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let Some(python) = python else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3-prometheus-client is missing (CI installs it)"
        );
        eprintln!("skipping the OpenMetrics parse: python3-prometheus-client is not installed");
        return None;
    };
    let mut child = Command::new(python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn health_checks_keep_the_connection_and_pipelined_requests_are_answered_in_order() {
    let handle = start(|b| b);
    let mut c = RawClient::connect_tcp(handle.local_addr());
    for _ in 0..3 {
        c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        let (head, body) = c.read_response();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(!head.contains("Connection: close"), "{head}");
        assert_eq!(body, b"ok\n");
    }
    // Three at once, one with a body, in one write.
    c.send(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(c.read_response().1, b"ok\n");
    let (head, body) = c.read_response();
    assert!(head.contains("application/octet-stream"), "{head}");
    assert_eq!(body, b"hello");
    assert!(c.read_response().0.starts_with("HTTP/1.1 404"));
    // A body split across writes.
    c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234");
    thread::sleep(Duration::from_millis(50));
    c.send(b"56789");
    assert_eq!(c.read_response().1, b"0123456789");
    // Then an upgrade on the same connection.
    let head = c.request("/ws", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    c.send_frame(true, 1, b"still me");
    assert_eq!(c.read_frame().payload, b"still me");
    // `Connection: close` from the client, and a response that asks for it.
    for request in [
        &b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
        b"GET /bye HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut c = RawClient::connect_tcp(handle.local_addr());
        c.send(request);
        let (head, _) = c.read_response();
        assert!(head.contains("Connection: close\r\n"), "{head}");
        assert!(c.read_to_end().is_empty(), "closed after the response");
    }
    assert_eq!(handle.metrics().http_requests, 9);
    handle.shutdown().unwrap();
}

#[test]
fn requests_the_server_does_not_take_get_a_clear_status_and_a_close() {
    let handle = start(|b| b.configure(|c| c.limits.max_http_body = 16));
    let cases: [(&[u8], &str); 4] = [
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "HTTP/1.1 501",
        ),
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n",
            "HTTP/1.1 413",
        ),
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n", "HTTP/1.1 400"),
    ];
    for (request, status) in cases {
        let mut c = RawClient::connect_tcp(handle.local_addr());
        c.send(request);
        let (head, body) = c.read_response();
        assert!(head.starts_with(status), "{head}");
        assert!(head.contains("Connection: close\r\n"), "{head}");
        assert!(!body.is_empty());
        assert!(c.read_to_end().is_empty(), "closed after the answer");
    }
    handle.shutdown().unwrap();
}

#[test]
fn upgrades_read_cookies_and_query_and_set_response_headers() {
    let handle = start(|b| b);
    let addr = handle.local_addr();
    let mut c = RawClient::connect_tcp(addr);
    let head = c.request("/cookie?user=bob&x=1", "Cookie: a=1; token=secret\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("\r\nSet-Cookie: seen=1; HttpOnly\r\n"),
        "{head}"
    );
    assert_eq!(c.read_frame().payload, b"hello bob");
    let mut c = RawClient::connect_tcp(addr);
    c.send(
        b"GET /cookie HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    let (head, body) = c.read_response();
    assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{head}");
    assert!(head.contains("WWW-Authenticate: Cookie\r\n"), "{head}");
    assert_eq!(body, b"no token\n");
    handle.shutdown().unwrap();
}

#[test]
fn deferred_upgrades_are_answered_from_another_thread_while_others_are_served() {
    let service = Service::default();
    let gate = Arc::clone(&service.gate);
    let handle = start_with(|b| b, service);
    let addr = handle.local_addr();
    // Both wait for their answer until the gate opens; meanwhile another client is served
    // by the same (only) shard.
    let accepted = thread::spawn(move || {
        let mut c = RawClient::connect_tcp(addr);
        let head = c.request("/defer?user=alice", "");
        (head, c.read_frame().payload)
    });
    let rejected = thread::spawn(move || {
        let mut c = RawClient::connect_tcp(addr);
        c.send(
            b"GET /defer?user=mallory HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        );
        c.read_response()
    });
    wait_for(5, "both upgrades to be deferred", || {
        handle.stats().total_connections() == 2
    });
    let mut other = upgraded(addr, "/ws");
    for i in 0..20 {
        let text = format!("m{i}");
        other.send_frame(true, 1, text.as_bytes());
        assert_eq!(other.read_frame().payload, text.as_bytes());
    }
    assert!(!accepted.is_finished() && !rejected.is_finished());
    gate.open();
    let (head, hello) = accepted.join().unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("\r\nSet-Cookie: session=alice\r\n"), "{head}");
    assert_eq!(hello, b"hello alice");
    let (head, body) = rejected.join().unwrap();
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(body, b"unknown user\n");
    let m = handle.metrics();
    assert_eq!((m.upgrades, m.handshakes_failed.get(403)), (2, 1));
    handle.shutdown().unwrap();
}

#[test]
fn a_deferred_upgrade_that_is_never_answered_times_out() {
    let handle = start(|b| b.handshake_timeout(Duration::from_millis(400)));
    let mut c = RawClient::connect_tcp(handle.local_addr());
    c.send(
        b"GET /never HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    let started = Instant::now();
    assert!(c.read_to_end().is_empty(), "dropped without an answer");
    assert!(started.elapsed() < Duration::from_secs(3));
    wait_for(5, "the connection to be freed", || {
        handle.stats().total_connections() == 0
    });
    handle.shutdown().unwrap();
}

#[test]
fn an_answer_after_the_timeout_finds_nothing_and_drops_its_state() {
    struct Late(Arc<Mutex<Option<PendingUpgrade<Arc<()>>>>>);
    impl Handler for Late {
        type State = Arc<()>;
        fn on_upgrade(&self, _: &Request<'_>, u: &mut Upgrade<Arc<()>>) -> Decision<Arc<()>> {
            *self.0.lock().unwrap() = Some(u.defer());
            Decision::Defer
        }
    }
    let slot = Arc::new(Mutex::new(None));
    let handle = Builder::new()
        .addr("127.0.0.1:0")
        .shards(1)
        .pin_threads(false)
        .handshake_timeout(Duration::from_millis(200))
        .build(Late(Arc::clone(&slot)))
        .start()
        .unwrap();
    let mut c = RawClient::connect_tcp(handle.local_addr());
    c.send(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(c.read_to_end().is_empty());
    let state = Arc::new(());
    let pending = slot.lock().unwrap().take().expect("deferred");
    assert!(pending.accept(Arc::clone(&state)), "the shard still runs");
    wait_for(5, "the late state to be dropped", || {
        Arc::strong_count(&state) == 1
    });
    assert_eq!(handle.metrics().upgrades, 0);
    handle.shutdown().unwrap();
}

#[test]
fn head_and_bodiless_statuses_keep_the_connection_in_step() {
    let handle = start(|b| b);
    let mut c = RawClient::connect_tcp(handle.local_addr());
    // HEAD: the length of the body, not the body; then the next answer is read in step.
    c.send(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let head = c.read_head();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Content-Length: 3\r\n"), "{head}");
    let (head, body) = c.read_response();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"ok\n");
    // 204: neither a length nor a body, whatever the handler set.
    c.send(b"GET /empty HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let head = c.read_head();
    assert!(head.starts_with("HTTP/1.1 204 No Content\r\n"), "{head}");
    assert!(!head.contains("Content-Length"), "{head}");
    assert_eq!(c.read_response().1, b"ok\n");
    // Public fields set by hand: a header that would split the response is left out, a
    // status out of range becomes 500.
    c.send(b"GET /forged HTTP/1.1\r\nHost: x\r\n\r\n");
    let (head, body) = c.read_response();
    assert!(head.contains("X-Ok: 1\r\n"), "{head}");
    assert!(!head.contains("evil") && !head.contains("X-Bad"), "{head}");
    assert_eq!(body, b"forged\n");
    c.send(b"GET /odd-status HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.read_response().0.starts_with("HTTP/1.1 500"));
    handle.shutdown().unwrap();
}

#[test]
fn pipelined_requests_wait_for_their_answers_to_drain() {
    // A 4 KiB mark and 2,000 pipelined requests in a few writes: answers stop at the mark
    // and resume as the client reads, every one in order, without growing past the cap.
    let handle = start(|b| b.high_water_mark(4096));
    let mut c = RawClient::connect_tcp(handle.local_addr());
    let mut requests = Vec::new();
    for i in 0..2000 {
        requests.extend_from_slice(
            format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n{i:06}").as_bytes(),
        );
    }
    let mut writer = c.stream.try_clone().unwrap();
    let sender = thread::spawn(move || writer.write_all(&requests).unwrap());
    thread::sleep(Duration::from_millis(300));
    for i in 0..2000 {
        let (head, body) = c.read_response();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, format!("{i:06}").as_bytes());
    }
    sender.join().unwrap();
    let m = handle.metrics();
    assert_eq!(m.http_requests, 2000);
    assert!(m.backpressure_entered >= 1, "{m:?}");
    assert_eq!(m.backpressure_entered, m.backpressure_drained, "{m:?}");
    handle.shutdown().unwrap();
}

#[test]
fn a_content_length_past_any_limit_is_413_not_a_panic() {
    let handle = start(|b| b.configure(|c| c.limits.max_http_body = usize::MAX));
    let mut c = RawClient::connect_tcp(handle.local_addr());
    c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n");
    assert!(c.read_response().0.starts_with("HTTP/1.1 413"));
    let mut other = upgraded(handle.local_addr(), "/ws");
    other.send_frame(true, 1, b"alive");
    assert_eq!(other.read_frame().payload, b"alive");
    handle.shutdown().unwrap();
}
