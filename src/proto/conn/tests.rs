//! Tests of the connection state machine: every RFC 6455 rule it enforces, and a property
//! test that any split of the input into reads yields the same events as one read.

use proptest::prelude::*;

use super::*;

/// An event with its bytes copied out, for comparing runs.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Owned {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
    Error(ProtocolError),
}

fn own(event: Event<'_>) -> Owned {
    match event {
        Event::Text(t) => Owned::Text(t.to_owned()),
        Event::Binary(b) => Owned::Binary(b.to_vec()),
        Event::Ping(b) => Owned::Ping(b.to_vec()),
        Event::Pong(b) => Owned::Pong(b.to_vec()),
        Event::Close { code, reason } => Owned::Close(code.map(|c| c.0), reason.to_owned()),
        Event::Error(e) => Owned::Error(e),
        other => panic!("unexpected event {other:?}"),
    }
}

/// A client frame: masked with `mask`, as a client must (§5.3).
fn client_frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut header = [0u8; MAX_HEADER_LEN];
    let opcode = OpCode::from_u8(b0 & 0x0F).unwrap_or(OpCode::Binary);
    let n = frame::encode_header(&mut header, true, false, opcode, payload.len(), Some(mask));
    header[0] = b0;
    let mut frame = header[..n].to_vec();
    let mut body = payload.to_vec();
    crate::proto::mask::apply_mask_scalar(&mut body, mask, 0);
    frame.extend_from_slice(&body);
    frame
}

const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

fn text(payload: &str) -> Vec<u8> {
    client_frame(0x81, payload.as_bytes(), MASK)
}

/// Feeds `chunks` as successive reads; returns the events and everything queued.
fn drive_with(conn: &mut Connection, chunks: &[&[u8]]) -> (Vec<Owned>, Vec<u8>) {
    let mut events = Vec::new();
    let mut out = Vec::new();
    for chunk in chunks {
        let mut read = chunk.to_vec();
        let len = read.len();
        let mut pos = 0;
        loop {
            let progress = conn.handle_read(&mut read[pos..], &mut out);
            pos += progress.consumed;
            assert!(pos <= len);
            match progress.event {
                Some(event) => events.push(own(event)),
                None => break,
            }
        }
        assert_eq!(pos, read.len(), "all input consumed once no event is left");
    }
    (events, out)
}

fn drive(chunks: &[&[u8]]) -> (Vec<Owned>, Vec<u8>) {
    drive_with(&mut Connection::new(Config::default(), None), chunks)
}

/// Parses the server's (unmasked) output into frames: (b0, payload).
fn server_frames(mut out: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while !out.is_empty() {
        let raw = frame::parse_raw(out).unwrap().expect("complete frame");
        assert!(raw.mask.is_none(), "server frames are never masked");
        let end = raw.header_len + raw.payload_len as usize;
        frames.push((raw.b0, out[raw.header_len..end].to_vec()));
        out = &out[end..];
    }
    frames
}

fn close_code_sent(out: &[u8]) -> Option<u16> {
    server_frames(out)
        .into_iter()
        .find(|(b0, _)| b0 & 0x0F == 0x8)
        .and_then(|(_, p)| (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])))
}

#[test]
fn delivers_a_single_frame_text_message_in_place() {
    let mut conn = Connection::new(Config::default(), None);
    let mut read = text("Hello");
    let ptr = read.as_ptr() as usize;
    let mut out = Vec::new();
    let progress = conn.handle_read(&mut read, &mut out);
    assert_eq!(progress.consumed, 11);
    match progress.event {
        Some(Event::Text(t)) => {
            assert_eq!(t, "Hello");
            let offset = t.as_ptr() as usize - ptr;
            assert_eq!(offset, 6, "borrowed from the read buffer, not copied");
        }
        other => panic!("{other:?}"),
    }
    assert!(out.is_empty());
}

#[test]
fn delivers_binary_and_empty_messages() {
    let (events, _) = drive(&[&client_frame(0x82, &[0, 1, 2, 255], MASK), &text("")]);
    assert_eq!(
        events,
        vec![
            Owned::Binary(vec![0, 1, 2, 255]),
            Owned::Text(String::new())
        ]
    );
}

