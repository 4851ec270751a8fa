//! End-to-end tests over loopback: real shards, real sockets, tokio-tungstenite and a scripted
//! raw client as peers. Every server a test starts is shut down by that test.

mod common;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{builder, masked_frame, start, wait_for, wait_idle, RawClient};
use futures_util::{SinkExt, StreamExt};
use ringsock::proto::CloseCode;
use ringsock::server::{Decision, Message, SendStatus, ServerHandle};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as TCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message as TMessage;

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(handle: &ServerHandle) -> Client {
    let url = format!("ws://{}/", handle.local_addr());
    let config = WebSocketConfig {
        max_message_size: Some(64 << 20),
        max_frame_size: Some(64 << 20),
        ..Default::default()
    };
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), false)
        .await
        .expect("client connects");
    ws
}

async fn next_data(ws: &mut Client) -> TMessage {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(msg @ (TMessage::Text(_) | TMessage::Binary(_))))) => return msg,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a data message, got {other:?}"),
        }
    }
}

async fn echo_sizes(handle: &ServerHandle) {
    let mut ws = connect(handle).await;
    for size in [0usize, 125, 126, 65535, 65536, 1 << 20, 16 << 20] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        ws.send(TMessage::Binary(payload.clone())).await.unwrap();
        assert_eq!(
            next_data(&mut ws).await,
            TMessage::Binary(payload),
            "binary {size}"
        );
        let text: String = (0..size)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        ws.send(TMessage::Text(text.clone())).await.unwrap();
        assert_eq!(
            next_data(&mut ws).await,
            TMessage::Text(text),
            "text {size}"
        );
    }
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_every_size_with_its_type() {
    let (handle, probe) = start(builder());
    echo_sizes(&handle).await;
    wait_idle(&handle);
    assert_eq!(probe.opens.load(Ordering::SeqCst), 1);
    handle.shutdown().expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_with_single_shot_receives() {
    let (handle, _) = start(builder().configure(|c| {
        c.buffers.use_buffer_ring = false;
    }));
    echo_sizes(&handle).await;
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_with_a_tiny_buffer_ring_that_drains() {
    // Four 1 KiB receive buffers: large messages exhaust the ring (ENOBUFS) constantly.
    let (handle, _) = start(builder().configure(|c| {
        c.buffers.recv_buffers = 4;
        c.buffers.recv_buffer_size = 1024;
    }));
    echo_sizes(&handle).await;
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_is_echoed_with_its_code_and_connection_freed() {
    let (handle, probe) = start(builder());
    let mut ws = connect(&handle).await;
    ws.close(Some(CloseFrame {
        code: TCloseCode::from(4001),
        reason: "done".into(),
    }))
    .await
    .unwrap();
    let mut echoed = None;
    while let Some(Ok(msg)) = ws.next().await {
        if let TMessage::Close(frame) = msg {
            echoed = frame.map(|f| u16::from(f.code));
        }
    }
    assert_eq!(echoed, Some(4001));
    wait_idle(&handle);
    assert_eq!(probe.close_codes(), vec![Some(4001)]);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn reassembles_fragments_with_a_ping_in_between() {
    let (handle, _) = start(builder());
    let mut c = RawClient::connect(handle.local_addr());
    c.send_frame(false, 1, b"Hel");
    c.send_frame(true, 9, b"ping!");
    c.send_frame(false, 0, b"lo, ");
    c.send_frame(true, 0, b"world");
    let pong = c.read_frame();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (0xA, &b"ping!"[..]));
    let msg = c.read_frame();
    assert_eq!(
        (msg.fin, msg.opcode, msg.payload.as_slice()),
        (true, 1, &b"Hello, world"[..])
    );
    // 1000 single-byte fragments, written in one go.
    let mut bytes = common::masked_frame(false, 2, b"x");
    for _ in 0..998 {
        bytes.extend(common::masked_frame(false, 0, b"x"));
    }
    bytes.extend(common::masked_frame(true, 0, b"x"));
    c.send(&bytes);
    let msg = c.read_frame();
    assert_eq!((msg.opcode, msg.payload.len()), (2, 1000));
    c.send_frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(c.read_close(), Some(1000));
    assert!(c.sees_eof());
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn frames_split_across_reads_byte_by_byte_are_handled() {
    let (handle, _) = start(builder());
    let mut c = RawClient::connect(handle.local_addr());
    let frame = common::masked_frame(true, 1, "split ✓".as_bytes());
    for b in &frame {
        c.stream.write_all(std::slice::from_ref(b)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let msg = c.read_frame();
    assert_eq!(msg.payload, "split ✓".as_bytes());
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn ping_is_answered_with_a_pong_carrying_its_payload() {
    let (handle, _) = start(builder());
    let mut c = RawClient::connect(handle.local_addr());
    c.send_frame(true, 9, b"abc");
    let pong = c.read_frame();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (0xA, &b"abc"[..]));
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn server_initiated_close_completes_and_drops_tcp() {
    let (handle, probe) = start(builder());
    let mut c = RawClient::connect(handle.local_addr());
    c.send_frame(true, 1, b"cmd:close");
    assert_eq!(c.read_close(), Some(4000));
    c.send_frame(true, 8, &4000u16.to_be_bytes());
    assert!(
        c.sees_eof(),
        "server closes TCP after the closing handshake"
    );
    wait_idle(&handle);
    assert_eq!(probe.close_codes(), vec![Some(4000)]);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn protocol_error_closes_with_1002() {
    let (handle, probe) = start(builder());
    let mut c = RawClient::connect(handle.local_addr());
    c.send(&[0x83, 0x80, 1, 2, 3, 4]); // reserved opcode 0x3
    assert_eq!(c.read_close(), Some(1002));
    c.send_frame(true, 8, &1002u16.to_be_bytes());
    assert!(c.sees_eof());
    wait_idle(&handle);
    assert_eq!(probe.close_codes(), vec![Some(1002)]);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn unmasked_client_frame_closes_with_1002() {
    let (handle, _) = start(builder());
    let mut c = RawClient::connect(handle.local_addr());
    c.send(&[0x81, 0x02, b'h', b'i']);
    assert_eq!(c.read_close(), Some(1002));
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn oversize_message_closes_with_1009() {
    let (handle, _) = start(builder().max_message_size(1000).max_frame_size(1000));
    let mut c = RawClient::connect(handle.local_addr());
    c.send_frame(true, 2, &[0u8; 2000]);
    assert_eq!(c.read_close(), Some(1009));
    let mut c = RawClient::connect(handle.local_addr());
    c.send_frame(false, 2, &[0u8; 600]);
    c.send_frame(true, 0, &[0u8; 600]);
    assert_eq!(
        c.read_close(),
        Some(1009),
        "reassembled message over the limit"
    );
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn invalid_utf8_closes_with_1007() {
    let (handle, _) = start(builder());
    let mut c = RawClient::connect(handle.local_addr());
    c.send_frame(true, 1, &[b'o', b'k', 0xff]);
    assert_eq!(c.read_close(), Some(1007));
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn peer_that_vanishes_is_reported_as_1006_and_freed() {
    let (handle, probe) = start(builder());
    let c = RawClient::connect(handle.local_addr());
    wait_for(5, "open", || probe.opens.load(Ordering::SeqCst) == 1);
    drop(c);
    wait_idle(&handle);
    assert_eq!(probe.close_codes(), vec![Some(1006)]);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn plain_http_gets_the_handler_page_or_426() {
    let (handle, probe) = start(builder());
    let mut c = RawClient::connect_tcp(handle.local_addr());
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let head = c.read_head();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(String::from_utf8(c.read_to_end())
        .unwrap()
        .contains("<h1>hi</h1>"));
    let mut c = RawClient::connect_tcp(handle.local_addr());
    c.send(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.read_head().starts_with("HTTP/1.1 426"));
    let mut c = RawClient::connect_tcp(handle.local_addr());
    assert!(c.request("/reject", "").starts_with("HTTP/1.1 403"));
    let mut c = RawClient::connect_tcp(handle.local_addr());
    c.send(b"garbage\r\n\r\n");
    assert!(c.read_head().starts_with("HTTP/1.1 400"));
    wait_idle(&handle);
    assert_eq!(probe.opens.load(Ordering::SeqCst), 0);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn subprotocol_chosen_by_the_handler_is_answered() {
    let (handle, _) = start(builder());
    let mut c = RawClient::connect_tcp(handle.local_addr());
    let head = c.request("/", "Sec-WebSocket-Protocol: chat, superchat\r\n");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: chat\r\n"),
        "{head}"
    );
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn over_the_connection_limit_gets_503() {
    let (handle, _) = start(builder().max_connections_per_shard(1));
    let _first = RawClient::connect(handle.local_addr());
    let mut second = RawClient::connect_tcp(handle.local_addr());
    assert!(second.read_head().starts_with("HTTP/1.1 503"));
    assert!(second.sees_eof());
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn silent_connection_is_dropped_after_the_handshake_timeout() {
    let (handle, _) = start(builder().handshake_timeout(Duration::from_millis(200)));
    let mut c = RawClient::connect_tcp(handle.local_addr());
    c.send(b"GET / HTTP/1.1\r\n");
    assert!(c.sees_eof());
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn idle_connection_is_pinged_then_closed() {
    let (handle, _) = start(builder().idle_timeout(Some(Duration::from_millis(400)), true));
    let mut c = RawClient::connect(handle.local_addr());
    let ping = c.read_frame();
    assert_eq!(ping.opcode, 9, "auto ping after half the idle time");
    assert_eq!(c.read_close(), Some(1001));
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn client_that_stops_reading_is_bounded_and_drains() {
    let mark = 256 * 1024;
    let (handle, probe) = start(builder().high_water_mark(mark));
    let c = RawClient::connect(handle.local_addr());
    c.stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut writer = c.stream.try_clone().unwrap();
    let msg = common::masked_frame(true, 2, &[1u8; 16 * 1024]);
    // Write until the server stops reading and the socket buffers fill up.
    let mut sent = 0usize;
    while writer.write_all(&msg).is_ok() {
        sent += 1;
        assert!(sent < 10_000, "server kept reading without bound");
    }
    let max = probe.max_buffered.load(Ordering::SeqCst);
    assert!(
        max <= mark + 64 * 1024,
        "queued {max} bytes over a {mark}-byte mark"
    );
    assert!(probe.backpressure.load(Ordering::SeqCst) > 0);
    // The kernel's socket buffers absorbed some output already, so drains may have fired.
    let drains_before = probe.drains.load(Ordering::SeqCst);
    // Now read everything: the server drains, fires on_drain and reads again.
    let mut reader = c;
    reader
        .stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for _ in 0..sent {
        let frame = reader.read_frame();
        assert_eq!(frame.payload.len(), 16 * 1024);
    }
    assert!(
        probe.drains.load(Ordering::SeqCst) > drains_before,
        "on_drain fired"
    );
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn sends_over_the_hard_limit_are_dropped() {
    let (handle, probe) = start(builder().configure(|c| {
        c.buffers.high_water_mark = 64 * 1024;
        c.buffers.max_buffered = 128 * 1024;
    }));
    let mut c = RawClient::connect(handle.local_addr());
    c.send_frame(true, 1, b"cmd:flood:100:16384");
    wait_for(5, "flood", || {
        probe.dropped.load(Ordering::SeqCst) + probe.backpressure.load(Ordering::SeqCst) > 0
    });
    assert!(probe.dropped.load(Ordering::SeqCst) > 0);
    assert!(probe.max_buffered.load(Ordering::SeqCst) <= 128 * 1024 + 16 * 1024 + 16);
    drop(c);
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn remote_sends_from_another_thread() {
    let (handle, probe) = start(builder());
    let mut c = RawClient::connect(handle.local_addr());
    wait_for(5, "open", || probe.opens.load(Ordering::SeqCst) == 1);
    let remote = probe.remotes.lock().unwrap()[0].clone();
    std::thread::spawn(move || {
        assert_eq!(remote.send_text("from afar"), SendStatus::Queued);
        assert_eq!(remote.send_binary(&[1, 2, 3]), SendStatus::Queued);
    })
    .join()
    .unwrap();
    assert_eq!(c.read_frame().payload, b"from afar");
    assert_eq!(c.read_frame().payload, [1, 2, 3]);
    let remote = probe.remotes.lock().unwrap()[0].clone();
    remote.close(ringsock::proto::CloseCode(4002), "remote close");
    assert_eq!(c.read_close(), Some(4002));
    handle.shutdown().expect("clean shutdown");
    assert_eq!(
        remote.send_text("after shutdown"),
        SendStatus::Closed,
        "a stopped server refuses"
    );
}

#[test]
fn publish_reaches_subscribers_on_every_shard() {
    let (handle, probe) = start(builder().shards(2));
    // Connect until both shards hold a subscriber (SO_REUSEPORT spreads by hash).
    let mut clients: Vec<(RawClient, usize)> = Vec::new();
    let mut seen = [false; 2];
    for _ in 0..64 {
        let mut c = RawClient::connect(handle.local_addr());
        c.send_frame(true, 1, b"cmd:shard");
        let shard: usize = String::from_utf8(c.read_frame().payload).unwrap()[6..]
            .parse()
            .unwrap();
        seen[shard] = true;
        c.send_frame(true, 1, b"cmd:sub:room");
        assert_eq!(c.read_frame().payload, b"subscribed");
        clients.push((c, shard));
        if seen[0] && seen[1] && clients.len() >= 3 {
            break;
        }
    }
    assert!(seen[0] && seen[1], "connections landed on both shards");
    clients[0].0.send_frame(true, 1, b"cmd:pub:room:hello all");
    for (c, _) in &mut clients {
        assert_eq!(c.read_frame().payload, b"hello all");
    }
    handle.publish("room", Message::Binary(b"from the handle"));
    handle.broadcast(Message::Text("to everyone"));
    for (c, _) in &mut clients {
        assert_eq!(c.read_frame().payload, b"from the handle");
        assert_eq!(c.read_frame().payload, b"to everyone");
    }
    // From another thread, through a connection's Remote: every shard, not only its own.
    let remote = probe.remotes.lock().unwrap()[0].clone();
    let shards = std::thread::spawn(move || remote.publish("room", Message::Text("remote")))
        .join()
        .unwrap();
    assert_eq!(shards, 2);
    for (c, _) in &mut clients {
        assert_eq!(c.read_frame().payload, b"remote");
    }
    // A frame of 512 B or more goes to each subscriber by reference; shorter ones are copied.
    let before = handle.metrics();
    let long: Vec<u8> = (0..2000).map(|i| i as u8).collect();
    handle.publish("room", Message::Binary(&long));
    for (c, _) in &mut clients {
        assert!(c.read_frame().payload == long, "the long publication");
    }
    let after = handle.metrics();
    let n = clients.len() as u64;
    assert_eq!(after.fanout_deliveries - before.fanout_deliveries, n);
    assert_eq!(
        after.fanout_shared - before.fanout_shared,
        n,
        "shared, not copied"
    );
    assert_eq!(before.fanout_shared, 0, "the short ones were copied");
    handle.publish("nobody-listens", Message::Text("lost"));
    drop(clients);
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
}

/// A subscriber to `topic` on a fresh connection.
fn subscriber(handle: &ServerHandle, topic: &str) -> RawClient {
    let mut c = RawClient::connect(handle.local_addr());
    c.send_frame(true, 1, format!("cmd:sub:{topic}").as_bytes());
    assert_eq!(c.read_frame().payload, b"subscribed");
    c
}

/// Waits until the server has queued `n` publications for subscribers in all.
fn wait_deliveries(handle: &ServerHandle, n: u64) {
    wait_for(5, "publications queued", || {
        handle.metrics().fanout_deliveries >= n
    });
}

/// The longest publish linger ringsock takes: 30 s, past every read timeout of these tests.
const LONG_LINGER: Duration = Duration::from_secs(30);

#[test]
fn publications_within_the_linger_go_out_in_one_send() {
    let linger = Duration::from_secs(1);
    let (handle, _probe) = start(builder().publish_linger(linger));
    let mut c = subscriber(&handle, "room");
    let before = handle.metrics().socket_sends;
    let published = std::time::Instant::now();
    for i in 0..3 {
        handle.publish("room", Message::Text(&format!("p{i}")));
    }
    wait_deliveries(&handle, 3);
    // Input that gets no reply has the connection settled meanwhile: the publications
    // stay held all the same.
    c.send_frame(true, 1, b"cmd:pub:elsewhere:x");
    for i in 0..3 {
        assert_eq!(c.read_frame().payload, format!("p{i}").as_bytes());
    }
    // The linger starts when the first publication is held, so nothing can arrive before
    // it has passed.
    assert!(
        published.elapsed() >= linger,
        "held for the linger: {:?}",
        published.elapsed()
    );
    assert_eq!(
        handle.metrics().socket_sends - before,
        1,
        "the three publications went out in one send"
    );
    // Without a linger each goes out on its own.
    let (plain, _probe) = start(builder());
    let mut c2 = subscriber(&plain, "room");
    let before = plain.metrics().socket_sends;
    for i in 0..3 {
        plain.publish("room", Message::Text(&format!("q{i}")));
        assert_eq!(c2.read_frame().payload, format!("q{i}").as_bytes());
    }
    assert_eq!(plain.metrics().socket_sends - before, 3);
    drop((c, c2));
    handle.shutdown().expect("clean shutdown");
    plain.shutdown().expect("clean shutdown");
}

#[test]
fn anything_else_for_the_subscriber_takes_lingering_publications_along() {
    // Only what is sent to the connection can release the publications in time.
    let (handle, _probe) = start(builder().publish_linger(LONG_LINGER));
    let mut c = subscriber(&handle, "room");
    handle.publish("room", Message::Text("p0"));
    handle.publish("room", Message::Text("p1"));
    wait_deliveries(&handle, 2);
    c.send_frame(true, 1, b"echo me");
    for expected in [&b"p0"[..], b"p1", b"echo me"] {
        assert_eq!(c.read_frame().payload, expected);
    }
    // A ping's pong.
    handle.publish("room", Message::Text("p2"));
    wait_deliveries(&handle, 3);
    c.send_frame(true, 9, b"are you there");
    assert_eq!(c.read_frame().payload, b"p2");
    let pong = c.read_frame();
    assert_eq!(
        (pong.opcode, &pong.payload[..]),
        (10, &b"are you there"[..])
    );
    // The connection's closing.
    handle.publish("room", Message::Text("p3"));
    wait_deliveries(&handle, 4);
    c.send_frame(true, 1, b"cmd:close");
    assert_eq!(c.read_frame().payload, b"p3");
    assert_eq!(c.read_close(), Some(4000));
    c.send_frame(true, 8, &4000u16.to_be_bytes());
    assert!(c.sees_eof());
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn a_message_or_close_from_another_thread_takes_lingering_publications_along() {
    // A `Remote` send reaches the connection through the shard's command queue, not a
    // callback: it must release the held publications as a handler's send does.
    let (handle, probe) = start(builder().publish_linger(LONG_LINGER));
    let mut c = subscriber(&handle, "room");
    let remote = probe.remotes.lock().unwrap()[0].clone();
    let before = handle.metrics().socket_sends;
    handle.publish("room", Message::Text("p0"));
    handle.publish("room", Message::Text("p1"));
    wait_deliveries(&handle, 2);
    assert_eq!(remote.send_text("direct"), SendStatus::Queued);
    for expected in [&b"p0"[..], b"p1", b"direct"] {
        assert_eq!(c.read_frame().payload, expected);
    }
    assert_eq!(
        handle.metrics().socket_sends - before,
        1,
        "held until the message, then sent with it"
    );
    // And a close from another thread: the publications go before the close frame.
    handle.publish("room", Message::Text("p2"));
    wait_deliveries(&handle, 3);
    assert_eq!(remote.close(CloseCode(4001), "bye"), SendStatus::Queued);
    assert_eq!(c.read_frame().payload, b"p2");
    assert_eq!(c.read_close(), Some(4001));
    c.send_frame(true, 8, &4001u16.to_be_bytes());
    assert!(c.sees_eof());
    // Our FIN: the server reads on until it, up to the close timeout.
    drop(c);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn the_idle_ping_is_not_held_by_lingering_publications() {
    // Idle timeout 2 s: the ping goes at 1 s and the connection is closed at 2 s unless
    // something arrives. Held for the linger, the ping could not be answered in time.
    let (handle, _probe) = start(
        builder()
            .idle_timeout(Some(Duration::from_secs(2)), true)
            .publish_linger(LONG_LINGER),
    );
    let mut c = subscriber(&handle, "room");
    handle.publish("room", Message::Text("p0"));
    wait_deliveries(&handle, 1);
    assert_eq!(c.read_frame().payload, b"p0");
    let ping = c.read_frame();
    assert_eq!(ping.opcode, 9, "the idle ping");
    c.send_frame(true, 10, &ping.payload);
    std::thread::sleep(Duration::from_millis(1500));
    c.send_frame(true, 1, b"still here");
    loop {
        let frame = c.read_frame();
        assert_ne!(frame.opcode, 8, "closed as idle");
        if frame.opcode != 9 {
            // (Later idle pings may come first.)
            assert_eq!(frame.payload, b"still here");
            break;
        }
    }
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn a_reply_is_not_held_by_a_publication_made_in_the_same_round() {
    let (handle, _probe) = start(builder().publish_linger(LONG_LINGER));
    let mut c = subscriber(&handle, "room");
    // One write: the publication (fanned out after the callbacks) and the echo share a round.
    let mut both = masked_frame(true, 1, b"cmd:pub:room:x");
    both.extend_from_slice(&masked_frame(true, 1, b"echo me"));
    c.send(&both);
    let mut got = vec![c.read_frame().payload, c.read_frame().payload];
    got.sort();
    assert_eq!(got, vec![b"echo me".to_vec(), b"x".to_vec()]);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn a_publication_in_the_round_that_ends_the_linger_does_not_hold_the_output_again() {
    let linger = Duration::from_secs(2);
    let (handle, _probe) = start(builder().publish_linger(linger));
    let mut c = subscriber(&handle, "room");
    let published = std::time::Instant::now();
    handle.publish("room", Message::Text("p0"));
    wait_deliveries(&handle, 1);
    // The handler holds the shard past the linger's end; the publication after it is made
    // in the same round as the linger ends. p0 must go then, not a whole linger later.
    let mut both = masked_frame(true, 1, b"cmd:sleep:2300");
    both.extend_from_slice(&masked_frame(true, 1, b"cmd:pub:room:p1"));
    c.send(&both);
    assert_eq!(c.read_frame().payload, b"p0");
    assert_eq!(c.read_frame().payload, b"p1");
    let took = published.elapsed();
    assert!(
        took < linger * 2,
        "held again for a second linger: {took:?} (expected about 2.3 s)"
    );
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn lingering_publications_go_out_once_64_kib_are_queued() {
    let (handle, _probe) = start(builder().publish_linger(LONG_LINGER));
    let mut c = subscriber(&handle, "room");
    let payload = vec![b'x'; 1024];
    for _ in 0..100 {
        handle.publish("room", Message::Binary(&payload));
    }
    // At least the first 64 KiB arrive long before the linger ends (the read timeout is 10 s).
    for _ in 0..60 {
        assert_eq!(c.read_frame().payload.len(), 1024);
    }
    handle.shutdown().expect("clean shutdown");
}

/// Subscribes every connection to `room` as it opens and tells the room.
struct Joiner;

impl ringsock::Handler for Joiner {
    type State = ();

    fn on_upgrade(
        &self,
        _req: &ringsock::proto::handshake::Request<'_>,
        _upgrade: &mut ringsock::server::Upgrade<()>,
    ) -> Decision<()> {
        Decision::Accept(())
    }

    fn on_open(&self, ws: &mut ringsock::Ws<'_, ()>) {
        ws.subscribe("room");
        ws.publish("room", Message::Text("joined"));
    }

    fn on_message(&self, _ws: &mut ringsock::Ws<'_, ()>, _msg: Message<'_>) {}
}

#[test]
fn the_upgrade_response_is_not_held_by_a_publication_made_in_on_open() {
    let handle = ringsock::Builder::new()
        .addr("127.0.0.1:0")
        .shards(1)
        .pin_threads(false)
        .publish_linger(LONG_LINGER)
        .build(Joiner)
        .start()
        .unwrap();
    // `connect` reads the 101 with a 10 s read timeout.
    let mut c = RawClient::connect(handle.local_addr());
    assert_eq!(c.read_frame().payload, b"joined");
    drop(c);
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn shutdown_sends_lingering_publications_before_1001() {
    let (handle, _probe) = start(builder().publish_linger(LONG_LINGER));
    let mut c = subscriber(&handle, "room");
    for i in 0..3 {
        handle.publish("room", Message::Text(&format!("p{i}")));
    }
    wait_deliveries(&handle, 3);
    handle.request_shutdown();
    for i in 0..3 {
        assert_eq!(c.read_frame().payload, format!("p{i}").as_bytes());
    }
    assert_eq!(c.read_close(), Some(1001));
    c.send_frame(true, 8, &1001u16.to_be_bytes());
    handle.wait().expect("clean exit");
}

#[test]
fn a_peer_that_finished_sending_gets_its_lingering_publications_at_once() {
    // The linger outlasts the close timeout (2 s): holding the output after the peer's FIN
    // would lose it to the timeout.
    let (handle, _probe) = start(builder().publish_linger(LONG_LINGER));
    let mut c = subscriber(&handle, "room");
    handle.publish("room", Message::Text("before the end"));
    wait_deliveries(&handle, 1);
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.read_frame().payload, b"before the end");
    assert!(c.sees_eof());
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn a_subscriber_freed_while_publications_linger_is_passed_over() {
    let (handle, _probe) = start(builder().publish_linger(Duration::from_secs(1)));
    let mut gone = subscriber(&handle, "room");
    handle.publish("room", Message::Text("for the one gone"));
    wait_deliveries(&handle, 1);
    // Closed at once (a close handshake is not held), its entry still on the list.
    gone.send_frame(true, 1, b"cmd:close");
    assert_eq!(gone.read_frame().payload, b"for the one gone");
    assert_eq!(gone.read_close(), Some(4000));
    gone.send_frame(true, 8, &4000u16.to_be_bytes());
    assert!(gone.sees_eof());
    wait_idle(&handle);
    // Likely in the freed slot, under a new generation.
    let mut c = subscriber(&handle, "room");
    handle.publish("room", Message::Text("for the next one"));
    assert_eq!(c.read_frame().payload, b"for the next one");
    drop(c);
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn graceful_shutdown_delivers_queued_messages_then_1001() {
    let (handle, probe) = start(builder().shards(2));
    let mut clients: Vec<RawClient> = (0..4)
        .map(|_| RawClient::connect(handle.local_addr()))
        .collect();
    wait_for(5, "opens", || probe.opens.load(Ordering::SeqCst) == 4);
    for remote in probe.remotes.lock().unwrap().iter() {
        for i in 0..100 {
            remote.send_text(&format!("message {i}"));
        }
    }
    handle.request_shutdown();
    for c in &mut clients {
        for i in 0..100 {
            let frame = c.read_frame();
            assert_eq!(frame.payload, format!("message {i}").as_bytes());
        }
        let close = c.read_frame();
        assert_eq!(close.close_code(), Some(1001));
        c.send_frame(true, 8, &1001u16.to_be_bytes());
    }
    handle.wait().expect("clean exit");
    assert!(handle.is_stopped());
    for c in &mut clients {
        assert!(c.sees_eof());
    }
}

#[test]
fn shutdown_with_unresponsive_clients_is_bounded_by_the_close_timeout() {
    let (handle, probe) = start(builder().close_timeout(Duration::from_millis(300)));
    let _c = RawClient::connect(handle.local_addr());
    wait_for(5, "open", || probe.opens.load(Ordering::SeqCst) == 1);
    let started = std::time::Instant::now();
    handle.shutdown().expect("clean shutdown");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(probe.close_codes(), vec![Some(1006)]);
}

/// Inflates a permessage-deflate payload (RFC 7692 §7.2.2: append `00 00 ff ff`; a final
/// empty stored block ends the stream for a one-shot inflater).
fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0x00, 0x00, 0xff, 0xff, 0x01, 0x00, 0x00, 0xff, 0xff]);
    let mut out = vec![0u8; 1 << 20];
    let n = libdeflater::Decompressor::new()
        .deflate_decompress(&input, &mut out)
        .expect("valid deflate data");
    out.truncate(n);
    out
}

#[test]
fn replies_from_on_message_are_compressed_when_deflate_was_negotiated() {
    let (handle, _) = start(builder());
    let mut c = RawClient::connect_tcp(handle.local_addr());
    let head = c.request("/", "Sec-WebSocket-Extensions: permessage-deflate\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("permessage-deflate"),
        "{head}"
    );
    let text = "compressible ".repeat(100);
    // Uncompressed frames stay legal after negotiation (RSV1 clear); the echo is compressed.
    c.send_frame(true, 1, text.as_bytes());
    c.send_frame(true, 1, b"tiny");
    let big = c.read_frame();
    assert!(big.rsv1, "a large reply is compressed");
    assert!(big.payload.len() < text.len());
    assert_eq!(inflate(&big.payload), text.as_bytes());
    let small = c.read_frame();
    assert_eq!(
        (small.rsv1, small.payload.as_slice()),
        (false, &b"tiny"[..])
    );
    // Within one callback a compressed message is encoded after it, yet order is kept.
    c.send_frame(true, 1, b"cmd:pair");
    let first = c.read_frame();
    assert_eq!(inflate(&first.payload), text.as_bytes());
    assert_eq!(c.read_frame().payload, b"small");
    // The handler may decline compression per message (RFC 7692 §6: it is per message).
    c.send_frame(true, 1, b"cmd:plain");
    let plain = c.read_frame();
    assert_eq!(
        (plain.rsv1, plain.payload.as_slice()),
        (false, text.as_bytes())
    );
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn a_second_server_on_the_same_address_fails_to_start() {
    let (handle, _) = start(builder());
    let err = builder()
        .addr(handle.local_addr())
        .build(common::TestHandler {
            probe: Default::default(),
        })
        .start()
        .expect_err("the address is taken");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    handle.shutdown().expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_peer_that_answers_pings_stays_open() {
    let (handle, _) = start(builder().idle_timeout(Some(Duration::from_millis(400)), true));
    let mut ws = connect(&handle).await;
    // Keep reading (tungstenite answers pings while polled) for several idle periods.
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut pings = 0;
    while let Ok(msg) = tokio::time::timeout_at(until, ws.next()).await {
        match msg {
            Some(Ok(TMessage::Ping(_))) => pings += 1,
            other => panic!("only pings while idle, got {other:?}"),
        }
    }
    assert!(pings >= 2, "pinged every half idle period ({pings})");
    ws.send(TMessage::Text("still here".into())).await.unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        TMessage::Text("still here".into())
    );
    handle.shutdown().expect("clean shutdown");
}

/// A client that pipelines many messages, then its close, then half-closes (FIN) before it
/// reads anything: the server goes over its high-water mark with input stashed when the FIN
/// arrives. Every message must still be echoed, in order, followed by the close echo.
#[test]
fn messages_stashed_over_the_mark_survive_the_peers_fin() {
    let (handle, _probe) = start(builder().high_water_mark(16 * 1024));
    let mut client = RawClient::connect(handle.local_addr());
    let count = 3000usize;
    let mut writer = client.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut burst = Vec::new();
        for i in 0..count {
            let payload = vec![(i % 251) as u8; 1024];
            burst.extend_from_slice(&masked_frame(true, 2, &payload));
        }
        burst.extend_from_slice(&masked_frame(true, 8, &1000u16.to_be_bytes()));
        writer.write_all(&burst).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..count {
        let frame = client.read_frame();
        assert_eq!(frame.opcode, 2, "message {i}");
        assert_eq!(frame.payload, vec![(i % 251) as u8; 1024], "message {i}");
    }
    assert_eq!(client.read_close(), Some(1000));
    assert!(client.sees_eof());
    sender.join().unwrap();
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
}

/// Counts a streamed message's pieces and bytes and answers `len:N pieces:K` at its end.
struct Streamer;

impl ringsock::Handler for Streamer {
    type State = (usize, usize);

    fn on_upgrade(
        &self,
        _req: &ringsock::proto::handshake::Request<'_>,
        _upgrade: &mut ringsock::server::Upgrade<(usize, usize)>,
    ) -> Decision<(usize, usize)> {
        Decision::Accept((0, 0))
    }

    fn on_message(&self, ws: &mut ringsock::Ws<'_, (usize, usize)>, msg: Message<'_>) {
        ws.send_text(&format!("whole:{}", msg.as_bytes().len()));
    }

    fn on_fragment(
        &self,
        ws: &mut ringsock::Ws<'_, (usize, usize)>,
        _text: bool,
        data: &[u8],
        first: bool,
        last: bool,
    ) {
        let state = ws.state_mut();
        if first {
            *state = (0, 0);
        }
        state.0 += data.len();
        state.1 += 1;
        if last {
            let (len, pieces) = *ws.state();
            ws.send_text(&format!("len:{len} pieces:{pieces}"));
        }
    }
}

#[test]
fn streams_large_messages_to_on_fragment_in_pieces() {
    let handle = ringsock::Builder::new()
        .addr("127.0.0.1:0")
        .shards(1)
        .pin_threads(false)
        .stream_messages(true)
        .build(Streamer)
        .start()
        .unwrap();
    let mut client = RawClient::connect(handle.local_addr());
    client.send_frame(true, 2, b"small");
    assert_eq!(client.read_frame().payload, b"whole:5");
    let piece = vec![7u8; 64 * 1024];
    for i in 0..64 {
        client.send_frame(i == 63, if i == 0 { 2 } else { 0 }, &piece);
    }
    let answer = String::from_utf8(client.read_frame().payload).unwrap();
    let (len, pieces) = answer
        .strip_prefix("len:")
        .and_then(|rest| rest.split_once(" pieces:"))
        .map(|(l, p)| (l.parse::<usize>().unwrap(), p.parse::<usize>().unwrap()))
        .unwrap_or_else(|| panic!("unexpected answer {answer}"));
    assert_eq!(len, 64 * 64 * 1024, "every byte arrived");
    assert!(
        pieces >= 64,
        "delivered in pieces as they arrived, not whole ({pieces})"
    );
    client.send_frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(client.read_close(), Some(1000));
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
}
