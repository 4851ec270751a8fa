//! Chat room: every message is published to all connections on every shard through the
//! `chat` topic (one encoded frame shared by all subscribers). Open
//! <http://127.0.0.1:9002/> in a few browser tabs to try it.
//!
//! ```sh
//! cargo run --release --example chat -- --addr 127.0.0.1:9002 --shards 2
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

use ringsock::proto::handshake::{HttpError, Request};
use ringsock::proto::CloseCode;
use ringsock::server::{Builder, Handler, HttpResponse, Message, Upgrade, Ws};

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>ringsock chat</title>
<style>
body { font: 15px system-ui, sans-serif; max-width: 40em; margin: 2em auto; }
#log { border: 1px solid #ccc; height: 24em; overflow-y: auto; padding: .5em; }
#log p { margin: .2em 0; } .sys { color: #888; }
form { display: flex; gap: .5em; margin-top: .5em; } #text { flex: 1; }
</style></head>
<body>
<h1>ringsock chat</h1>
<div id="log"></div>
<form id="form"><input id="text" autocomplete="off" placeholder="Say something"><button>Send</button></form>
<script>
const log = document.getElementById('log');
function line(text, cls) {
  const p = document.createElement('p');
  p.textContent = text;
  if (cls) p.className = cls;
  log.appendChild(p);
  log.scrollTop = log.scrollHeight;
}
const ws = new WebSocket(`ws://${location.host}/ws`);
ws.onopen = () => line('connected', 'sys');
ws.onclose = (e) => line(`disconnected (${e.code})`, 'sys');
ws.onmessage = (e) => line(e.data);
document.getElementById('form').onsubmit = (e) => {
  e.preventDefault();
  const input = document.getElementById('text');
  if (input.value && ws.readyState === 1) ws.send(input.value);
  input.value = '';
};
</script>
</body></html>
"#;

/// Longest accepted chat line, in bytes.
const MAX_LINE: usize = 4096;

struct Chat {
    next_id: AtomicU64,
}

/// Per connection: the visitor's name.
struct Visitor {
    name: String,
}

impl Handler for Chat {
    type State = Visitor;

    fn on_upgrade(&self, req: &Request<'_>, _: &mut Upgrade) -> Result<Visitor, HttpError> {
        if req.path() != "/ws" {
            return Err(HttpError::NotFound);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Ok(Visitor {
            name: format!("guest-{id}"),
        })
    }

    fn on_open(&self, ws: &mut Ws<'_, Visitor>) {
        ws.subscribe("chat");
        let note = format!("* {} joined", ws.state().name);
        ws.publish("chat", Message::Text(&note));
    }

    fn on_message(&self, ws: &mut Ws<'_, Visitor>, msg: Message<'_>) {
        let Message::Text(text) = msg else {
            ws.close(CloseCode::UNSUPPORTED, "text only");
            return;
        };
        if text.len() > MAX_LINE {
            ws.close(CloseCode::POLICY, "line too long");
            return;
        }
        let line = format!("{}: {}", ws.state().name, text);
        ws.publish("chat", Message::Text(&line));
    }

    fn on_close(&self, ws: &mut Ws<'_, Visitor>, _: Option<CloseCode>, _: &str) {
        let note = format!("* {} left", ws.state().name);
        ws.publish("chat", Message::Text(&note));
    }

    fn on_http(&self, req: &Request<'_>) -> Option<HttpResponse> {
        Some(match req.path() {
            "/" | "/index.html" => HttpResponse::html(PAGE),
            _ => HttpResponse::not_found(),
        })
    }
}

fn arg(name: &str) -> Option<String> {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == name {
            return args.next();
        }
    }
    None
}

fn main() {
    let addr = arg("--addr").unwrap_or_else(|| "127.0.0.1:9002".into());
    let shards = arg("--shards").and_then(|s| s.parse().ok()).unwrap_or(0);
    let server = Builder::new()
        .addr(addr.as_str())
        .shards(shards)
        .max_message_size(64 * 1024)
        .build(Chat {
            next_id: AtomicU64::new(1),
        });
    let handle = match server.start() {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("chat: cannot start: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "chat: open http://{}/ ({} shards)",
        handle.local_addr(),
        handle.shards()
    );
    if let Err(e) = handle.run_until_signal() {
        eprintln!("chat: {e}");
        std::process::exit(1);
    }
}
