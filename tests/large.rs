//! Large messages sent on without a copy: a handler that sends the message it was handed (a
//! reassembled one of 8 KiB or more) has its buffer go to the output whole, and back to an
//! engine once written. These tests pin down what the client sees: every byte, in order
//! with the sends around it, message after message (so a recycled buffer never leaks old
//! bytes), text and binary, whole and fragmented.

mod common;

use std::io::Write;
use std::net::SocketAddr;

use common::{masked_frame, RawClient};
use ringsock::proto::handshake::Request;
use ringsock::server::{Builder, Decision, Handler, Message, ServerHandle, Upgrade, Ws};

/// Sends `before`, the message, the message again (the second send is a copy), `after`.
struct EchoTwice;

impl Handler for EchoTwice {
    type State = ();

    fn on_upgrade(&self, _req: &Request<'_>, _upgrade: &mut Upgrade<()>) -> Decision<()> {
        Decision::Accept(())
    }

    fn on_message(&self, ws: &mut Ws<'_, ()>, msg: Message<'_>) {
        ws.send_text("before");
        ws.send(msg);
        ws.send(msg);
        ws.send_text("after");
    }
}

/// A server whose output may hold `mark` bytes before backpressure (four times that before
/// sends are dropped: an echo pair may start just under the mark and must not be cut).
fn start(mark: usize) -> ServerHandle {
    Builder::new()
        .addr("127.0.0.1:0")
        .high_water_mark(mark)
        .configure(|config| config.buffers.max_buffered = 4 * mark)
        .shards(1)
        .pin_threads(false)
        .max_message_size(8 << 20)
        .max_frame_size(8 << 20)
        .build(EchoTwice)
        .start()
        .expect("server starts")
}

/// A payload that differs per message and per position.
fn payload(round: usize, len: usize, text: bool) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let b = (i.wrapping_mul(31) ^ round.wrapping_mul(7)) as u8;
            if text {
                b'a' + b % 26
            } else {
                b
            }
        })
        .collect()
}

fn expect_echo_twice(client: &mut RawClient, opcode: u8, message: &[u8]) {
    let first = client.read_frame();
    assert_eq!(
        (first.opcode, first.payload.as_slice()),
        (1, &b"before"[..])
    );
    for copy in ["lent", "copied"] {
        let frame = client.read_frame();
        assert!(frame.fin && !frame.rsv1, "{copy}: one whole frame");
        assert_eq!(frame.opcode, opcode, "{copy}");
        assert_eq!(frame.payload.len(), message.len(), "{copy}: length");
        assert!(frame.payload == message, "{copy}: bytes differ");
    }
    let last = client.read_frame();
    assert_eq!((last.opcode, last.payload.as_slice()), (1, &b"after"[..]));
}

fn upgraded(addr: SocketAddr) -> RawClient {
    RawClient::connect(addr)
}

#[test]
fn large_messages_sent_on_arrive_whole_and_in_order_message_after_message() {
    // Room for a 3 MiB message sent twice.
    let handle = start(4 << 20);
    let mut client = upgraded(handle.local_addr());
    // Sizes around the 8 KiB threshold and well above it, in three fragments (so always
    // reassembled) or whole; the largest first, so a recycled buffer is larger than the
    // messages that reuse it. All but the last two are lent.
    let rounds = [
        (3 << 20, true),
        (64 << 10, false),
        (8 << 10, true),
        (1 << 20, true),
        (200_000, false),
        ((8 << 10) - 1, true),
        (5, false),
    ];
    for (round, &(len, fragmented)) in rounds.iter().enumerate() {
        let text = round % 2 == 1;
        let opcode = if text { 1 } else { 2 };
        let message = payload(round, len, text);
        if fragmented {
            // In three fragments.
            let third = len / 3;
            client.send_frame(false, opcode, &message[..third]);
            client.send_frame(false, 0, &message[third..2 * third]);
            client.send_frame(true, 0, &message[2 * third..]);
        } else {
            client.send_frame(true, opcode, &message);
        }
        expect_echo_twice(&mut client, opcode, &message);
    }
    // The five of 8 KiB or more went out without a copy (their second sends were copies).
    assert_eq!(
        handle.metrics().sent_lent,
        5,
        "messages sent on without a copy"
    );
    handle.shutdown().expect("shutdown");
}

#[test]
fn a_large_message_sent_on_queues_behind_a_slow_reader_without_losing_bytes() {
    // The default mark (1 MiB): each echo pair goes over it, so reading stops until it drains.
    let handle = start(1 << 20);
    let mut client = upgraded(handle.local_addr());
    // Several large messages before reading anything: their sends wait for the socket, and
    // the buffers they lent stay out while the next messages are reassembled.
    // Written from another thread: the server stops reading while its output is over the
    // high-water mark, and this thread reads only after.
    let messages: Vec<Vec<u8>> = (0..4).map(|r| payload(r + 10, 700_000, false)).collect();
    let mut writer = client.stream.try_clone().unwrap();
    let frames: Vec<Vec<u8>> = messages.iter().map(|m| masked_frame(true, 2, m)).collect();
    let writing = std::thread::spawn(move || {
        for frame in frames {
            writer.write_all(&frame).unwrap();
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    for message in &messages {
        expect_echo_twice(&mut client, 2, message);
    }
    writing.join().unwrap();
    assert_eq!(
        handle.metrics().sent_lent,
        4,
        "messages sent on without a copy"
    );
    handle.shutdown().expect("shutdown");
}