#[test]
fn reassembles_fragmented_messages_with_control_frames_between() {
    let frames = [
        client_frame(0x01, b"Hel", MASK),
        client_frame(0x89, b"ping!", MASK),
        client_frame(0x00, b"lo, ", MASK),
        client_frame(0x00, b"", MASK),
        client_frame(0x80, "wörld".as_bytes(), MASK),
    ];
    let all = frames.concat();
    let (events, out) = drive(&[&all]);
    assert_eq!(
        events,
        vec![
            Owned::Ping(b"ping!".to_vec()),
            Owned::Text("Hello, wörld".to_owned())
        ]
    );
    assert_eq!(server_frames(&out), vec![(0x8A, b"ping!".to_vec())]);
}

#[test]
fn answers_pings_with_the_same_payload_and_surfaces_pongs() {
    let payload = [7u8; 125];
    let (events, out) = drive(&[
        &client_frame(0x89, &payload, MASK),
        &client_frame(0x8A, b"x", MASK),
    ]);
    assert_eq!(
        events,
        vec![Owned::Ping(payload.to_vec()), Owned::Pong(b"x".to_vec())]
    );
    assert_eq!(server_frames(&out), vec![(0x8A, payload.to_vec())]);
}

#[test]
fn echoes_the_peers_close_code_and_ignores_what_follows() {
    let mut close = vec![0x03, 0xE8];
    close.extend_from_slice(b"bye");
    let mut conn = Connection::new(Config::default(), None);
    let (events, out) = drive_with(
        &mut conn,
        &[&client_frame(0x88, &close, MASK), &text("late")],
    );
    assert_eq!(events, vec![Owned::Close(Some(1000), "bye".to_owned())]);
    assert_eq!(server_frames(&out), vec![(0x88, vec![0x03, 0xE8])]);
    assert_eq!(conn.state(), State::Closed);
}

#[test]
fn answers_an_empty_close_with_an_empty_close() {
    let (events, out) = drive(&[&client_frame(0x88, b"", MASK)]);
    assert_eq!(events, vec![Owned::Close(None, String::new())]);
    assert_eq!(server_frames(&out), vec![(0x88, vec![])]);
}

#[test]
fn validates_close_codes() {
    for code in [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        let (events, out) = drive(&[&client_frame(0x88, &code.to_be_bytes(), MASK)]);
        assert_eq!(
            events,
            vec![Owned::Error(ProtocolError::InvalidCloseCode)],
            "code {code}"
        );
        assert_eq!(close_code_sent(&out), Some(1002), "code {code}");
    }
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1014, 3000, 4999,
    ] {
        let (events, out) = drive(&[&client_frame(0x88, &code.to_be_bytes(), MASK)]);
        assert_eq!(
            events,
            vec![Owned::Close(Some(code), String::new())],
            "code {code}"
        );
        assert_eq!(close_code_sent(&out), Some(code), "code {code}");
    }
}

#[test]
fn rejects_a_one_byte_close_and_an_invalid_close_reason() {
    let (events, out) = drive(&[&client_frame(0x88, &[0x03], MASK)]);
    assert_eq!(
        events,
        vec![Owned::Error(ProtocolError::InvalidClosePayload)]
    );
    assert_eq!(close_code_sent(&out), Some(1002));
    let (events, out) = drive(&[&client_frame(0x88, &[0x03, 0xE8, 0xCE, 0xBA, 0xE1], MASK)]);
    assert_eq!(events, vec![Owned::Error(ProtocolError::InvalidUtf8)]);
    assert_eq!(close_code_sent(&out), Some(1007));
}

#[test]
fn rejects_unmasked_client_frames() {
    let (events, out) = drive(&[&[0x81, 0x02, b'h', b'i']]);
    assert_eq!(events, vec![Owned::Error(ProtocolError::UnmaskedFrame)]);
    assert_eq!(close_code_sent(&out), Some(1002));
}

#[test]
fn rejects_reserved_bits_without_an_extension() {
    for b0 in [0xC1u8, 0xA1, 0x91, 0xC9] {
        let (events, out) = drive(&[&client_frame(b0, b"x", MASK)]);
        assert_eq!(
            events,
            vec![Owned::Error(ProtocolError::ReservedBits)],
            "b0 {b0:#x}"
        );
        assert_eq!(close_code_sent(&out), Some(1002));
    }
}

