//! Fuzzes the opening-handshake parser and everything a server calls on its result.
//!
//! Asserts: no panic; a parsed head lies within the input and its path borrows from it; the
//! first byte picks a split point, and parsing that prefix agrees with parsing the whole (as a
//! server receiving the request in two reads relies on); every response written is complete.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringsock::proto::handshake::{parse_request, write_accept, HttpError, Limits, Request};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    // Small limits half the time, so the 431 paths are reached with short inputs.
    let limits = if selector & 0x80 == 0 {
        Limits::default()
    } else {
        Limits {
            max_request_bytes: 64 + usize::from(selector & 0x3f) * 4,
            max_headers: 4,
        }
    };
    let full = parse_request(input, &limits);
    let split = usize::from(selector & 0x7f) * input.len() / 0x7f;
    let prefix = parse_request(&input[..split], &limits);
    match (&prefix, &full) {
        (Ok(None), _) => {}
        (Ok(Some(a)), Ok(Some(b))) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("prefix {prefix:?} disagrees with whole {full:?}"),
    }
    match full {
        Ok(Some((req, len))) => {
            assert!(len <= input.len() && len <= limits.max_request_bytes);
            assert!(split >= len || prefix == Ok(None));
            assert!(input.as_ptr_range().contains(&req.path().as_ptr()));
            let path_at = req.path().as_ptr() as usize - input.as_ptr() as usize;
            assert_eq!(
                &input[path_at..path_at + req.path().len()],
                req.path().as_bytes()
            );
            exercise(&req);
        }
        Ok(None) => assert!(input.len() < limits.max_request_bytes),
        Err(e) => check_response(e),
    }
});

/// Calls what a server would on a parsed request and checks the answers it writes.
fn exercise(req: &Request<'_>) {
    let _ = (req.is_upgrade(), req.host(), req.origin(), req.method());
    for protocol in req.subprotocols() {
        assert!(!protocol.is_empty() && !protocol.contains(','));
    }
    let _ = req.extension_offers().count();
    match req.websocket_key() {
        Ok(key) => {
            assert_eq!(key.len(), 24);
            let mut out = Vec::new();
            write_accept(&mut out, key, req.subprotocols().next(), None);
            assert!(out.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
            assert!(out.ends_with(b"\r\n\r\n"));
            assert_eq!(out.windows(4).filter(|w| w == b"\r\n\r\n").count(), 1);
        }
        Err(e) => check_response(e),
    }
}

/// An error response has one head, then exactly the announced body.
fn check_response(error: HttpError) {
    let mut out = Vec::new();
    error.write_response(&mut out);
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("head ends")
        + 4;
    let head = std::str::from_utf8(&out[..end]).expect("ASCII head");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.parse().ok())
        .expect("Content-Length");
    assert_eq!(out.len() - end, length);
    assert!(head.starts_with(&format!("HTTP/1.1 {} ", error.status())));
}
