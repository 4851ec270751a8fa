//! Log lines go through `tracing` with a level and structured fields (issue 13), captured
//! here by a subscriber of the test's own. The subscriber is process-wide (shards log from
//! their own threads), so this file holds the one test that installs it.

mod common;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use common::{start, wait_idle, RawClient};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// One captured event: level, target and every field as text (`message` included).
#[derive(Clone, Debug)]
struct Captured {
    level: Level,
    target: String,
    fields: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields(BTreeMap::new());
        event.record(&mut fields);
        self.0.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields: fields.0,
        });
    }
}

impl Capture {
    fn take(&self) -> Vec<Captured> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

#[test]
fn log_lines_carry_level_and_fields_and_the_message_path_logs_nothing() {
    let capture = Capture::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(capture.clone()))
        .expect("the only subscriber of this test binary");
    let (handle, _probe) = start(common::builder());
    let addr = handle.local_addr();

    // 1,000 echoed messages log nothing at any level.
    let mut c = RawClient::connect(addr);
    capture.take();
    for i in 0..1000 {
        let text = format!("message {i}");
        c.send_frame(true, 1, text.as_bytes());
        assert_eq!(c.read_frame().payload, text.as_bytes());
    }
    let during = capture.take();
    assert!(during.is_empty(), "the message path logged: {during:?}");

    // A protocol error: one debug line naming the peer and the close code.
    c.send(&[0x81, 0x01, b'x']); // unmasked
    assert_eq!(c.read_close(), Some(1002));
    drop(c);
    wait_idle(&handle);
    let events = capture.take();
    let error = events
        .iter()
        .find(|e| {
            e.fields
                .get("message")
                .is_some_and(|m| m.contains("protocol error"))
        })
        .unwrap_or_else(|| panic!("no protocol error line in {events:?}"));
    assert_eq!(error.level, Level::DEBUG);
    assert!(error.target.starts_with("ringsock::"), "{error:?}");
    assert_eq!(error.fields.get("code").map(String::as_str), Some("1002"));
    assert_eq!(error.fields.get("shard").map(String::as_str), Some("0"));
    assert!(error.fields["peer"].starts_with("127.0.0.1:"), "{error:?}");

    // A handler panic: one warning with the callback, shard and peer as fields.
    let mut c = RawClient::connect(addr);
    c.send_frame(true, 1, b"cmd:panic");
    assert_eq!(c.read_close(), Some(1011));
    drop(c);
    wait_idle(&handle);
    let events = capture.take();
    let warnings: Vec<_> = events.iter().filter(|e| e.level == Level::WARN).collect();
    assert_eq!(warnings.len(), 1, "{events:?}");
    let panic = warnings[0];
    assert!(
        panic.fields["message"].contains("handler panicked"),
        "{panic:?}"
    );
    assert_eq!(
        panic.fields.get("callback").map(String::as_str),
        Some("on_message")
    );
    assert_eq!(panic.fields.get("shard").map(String::as_str), Some("0"));
    assert!(panic.fields["peer"].starts_with("127.0.0.1:"), "{panic:?}");

    // A clean shutdown warns about nothing (it once logged "accept failed: EINVAL" as its
    // listener was shut down under the accept).
    handle.shutdown().unwrap();
    let events = capture.take();
    // `tracing` orders levels by verbosity: WARN and ERROR are the ones at or below WARN.
    let loud: Vec<_> = events.iter().filter(|e| e.level <= Level::WARN).collect();
    assert!(loud.is_empty(), "the shutdown warned: {loud:?}");
}