#[test]
fn rejects_reserved_opcodes() {
    for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        let (events, out) = drive(&[&client_frame(0x80 | op, b"", MASK)]);
        assert_eq!(
            events,
            vec![Owned::Error(ProtocolError::ReservedOpCode)],
            "op {op}"
        );
        assert_eq!(close_code_sent(&out), Some(1002));
    }
}

#[test]
fn rejects_bad_fragmentation() {
    let (events, _) = drive(&[&client_frame(0x80, b"x", MASK)]);
    assert_eq!(
        events,
        vec![Owned::Error(ProtocolError::UnexpectedContinuation)]
    );
    let (events, _) = drive(&[
        &client_frame(0x01, b"a", MASK),
        &client_frame(0x81, b"b", MASK),
    ]);
    assert_eq!(
        events,
        vec![Owned::Error(ProtocolError::ExpectedContinuation)]
    );
    let (events, _) = drive(&[&client_frame(0x09, b"", MASK)]);
    assert_eq!(
        events,
        vec![Owned::Error(ProtocolError::FragmentedControlFrame)]
    );
    let (events, out) = drive(&[&client_frame(0x89, &[0; 126], MASK)]);
    assert_eq!(
        events,
        vec![Owned::Error(ProtocolError::ControlFrameTooLong)]
    );
    assert_eq!(close_code_sent(&out), Some(1002));
}

#[test]
fn rejects_oversized_frames_and_messages_with_1009_before_allocating() {
    let config = Config {
        max_frame_size: 100,
        max_message_size: 150,
        ..Config::default()
    };
    let mut conn = Connection::new(config, None);
    // Only the header of a huge frame: rejected before any payload arrives.
    let header = &client_frame(0x82, &[0; 101], MASK)[..8];
    let (events, out) = drive_with(&mut conn, &[header]);
    assert_eq!(events, vec![Owned::Error(ProtocolError::FrameTooBig)]);
    assert_eq!(close_code_sent(&out), Some(1009));
    assert!(
        !conn.has_spill(),
        "nothing allocated for the claimed length"
    );

    let mut conn = Connection::new(config, None);
    let frames = [
        client_frame(0x02, &[1; 100], MASK),
        client_frame(0x80, &[2; 51], MASK),
    ];
    let (events, out) = drive_with(&mut conn, &[&frames[0], &frames[1]]);
    assert_eq!(events, vec![Owned::Error(ProtocolError::MessageTooBig)]);
    assert_eq!(close_code_sent(&out), Some(1009));
}

#[test]
fn rejects_a_64_bit_length_with_the_top_bit_set() {
    let mut frame = vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
    frame.extend_from_slice(&MASK);
    let mut conn = Connection::new(Config::default(), None);
    let (events, out) = drive_with(&mut conn, &[&frame, &client_frame(0x88, b"", MASK)]);
    assert_eq!(events, vec![Owned::Error(ProtocolError::InvalidLength)]);
    assert_eq!(close_code_sent(&out), Some(1002));
    assert_eq!(conn.state(), State::Closed);
}

#[test]
fn rejects_invalid_utf8_in_a_single_frame() {
    let (events, out) = drive(&[&client_frame(0x81, &[b'a', 0xC0, 0xAF], MASK)]);
    assert_eq!(events, vec![Owned::Error(ProtocolError::InvalidUtf8)]);
    assert_eq!(close_code_sent(&out), Some(1007));
}

#[test]
fn fails_fast_on_invalid_utf8_in_a_fragment_before_the_message_ends() {
    // Autobahn 6.4.1: the second fragment is invalid; the third never needs to arrive.
    let first = client_frame(0x01, "κόσμε".as_bytes(), MASK);
    let second = client_frame(0x00, &[0xF4, 0x90, 0x80, 0x80], MASK);
    let (events, out) = drive(&[&first, &second]);
    assert_eq!(events, vec![Owned::Error(ProtocolError::InvalidUtf8)]);
    assert_eq!(close_code_sent(&out), Some(1007));
}

