//! The end of a connection and of a server, as the application sees it: `on_close` comes
//! last, the application's state is dropped without taking the shard down even if its `Drop`
//! panics, and every waiter on a server returns only once it has stopped.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{masked_frame, wait_for, RawClient};
use ringsock::proto::handshake::Request;
use ringsock::proto::CloseCode;
use ringsock::server::{Builder, Decision, Handler, Message, Upgrade, Ws};

fn builder() -> Builder {
    Builder::new()
        .addr("127.0.0.1:0")
        .shards(1)
        .pin_threads(false)
        .close_timeout(Duration::from_secs(2))
}

type Log = Arc<Mutex<Vec<String>>>;

/// Answers any message with 1.5 MB (over the 1 MiB mark) and logs the callbacks.
struct Big(Log);

impl Handler for Big {
    type State = ();

    fn on_upgrade(&self, _: &Request<'_>, _: &mut Upgrade<()>) -> Decision<()> {
        Decision::Accept(())
    }

    fn on_message(&self, ws: &mut Ws<'_, ()>, _msg: Message<'_>) {
        let status = ws.send_binary(&vec![7u8; 1_500_000]);
        self.0
            .lock()
            .unwrap()
            .push(format!("on_message {status:?}"));
    }

    fn on_drain(&self, _: &mut Ws<'_, ()>) {
        self.0.lock().unwrap().push("on_drain".into());
    }

    fn on_close(&self, _: &mut Ws<'_, ()>, _: Option<CloseCode>, _: &str) {
        self.0.lock().unwrap().push("on_close".into());
    }
}

#[test]
fn on_drain_never_follows_on_close() {
    let log: Log = Arc::default();
    let handle = builder().build(Big(Arc::clone(&log))).start().unwrap();
    let mut c = RawClient::connect(handle.local_addr());
    // A message and our close in one write: on_message goes over the mark, on_close comes in
    // the same batch, and the output drains after it.
    let mut bytes = masked_frame(true, 1, b"go");
    bytes.extend_from_slice(&masked_frame(true, 8, &1000u16.to_be_bytes()));
    c.send(&bytes);
    assert_eq!(
        c.read_close(),
        Some(1000),
        "the 1.5 MB, then the close echo"
    );
    drop(c);
    wait_for(10, "the connection to be freed", || {
        handle.stats().total_connections() == 0
    });
    let log = log.lock().unwrap().clone();
    assert_eq!(log.last().map(String::as_str), Some("on_close"), "{log:?}");
    assert!(!log.contains(&"on_drain".to_owned()), "{log:?}");
    handle.shutdown().expect("clean shutdown");
}

/// State whose `Drop` panics.
struct Bomb;

impl Drop for Bomb {
    fn drop(&mut self) {
        panic!("state drop panics");
    }
}

struct DropBoom;

impl Handler for DropBoom {
    type State = Bomb;

    fn on_upgrade(&self, _: &Request<'_>, _: &mut Upgrade<Bomb>) -> Decision<Bomb> {
        Decision::Accept(Bomb)
    }

    fn on_message(&self, ws: &mut Ws<'_, Bomb>, msg: Message<'_>) {
        ws.send(msg);
    }
}

#[test]
fn a_state_whose_drop_panics_costs_only_its_connection() {
    let handle = builder().build(DropBoom).start().unwrap();
    let addr = handle.local_addr();
    let a = RawClient::connect(addr);
    let mut b = RawClient::connect(addr);
    let _c = RawClient::connect(addr);
    drop(a);
    wait_for(10, "the first connection to be freed", || {
        handle.stats().total_connections() == 2 && handle.stats().handler_panics == 1
    });
    b.send_frame(true, 1, b"still served");
    assert_eq!(b.read_frame().payload, b"still served");
    let mut d = RawClient::connect(addr);
    d.send_frame(true, 1, b"new ones too");
    assert_eq!(d.read_frame().payload, b"new ones too");
    // Shutdown drops the other three states: each panics, none takes the shard down.
    let started = Instant::now();
    handle.request_shutdown();
    for mut client in [b, d] {
        assert_eq!(client.read_close(), Some(1001));
        client.send_frame(true, 8, &1001u16.to_be_bytes());
    }
    drop(_c);
    handle
        .wait()
        .expect("a clean stop: state drops are the handler's panics");
    assert!(handle.is_stopped());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(handle.stats().handler_panics, 4);
}

struct Echo;

impl Handler for Echo {
    type State = ();

    fn on_upgrade(&self, _: &Request<'_>, _: &mut Upgrade<()>) -> Decision<()> {
        Decision::Accept(())
    }
}

#[test]
fn every_waiter_returns_only_once_the_server_stopped() {
    let handle = builder().build(Echo).start().unwrap();
    // A client that never answers our close keeps the shard up for the close timeout.
    let _silent = RawClient::connect(handle.local_addr());
    let first = handle.clone();
    let waiter = std::thread::spawn(move || first.wait());
    std::thread::sleep(Duration::from_millis(100));
    handle.shutdown().expect("clean shutdown");
    assert!(
        handle.is_stopped(),
        "shutdown() returned before the server stopped"
    );
    waiter.join().unwrap().expect("clean stop");
}
