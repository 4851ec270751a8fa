//! Chat rooms: every room is a topic, every line is published to it once (one encoded frame
//! shared by all subscribers on every shard). Open <http://127.0.0.1:9002/> in a few browser
//! tabs to try it; `/#kitchen` (or `/?room=kitchen`) is the room `kitchen`, `/` the `lobby`.
//!
//! With a broker, rooms span processes: two chat processes on the same Redis or NATS server
//! share their rooms, so a page on one and a page on the other talk to each other (see
//! "Running more than one node" in the README).
//!
//! ```sh
//! cargo run --release --example chat -- --addr 127.0.0.1:9002 --shards 2
//! cargo run --release --features redis --example chat -- --addr 127.0.0.1:9002 \
//!     --redis redis://127.0.0.1:6379
//! cargo run --release --features nats --example chat -- --addr 127.0.0.1:9003 \
//!     --nats nats://127.0.0.1:4222
//! ```
//!
//! The flags every example takes are in `--help` (`examples/common`); the default address is
//! `127.0.0.1:9002`.

#[path = "common/mod.rs"]
mod common;

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use clap::Parser;
use ringsock::proto::handshake::{HttpError, Request};
use ringsock::proto::CloseCode;
use ringsock::server::{
    BrokerNotice, Decision, Handler, HttpResponse, Message, ServerHandle, Upgrade, Ws,
};

/// Chat rooms on http://HOST:PORT/: /#ROOM or /?room=ROOM picks a room (up to 64 letters,
/// digits, '-' and '_'; default lobby).
#[derive(Parser, Debug)]
#[command(name = "chat")]
struct Cli {
    #[command(flatten)]
    server: common::ServerArgs,
    #[command(flatten)]
    broker: common::BrokerArgs,
}

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>ringsock chat</title>
<style>
body { font: 15px system-ui, sans-serif; max-width: 40em; margin: 2em auto; }
#log { border: 1px solid #ccc; height: 24em; overflow-y: auto; padding: .5em; }
#log p { margin: .2em 0; } .sys { color: #888; } #where { color: #888; font-size: 60%; }
form { display: flex; gap: .5em; margin-top: .5em; } #text { flex: 1; }
</style></head>
<body>
<h1>ringsock chat <span id="where"></span></h1>
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
let ws = null;
function join() {
  const room = location.hash.slice(1) || new URLSearchParams(location.search).get('room') || 'lobby';
  document.getElementById('where').textContent = `room ${room} on ${location.host}`;
  log.textContent = '';
  if (ws) { ws.onclose = null; ws.close(); }
  ws = new WebSocket(`ws://${location.host}/ws?room=${encodeURIComponent(room)}`);
  ws.onopen = () => line(`connected to room ${room}`, 'sys');
  ws.onclose = (e) => line(`disconnected (${e.code}${e.reason ? ': ' + e.reason : ''})`, 'sys');
  ws.onmessage = (e) => line(e.data, e.data.startsWith('* ') ? 'sys' : '');
}
window.onhashchange = join;
join();
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

/// Longest room name, in bytes.
const MAX_ROOM: usize = 64;

struct Chat {
    next_id: AtomicU64,
    /// Random per process, so guests on different nodes get different names.
    names: std::collections::hash_map::RandomState,
    /// The running server, to tell every local visitor about the broker link.
    server: Arc<OnceLock<ServerHandle>>,
}

/// Per connection: the visitor's name and room.
struct Visitor {
    name: String,
    room: String,
}

/// The room named in `path`'s query (`/ws?room=NAME`): letters, digits, `-` and `_`, so that
/// the topic is a plain token on every broker. `None` for anything else.
fn room_of(path: &str) -> Option<String> {
    let query = path.split_once('?').map_or("", |(_, q)| q);
    let room = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("room="))
        .unwrap_or("lobby");
    let valid = !room.is_empty()
        && room.len() <= MAX_ROOM
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid.then(|| room.to_owned())
}

impl Handler for Chat {
    type State = Visitor;

    fn on_upgrade(&self, req: &Request<'_>, _: &mut Upgrade<Visitor>) -> Decision<Visitor> {
        let path = req.path();
        if path != "/ws" && !path.starts_with("/ws?") {
            return Decision::from(HttpError::NotFound);
        }
        let Some(room) = room_of(path) else {
            return HttpError::BadRequest("room: 1-64 letters, digits, '-' or '_'").into();
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let name = format!("guest-{:04x}", self.names.hash_one(id) & 0xffff);
        Decision::Accept(Visitor { name, room })
    }

    fn on_open(&self, ws: &mut Ws<'_, Visitor>) {
        let room = ws.state().room.clone();
        ws.subscribe(&room);
        let note = format!("* {} joined", ws.state().name);
        ws.publish(&room, Message::Text(&note));
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
        let visitor = ws.state();
        let line = format!("{}: {}", visitor.name, text);
        let room = visitor.room.clone();
        ws.publish(&room, Message::Text(&line));
    }

    fn on_close(&self, ws: &mut Ws<'_, Visitor>, _: Option<CloseCode>, _: &str) {
        let visitor = ws.state();
        let note = format!("* {} left", visitor.name);
        let room = visitor.room.clone();
        ws.publish(&room, Message::Text(&note));
    }

    /// Tells this node's visitors, in every room, when the link to the other nodes drops and
    /// when it is back: Redis pub/sub and NATS core keep no history, so lines said elsewhere
    /// meanwhile are lost. (A broadcast reaches this node's connections only, which is what
    /// we want: each node reports its own link.)
    fn on_broker(&self, notice: BrokerNotice) {
        tracing::info!(?notice, "chat: broker link");
        let line = match notice {
            BrokerNotice::Disconnected => "* lost the link to the other nodes; reconnecting",
            BrokerNotice::Resubscribed { gap: true } => {
                "* the link to the other nodes is back; messages may have been missed"
            }
            _ => return,
        };
        if let Some(server) = self.server.get() {
            server.broadcast(Message::Text(line));
        }
    }

    fn on_http(&self, req: &Request<'_>) -> Option<HttpResponse> {
        let path = req.path().split_once('?').map_or(req.path(), |(p, _)| p);
        Some(match path {
            "/" | "/index.html" => HttpResponse::html(PAGE),
            _ => HttpResponse::not_found(),
        })
    }
}

fn main() {
    let cli: Cli = common::parse("127.0.0.1:9002");
    common::init_logging();
    let server_cell = Arc::new(OnceLock::new());
    let builder = cli.server.builder().max_message_size(64 * 1024);
    let server = cli.broker.connect::<Cli>(builder).build(Chat {
        next_id: AtomicU64::new(1),
        names: std::collections::hash_map::RandomState::new(),
        server: Arc::clone(&server_cell),
    });
    let handle = common::start("chat", server);
    let _ = server_cell.set(handle.clone());
    let across = cli.broker.engine().map_or(String::new(), |(engine, _)| {
        format!(", rooms shared with other nodes through {engine}")
    });
    let details = format!(", the page on http://{}/{across}", handle.local_addr());
    common::listening("chat", &handle, &cli.server, &details);
    common::serve("chat", &handle);
}