#[test]
fn fails_fast_on_invalid_utf8_inside_a_frame_split_across_reads() {
    // Autobahn 6.4.3: one frame, its payload sent in pieces; fail at the bad piece.
    let mut payload = "κόσμε".as_bytes().to_vec();
    payload.extend_from_slice(&[0xF4, 0x90, 0x80, 0x80]);
    payload.extend_from_slice(b"edited");
    let frame = client_frame(0x81, &payload, MASK);
    let bad_at = 2 + 4 + "κόσμε".len() + 2; // header, mask, valid text, F4 90
    let mut conn = Connection::new(Config::default(), None);
    let (events, _) = drive_with(&mut conn, &[&frame[..bad_at - 1]]);
    assert!(events.is_empty());
    let (events, out) = drive_with(&mut conn, &[&frame[bad_at - 1..bad_at]]);
    assert_eq!(events, vec![Owned::Error(ProtocolError::InvalidUtf8)]);
    assert_eq!(close_code_sent(&out), Some(1007));
}

#[test]
fn rejects_a_message_that_ends_inside_a_code_point() {
    let frames = [
        client_frame(0x01, &[b'a', 0xE2], MASK),
        client_frame(0x80, &[0x82], MASK),
    ];
    let (events, _) = drive(&[&frames.concat()]);
    assert_eq!(events, vec![Owned::Error(ProtocolError::InvalidUtf8)]);
}

#[test]
fn fails_the_connection_and_ignores_everything_after_a_protocol_error() {
    // RFC 6455 §7.1.7: after our close, TCP is closed; nothing the peer sends is processed.
    let mut conn = Connection::new(Config::default(), None);
    let bad = client_frame(0x83, b"reserved", MASK);
    let after = [
        text("ignored"),
        client_frame(0x89, b"p", MASK),
        client_frame(0x88, &[3, 234], MASK),
    ];
    let (events, out) = drive_with(&mut conn, &[&bad, &after.concat()]);
    assert_eq!(events, vec![Owned::Error(ProtocolError::ReservedOpCode)]);
    assert_eq!(
        server_frames(&out),
        vec![(0x88, vec![3, 234])],
        "one close, no pong after it"
    );
    assert_eq!(conn.state(), State::Closed);
}

#[test]
fn an_invalid_close_frame_ends_the_connection_at_once() {
    // Autobahn 7.3.2/7.9.x: the peer's close was invalid; it sends no other, so we close TCP.
    let mut conn = Connection::new(Config::default(), None);
    let (events, out) = drive_with(&mut conn, &[&client_frame(0x88, &[0x03], MASK)]);
    assert_eq!(
        events,
        vec![Owned::Error(ProtocolError::InvalidClosePayload)]
    );
    assert_eq!(close_code_sent(&out), Some(1002));
    assert_eq!(conn.state(), State::Closed);
}

#[test]
fn delivers_messages_until_the_peers_close_after_our_close() {
    let mut conn = Connection::new(Config::default(), None);
    let mut out = Vec::new();
    conn.send(&mut out, OpCode::Text, b"last", false).unwrap();
    conn.close(&mut out, CloseCode::GOING_AWAY, "shutdown")
        .unwrap();
    assert_eq!(conn.state(), State::CloseSent);
    assert_eq!(
        conn.send(&mut out, OpCode::Text, b"x", false),
        Err(SendError::Closed)
    );
    assert_eq!(conn.send_ping(&mut out, b""), Err(SendError::Closed));
    let frames = server_frames(&out);
    assert_eq!(
        frames[0],
        (0x81, b"last".to_vec()),
        "queued messages go out before the close"
    );
    assert_eq!(frames[1].0, 0x88);
    assert_eq!(&frames[1].1[..2], &1001u16.to_be_bytes());
    let (events, more) = drive_with(
        &mut conn,
        &[&text("in flight"), &client_frame(0x88, &[3, 233], MASK)],
    );
    assert_eq!(
        events,
        vec![
            Owned::Text("in flight".into()),
            Owned::Close(Some(1001), "".into())
        ]
    );
    assert!(more.is_empty(), "no second close");
    assert_eq!(conn.state(), State::Closed);
}

