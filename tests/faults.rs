//! Faults inside ringsock itself, not the handler's: a shard that fails (a bug, simulated by a
//! test hook), a ring that cannot re-arm its wake-up read, timeouts at `Duration::MAX`, and a
//! producer thread that outruns a shard's bounded command queue.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{builder, start, wait_for, wait_idle, RawClient};
use ringsock::server::{SendStatus, ServerHandle, ShardFailure};

/// A client on shard `want` (connects until the kernel's SO_REUSEPORT hash picks it).
fn client_on_shard(addr: SocketAddr, want: usize) -> RawClient {
    for _ in 0..200 {
        let mut c = RawClient::connect(addr);
        c.send_frame(true, 1, b"cmd:shard");
        let frame = c.read_frame();
        if frame.payload == format!("shard:{want}").as_bytes() {
            return c;
        }
    }
    panic!("no connection landed on shard {want}");
}

fn echo(c: &mut RawClient, text: &str) {
    c.send_frame(true, 1, text.as_bytes());
    let frame = c.read_frame();
    assert_eq!(
        (frame.opcode, frame.payload.as_slice()),
        (1, text.as_bytes())
    );
}

/// Connections that the kernel hands to a dead shard would hang; all of these must echo.
fn all_served(addr: SocketAddr, count: usize) {
    for i in 0..count {
        let mut c = RawClient::connect(addr);
        c.stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        echo(&mut c, &format!("new client {i}"));
    }
}

#[test]
fn a_failed_shard_closes_its_connections_and_by_default_stops_the_server_with_an_error() {
    let (handle, _) = start(builder().shards(2));
    let addr = handle.local_addr();
    let mut on_failed = client_on_shard(addr, 0);
    let mut on_other = client_on_shard(addr, 1);
    handle.inject_shard_fault(0);
    // The failed shard's connection is closed (no close frame: its shard is gone).
    assert!(
        on_failed.sees_eof(),
        "the failed shard closed its connection"
    );
    // The other shard shuts down gracefully: 1001, then TCP close.
    assert_eq!(on_other.read_close(), Some(1001));
    on_other.send_frame(true, 8, &1001u16.to_be_bytes());
    assert!(on_other.sees_eof());
    let err = handle.wait().expect_err("the failure is reported");
    assert!(
        err.to_string().contains("shard 0 failed") && err.to_string().contains("injected"),
        "{err}"
    );
    assert!(handle.is_stopped());
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "nothing listens any more"
    );
}

#[test]
fn with_keep_serving_a_failed_shard_leaves_the_listener_group_and_the_others_serve_everyone() {
    let (handle, _) = start(
        builder()
            .shards(2)
            .on_shard_failure(ShardFailure::KeepServing),
    );
    let addr = handle.local_addr();
    let mut on_failed = client_on_shard(addr, 0);
    let mut survivor = client_on_shard(addr, 1);
    handle.inject_shard_fault(0);
    assert!(on_failed.sees_eof());
    // Its SO_REUSEPORT listener is gone: every new connection lands on shard 1.
    all_served(addr, 100);
    echo(&mut survivor, "still here");
    drop(survivor);
    wait_idle(&handle);
    let err = handle
        .shutdown()
        .expect_err("the failure is still reported");
    assert!(err.to_string().contains("shard 0 failed"), "{err}");
}

#[test]
fn failed_rearms_are_retried() {
    // Two failures per shard: within the retries, so the shard serves, and commands (which
    // need the wake-up read re-armed after each one) still arrive.
    let (handle, probe) = start(builder().configure(|c| c.testing.fail_rearms = 2));
    let mut c = RawClient::connect(handle.local_addr());
    echo(&mut c, "serving");
    wait_for(5, "open", || probe.opens.load(Ordering::SeqCst) == 1);
    let remote = probe.remotes.lock().unwrap()[0].clone();
    for i in 0..3 {
        assert_eq!(
            remote.send_text(&format!("command {i}")),
            SendStatus::Queued
        );
        assert_eq!(c.read_frame().payload, format!("command {i}").as_bytes());
    }
    drop(c);
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn a_shard_that_cannot_rearm_fails_loudly_instead_of_going_deaf() {
    let (handle, _) = start(builder().configure(|c| c.testing.fail_rearms = 100));
    let started = Instant::now();
    let err = handle.wait().expect_err("the shard failed");
    assert!(err.to_string().contains("cannot re-arm"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn timeouts_of_duration_max_mean_never() {
    let (handle, _) = start(
        builder()
            .handshake_timeout(Duration::MAX)
            .idle_timeout(Some(Duration::MAX), true)
            .close_timeout(Duration::MAX),
    );
    let mut c = RawClient::connect(handle.local_addr());
    echo(&mut c, "no overflow");
    std::thread::sleep(Duration::from_millis(600)); // a few sweeps
    echo(&mut c, "still open");
    c.send_frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(c.read_close(), Some(1000));
    assert!(c.sees_eof());
    drop(c);
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn a_full_command_queue_says_so_and_every_queued_message_arrives_in_order() {
    let (handle, probe) = start(builder().configure(|c| c.buffers.command_queue = 2));
    let mut c = RawClient::connect(handle.local_addr());
    wait_for(5, "open", || probe.opens.load(Ordering::SeqCst) == 1);
    let remote = probe.remotes.lock().unwrap()[0].clone();
    let (mut queued, mut full) = (Vec::new(), 0);
    for i in 0..20_000u32 {
        match remote.send_binary(&i.to_be_bytes()) {
            SendStatus::Queued => queued.push(i),
            SendStatus::QueueFull => full += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(full > 0, "a queue of 2 overflows under 20,000 posts");
    for &i in &queued {
        assert_eq!(
            c.read_frame().payload,
            i.to_be_bytes(),
            "in order, none lost"
        );
    }
    echo(&mut c, "nothing else was queued");
    assert_eq!(handle.stats().commands_refused, full);
    drop(c);
    wait_idle(&handle);
    stop(handle);
}

fn stop(handle: ServerHandle) {
    handle.shutdown().expect("clean shutdown");
    assert!(handle.is_stopped());
}
