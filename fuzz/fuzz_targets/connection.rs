//! Fuzzes the frame and message engine ([`ringsock::proto::Connection`]) with arbitrary
//! client bytes.
//!
//! The first input byte chooses the configuration (small limits, permessage-deflate on or off,
//! streaming of messages on or off) and how the rest is cut into reads. Streamed pieces are
//! joined back into messages before comparing. Asserted on every input:
//! - no panic; `consumed` never exceeds the read, and all of it is consumed once no event is
//!   left (the caller never has to keep input);
//! - everything the server queued parses as complete, unmasked server frames, and nothing
//!   follows a close frame;
//! - the events do not depend on how the input was cut into reads (a reference run feeds it
//!   in one read);
//! - after an error or a close, no further event is produced.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringsock::proto::deflate::{Deflate, DeflateConfig, DeflateParams};
use ringsock::proto::frame::parse_raw;
use ringsock::proto::{Config, Connection, Event};

#[derive(Debug, PartialEq)]
enum Owned {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
    Error(String),
}

fn connection(selector: u8) -> Connection {
    let stream_messages = selector & 2 == 2;
    let config = Config {
        max_frame_size: 4096,
        max_message_size: 8192,
        stream_messages,
    };
    let deflate = (selector & 1 == 1).then(|| {
        let params = DeflateParams {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        };
        Deflate::new(params, &DeflateConfig::default())
    });
    Connection::new(config, deflate)
}

fn run(selector: u8, data: &[u8], cut: usize) -> (Vec<Owned>, Vec<u8>) {
    let mut conn = connection(selector);
    let mut events = Vec::new();
    let mut out = Vec::new();
    let mut ended = false;
    let mut piece: Option<(bool, Vec<u8>)> = None;
    for chunk in data.chunks(cut.max(1)) {
        let mut read = chunk.to_vec();
        let len = read.len();
        let mut pos = 0;
        loop {
            let progress = conn.handle_read(&mut read[pos..], &mut out);
            assert!(progress.consumed <= len - pos);
            pos += progress.consumed;
            let Some(event) = progress.event else { break };
            assert!(!ended, "event after the connection ended: {event:?}");
            let owned = match event {
                Event::Text(t) => Owned::Text(t.to_owned()),
                Event::Binary(b) => Owned::Binary(b.to_vec()),
                Event::Ping(b) => Owned::Ping(b.to_vec()),
                Event::Pong(b) => Owned::Pong(b.to_vec()),
                Event::Close { code, reason } => {
                    ended = true;
                    Owned::Close(code.map(|c| c.0), reason.to_owned())
                }
                Event::Error(e) => {
                    ended = true;
                    Owned::Error(e.to_string())
                }
                Event::Fragment {
                    opcode,
                    data,
                    first,
                    last,
                } => {
                    assert_eq!(first, piece.is_none(), "first marks the first piece");
                    let text = opcode == ringsock::proto::OpCode::Text;
                    let (was_text, bytes) = piece.get_or_insert((text, Vec::new()));
                    assert_eq!(*was_text, text, "one message's pieces share its type");
                    bytes.extend_from_slice(data);
                    if !last {
                        continue;
                    }
                    let Some((text, bytes)) = piece.take() else {
                        continue;
                    };
                    if text {
                        Owned::Text(String::from_utf8(bytes).expect("valid by the last piece"))
                    } else {
                        Owned::Binary(bytes)
                    }
                }
                _ => unreachable!("new event kind"),
            };
            events.push(owned);
        }
        assert_eq!(pos, len, "input left unconsumed");
    }
    (events, out)
}

fn check_output(mut out: &[u8]) {
    let mut closed = false;
    while !out.is_empty() {
        assert!(!closed, "a frame after our close");
        let raw = parse_raw(out)
            .expect("valid length")
            .expect("complete frame");
        assert!(raw.mask.is_none(), "server frames are unmasked");
        let end = raw.header_len + raw.payload_len as usize;
        assert!(end <= out.len(), "truncated frame");
        closed = raw.b0 & 0x0F == 0x8;
        out = &out[end..];
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&selector, data)) = input.split_first() else {
        return;
    };
    let (whole, whole_out) = run(selector, data, data.len());
    check_output(&whole_out);
    let cut = usize::from(selector >> 2) + 1;
    let (split, split_out) = run(selector, data, cut);
    assert_eq!(
        whole, split,
        "events depend on how the input was split (cut {cut})"
    );
    assert_eq!(whole_out, split_out);
});