#[test]
fn send_rejects_misuse() {
    let mut conn = Connection::new(Config::default(), None);
    let mut out = Vec::new();
    assert_eq!(
        conn.send(&mut out, OpCode::Ping, b"", false),
        Err(SendError::InvalidOpCode)
    );
    assert_eq!(
        conn.send_ping(&mut out, &[0; 126]),
        Err(SendError::ControlTooLong)
    );
    assert_eq!(
        conn.close(&mut out, CloseCode(1005), ""),
        Err(SendError::InvalidCloseCode)
    );
    assert_eq!(
        conn.close(&mut out, CloseCode::NORMAL, &"x".repeat(124)),
        Err(SendError::ControlTooLong)
    );
    assert!(out.is_empty());
}

/// Feeds `input` in reads cut at `cuts` (offsets into `input`).
fn drive_cut(conn: &mut Connection, input: &[u8], cuts: &[usize]) -> Vec<Owned> {
    let mut pieces = Vec::new();
    let mut at = 0;
    for &cut in cuts.iter().chain([input.len()].iter()) {
        pieces.push(&input[at..cut]);
        at = cut;
    }
    drive_with(conn, &pieces).0
}

#[test]
fn messages_split_across_reads_are_unmasked_on_their_way_into_the_reassembly_buffer() {
    // Long enough for the vector kernels (128-byte blocks after an alignment head), not
    // periodic, cut so the later reads start at every mask phase.
    let binary: Vec<u8> = (0..1000u32).map(|i| (i * 131 + i / 7) as u8).collect();
    let text: String = "ключ € 𝄞 a".repeat(60);
    for (b0, payload) in [(0x82, binary.as_slice()), (0x81, text.as_bytes())] {
        let whole = client_frame(b0, payload, MASK);
        // Header: 4 bytes plus the 4-byte mask.
        for cuts in [
            &[8 + 3][..],
            &[8 + 517],
            &[8 + 1, 8 + 130, 8 + 262, 8 + 519],
            &[5, 8 + 2],
        ] {
            let mut conn = Connection::new(Config::default(), None);
            let events = drive_cut(&mut conn, &whole, cuts);
            let expected = if b0 == 0x81 {
                Owned::Text(text.clone())
            } else {
                Owned::Binary(binary.clone())
            };
            assert_eq!(events, vec![expected], "b0 {b0:#x}, cuts {cuts:?}");
        }
        // Two fragments with different masks, the second split too.
        let mut fragments = client_frame(b0 & 0x0F, &payload[..517], MASK);
        fragments.extend(client_frame(0x80, &payload[517..], [9, 0x80, 0xFF, 3]));
        let mut conn = Connection::new(Config::default(), None);
        let events = drive_cut(&mut conn, &fragments, &[300, 530, 700]);
        assert_eq!(events.len(), 1);
        let got = match &events[0] {
            Owned::Text(t) => t.as_bytes().to_vec(),
            Owned::Binary(b) => b.clone(),
            other => panic!("{other:?}"),
        };
        assert!(got == payload, "fragments, b0 {b0:#x}");
    }
}

#[test]
#[cfg_attr(miri, ignore = "libdeflate is C, which Miri cannot run")]
fn a_compressed_message_split_across_reads_inflates_to_what_was_sent() {
    use crate::proto::deflate::{DeflateConfig, DeflateParams};
    let params = DeflateParams {
        server_no_context_takeover: true,
        client_no_context_takeover: true,
        server_max_window_bits: 15,
        client_max_window_bits: 15,
    };
    let config = DeflateConfig::default();
    // Words from a small vocabulary in a pseudo-random order: compressible, not periodic.
    let words = ["ring", "sock", "frame", "mask", "deflate", "€uro", "данные"];
    let mut seed = 12345u32;
    let mut text = String::new();
    while text.len() < 4000 {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
        text.push_str(words[(seed >> 16) as usize % words.len()]);
        text.push(' ');
    }
    // The client's side of the codec is the same raw DEFLATE without the trailing 4 bytes.
    let mut compressed = Vec::new();
    assert!(Deflate::new(params, &config).compress(text.as_bytes(), &mut compressed));
    assert!(
        compressed.len() > 300,
        "long enough to split: {}",
        compressed.len()
    );
    let frame = client_frame(0xC1, &compressed, MASK);
    for cuts in [&[8 + 3][..], &[8 + 129, 8 + 258], &[3]] {
        let mut conn = Connection::new(Config::default(), Some(Deflate::new(params, &config)));
        let events = drive_cut(&mut conn, &frame, cuts);
        assert_eq!(events, vec![Owned::Text(text.clone())], "cuts {cuts:?}");
    }
}

#[test]
#[cfg_attr(miri, ignore = "large payloads take minutes under Miri")]
fn keeps_large_buffers_between_messages_until_shrunk() {
    let mut conn = Connection::new(Config::default(), None);
    let big = vec![b'a'; 300_000];
    let frames = [
        client_frame(0x01, &big, MASK),
        client_frame(0x80, b"!", MASK),
    ];
    let (events, _) = drive_with(&mut conn, &[&frames[0], &frames[1]]);
    assert_eq!(events.len(), 1);
    let (events, _) = drive_with(&mut conn, &[&text("small")]);
    assert_eq!(events, vec![Owned::Text("small".into())]);
    assert!(
        conn.spill.as_ref().unwrap().reassembly.capacity() >= 300_000,
        "kept for the next large message"
    );
    assert!(conn.shrink_buffers() >= 300_000);
    assert!(
        !conn.has_spill(),
        "an idle connection keeps only its inline state"
    );
}

#[test]
fn the_spill_is_allocated_only_for_input_that_spans_reads_and_freed_when_idle() {
    let mut conn = Connection::new(Config::default(), None);
    let (events, _) = drive_with(&mut conn, &[&text("whole")]);
    assert_eq!(events, vec![Owned::Text("whole".into())]);
    assert!(
        !conn.has_spill(),
        "a whole frame in one read needs no buffer"
    );
    // A header split across reads, then a control frame split across reads.
    let frame = text("split");
    let (events, _) = drive_with(&mut conn, &[&frame[..1], &frame[1..]]);
    assert_eq!(events, vec![Owned::Text("split".into())]);
    assert!(conn.has_spill());
    assert_eq!(conn.shrink_buffers(), 0);
    assert!(!conn.has_spill());
    let ping = client_frame(0x89, b"abc", MASK);
    let (events, _) = drive_with(&mut conn, &[&ping[..7], &ping[7..]]);
    assert_eq!(events, vec![Owned::Ping(b"abc".to_vec())]);
    conn.shrink_buffers();
    assert!(!conn.has_spill());
    // A partial header is kept across a shrink.
    let (events, _) = drive_with(&mut conn, &[&frame[..1]]);
    assert!(events.is_empty());
    conn.shrink_buffers();
    assert!(conn.has_spill(), "the partial header is still needed");
    let (events, _) = drive_with(&mut conn, &[&frame[1..]]);
    assert_eq!(events, vec![Owned::Text("split".into())]);
}

#[test]
fn shrinking_never_drops_a_message_in_progress() {
    let mut conn = Connection::new(Config::default(), None);
    let first = client_frame(0x01, &vec![b'x'; 100_000], MASK);
    let (events, _) = drive_with(&mut conn, &[&first]);
    assert!(events.is_empty());
    assert_eq!(conn.shrink_buffers(), 0);
    let (events, _) = drive_with(&mut conn, &[&client_frame(0x80, b"y", MASK)]);
    let mut expected = "x".repeat(100_000);
    expected.push('y');
    assert_eq!(events, vec![Owned::Text(expected)]);
}

/// One message or control frame of a generated conversation.
#[derive(Clone, Debug)]
enum Item {
    Message {
        text: bool,
        payload: Vec<u8>,
        fragments: Vec<usize>,
    },
    Ping(Vec<u8>),
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        (
            any::<bool>(),
            "[a-zé€😀]{0,40}",
            prop::collection::vec(0usize..50, 0..4)
        )
            .prop_map(|(text, s, fragments)| Item::Message {
                text,
                payload: s.into_bytes(),
                fragments
            }),
        prop::collection::vec(any::<u8>(), 0..126).prop_map(Item::Ping),
    ]
}

fn encode(items: &[Item], masks: &[[u8; 4]]) -> (Vec<u8>, Vec<Owned>) {
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    let mut m = masks.iter().cycle();
    for item in items {
        match item {
            Item::Ping(p) => {
                wire.extend(client_frame(0x89, p, *m.next().unwrap()));
                expected.push(Owned::Ping(p.clone()));
            }
            Item::Message {
                text,
                payload,
                fragments,
            } => {
                let mut cuts: Vec<usize> =
                    fragments.iter().map(|&f| f.min(payload.len())).collect();
                cuts.sort_unstable();
                cuts.push(payload.len());
                let mut start = 0;
                for (i, &cut) in cuts.iter().enumerate() {
                    let last = i + 1 == cuts.len();
                    let op = if i > 0 {
                        0x0
                    } else if *text {
                        0x1
                    } else {
                        0x2
                    };
                    let b0 = op | if last { 0x80 } else { 0 };
                    wire.extend(client_frame(b0, &payload[start..cut], *m.next().unwrap()));
                    start = cut;
                }
                expected.push(if *text {
                    Owned::Text(String::from_utf8(payload.clone()).unwrap())
                } else {
                    Owned::Binary(payload.clone())
                });
            }
        }
    }
    (wire, expected)
}

/// The property tests' settings: under Miri a few cases and no failure file (Miri keeps the
/// tests away from the file system), the defaults otherwise.
pub(crate) fn proptest_config() -> ProptestConfig {
    if cfg!(miri) {
        ProptestConfig {
            cases: 4,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    } else {
        ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(proptest_config())]
    #[test]
    fn any_split_of_the_input_yields_the_same_events(
        items in prop::collection::vec(item(), 0..8),
        masks in prop::collection::vec(any::<[u8; 4]>(), 1..4),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let (wire, expected) = encode(&items, &masks);
        let (whole, whole_out) = drive(&[&wire]);
        prop_assert_eq!(&whole, &expected);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        points.push(0);
        points.push(wire.len());
        points.sort_unstable();
        let chunks: Vec<&[u8]> = points.windows(2).map(|w| &wire[w[0]..w[1]]).collect();
        let (split, split_out) = drive(&chunks);
        prop_assert_eq!(&split, &expected);
        prop_assert_eq!(split_out, whole_out);
    }
}

#[test]
#[cfg_attr(miri, ignore = "large payloads take minutes under Miri")]
fn one_byte_at_a_time_yields_the_same_events() {
    let items = vec![
        Item::Message {
            text: true,
            payload: "héllo wörld 😀".into(),
            fragments: vec![3, 9],
        },
        Item::Ping(b"abc".to_vec()),
        Item::Message {
            text: false,
            payload: vec![9; 300],
            fragments: vec![],
        },
        Item::Message {
            text: false,
            payload: vec![7; 70_000],
            fragments: vec![],
        },
    ];
    let (wire, expected) = encode(&items, &[MASK, [1, 2, 3, 4]]);
    let chunks: Vec<&[u8]> = wire.chunks(1).collect();
    let (events, _) = drive(&chunks);
    assert_eq!(events, expected);
}

/// Feeds `chunks` to a streaming connection and joins each message's pieces.
fn drive_streaming(config: Config, chunks: &[&[u8]]) -> Vec<Owned> {
    let mut conn = Connection::new(
        Config {
            stream_messages: true,
            ..config
        },
        None,
    );
    let mut events = Vec::new();
    let mut pending: Option<(OpCode, Vec<u8>)> = None;
    let mut out = Vec::new();
    for chunk in chunks {
        let mut read = chunk.to_vec();
        let mut pos = 0;
        loop {
            let progress = conn.handle_read(&mut read[pos..], &mut out);
            pos += progress.consumed;
            match progress.event {
                Some(Event::Fragment {
                    opcode,
                    data,
                    first,
                    last,
                }) => {
                    assert_eq!(first, pending.is_none(), "first marks the first piece");
                    let (op, bytes) = pending.get_or_insert((opcode, Vec::new()));
                    assert_eq!(*op, opcode);
                    bytes.extend_from_slice(data);
                    if last {
                        let (op, bytes) = pending.take().unwrap();
                        events.push(if op == OpCode::Text {
                            Owned::Text(String::from_utf8(bytes).expect("valid by the last"))
                        } else {
                            Owned::Binary(bytes)
                        });
                    }
                }
                Some(event) => events.push(own(event)),
                None => break,
            }
        }
    }
    events
}

proptest! {
    #![proptest_config(proptest_config())]
    #[test]
    fn streamed_pieces_join_to_the_same_messages_for_any_split(
        items in prop::collection::vec(item(), 0..8),
        masks in prop::collection::vec(any::<[u8; 4]>(), 1..4),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let (wire, expected) = encode(&items, &masks);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        points.push(0);
        points.push(wire.len());
        points.sort_unstable();
        let chunks: Vec<&[u8]> = points.windows(2).map(|w| &wire[w[0]..w[1]]).collect();
        prop_assert_eq!(drive_streaming(Config::default(), &chunks), expected);
    }
}

#[test]
fn streaming_hands_out_pieces_without_reassembling() {
    let frames = [
        client_frame(0x02, &[1; 1000], MASK),
        client_frame(0x80, &[2; 1000], MASK),
    ];
    let mut conn = Connection::new(
        Config {
            stream_messages: true,
            ..Config::default()
        },
        None,
    );
    let mut pieces = Vec::new();
    let mut out = Vec::new();
    for frame in &frames {
        let mut read = frame.clone();
        let mut pos = 0;
        loop {
            let progress = conn.handle_read(&mut read[pos..], &mut out);
            pos += progress.consumed;
            match progress.event {
                Some(Event::Fragment {
                    data, first, last, ..
                }) => pieces.push((data.len(), data[0], first, last)),
                Some(other) => panic!("{other:?}"),
                None => break,
            }
        }
    }
    assert_eq!(pieces, vec![(1000, 1, true, false), (1000, 2, false, true)]);
    assert!(!conn.has_spill(), "nothing was copied into the connection");
}

#[test]
fn streaming_keeps_the_message_limit_and_fails_fast_on_invalid_utf8() {
    let config = Config {
        max_frame_size: 100,
        max_message_size: 150,
        stream_messages: true,
    };
    let frames = [
        client_frame(0x02, &[1; 100], MASK),
        client_frame(0x80, &[2; 51], MASK),
    ];
    let events = drive_streaming(config, &[&frames[0], &frames[1]]);
    assert_eq!(events, vec![Owned::Error(ProtocolError::MessageTooBig)]);
    let frames = [
        client_frame(0x01, b"ok", MASK),
        client_frame(0x80, &[0xC0, 0x80], MASK),
    ];
    let events = drive_streaming(Config::default(), &[&frames[0], &frames[1]]);
    assert_eq!(events, vec![Owned::Error(ProtocolError::InvalidUtf8)]);
}

/// Feeds `input` split at `at`, and returns the frames `handle_read` reported in all.
fn frames_counted(input: &[u8], at: usize) -> u32 {
    let mut conn = Connection::new(Config::default(), None);
    let mut out = Vec::new();
    let mut frames = 0;
    for chunk in [&input[..at], &input[at..]] {
        let mut read = chunk.to_vec();
        let mut pos = 0;
        loop {
            let progress = conn.handle_read(&mut read[pos..], &mut out);
            pos += progress.consumed;
            frames += progress.frames;
            if progress.event.is_none() {
                break;
            }
        }
    }
    frames
}

#[test]
fn counts_every_frame_read_whatever_the_split() {
    // Whole frames (the fast path), continuations that produce no event of their own, a
    // control frame between them, an empty continuation and a 16-bit length: seven frames.
    let mut input = text("whole");
    input.extend(client_frame(0x02, b"first", MASK));
    input.extend(client_frame(0x00, b"", MASK));
    input.extend(client_frame(0x89, b"ping", MASK));
    input.extend(client_frame(0x00, &[7; 300], MASK));
    input.extend(client_frame(0x80, b"last", MASK));
    input.extend(client_frame(0x82, &[9; 200], MASK));
    for at in 0..=input.len() {
        assert_eq!(frames_counted(&input, at), 7, "split at {at}");
    }
}
