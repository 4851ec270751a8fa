//! Echo server: every message comes back with its type (text stays text). The Autobahn
//! target, and the ringsock side of `ringsock-perf`'s echo scenarios.
//!
//! ```sh
//! cargo run --release --example echo -- --addr 127.0.0.1:9001 --shards 2
//! curl http://127.0.0.1:9001/healthz   # ok
//! curl http://127.0.0.1:9001/metrics   # the Prometheus text format
//! ```
//!
//! The flags every example takes are in `--help` (`examples/common`); the default address is
//! `127.0.0.1:9001`. permessage-deflate is enabled. Messages up to 64 MiB are accepted, in
//! frames of up to 64 MiB. Plain HTTP: `GET /healthz` answers `200 ok` (for a load balancer or
//! a liveness probe), `GET /metrics` the metrics (`--metrics-path`), anything else 426.

#[path = "common/mod.rs"]
mod common;

use clap::Parser;
use ringsock::proto::handshake::Request;
use ringsock::server::{Decision, Handler, HttpResponse, Message, Upgrade, Ws};

/// Echo server: every WebSocket message comes back with its type. GET /healthz answers ok.
#[derive(Parser, Debug)]
#[command(name = "echo")]
struct Cli {
    #[command(flatten)]
    server: common::ServerArgs,
}

struct Echo;

impl Handler for Echo {
    type State = ();

    fn on_upgrade(&self, _req: &Request<'_>, _upgrade: &mut Upgrade<()>) -> Decision<()> {
        Decision::Accept(())
    }

    fn on_message(&self, ws: &mut Ws<'_, ()>, msg: Message<'_>) {
        ws.send(msg);
    }

    /// `GET /healthz`: answered by a shard, so an answer means the shards serve.
    fn on_http(&self, req: &Request<'_>) -> Option<HttpResponse> {
        (req.method() == "GET" && req.path_only() == "/healthz").then(|| HttpResponse::text("ok\n"))
    }
}

fn main() {
    let cli: Cli = common::parse("127.0.0.1:9001");
    common::init_logging();
    let server = cli
        .server
        .builder()
        .max_message_size(64 << 20)
        .max_frame_size(64 << 20)
        .build(Echo);
    let handle = common::start("echo", server);
    common::listening("echo", &handle, &cli.server, "");
    common::serve("echo", &handle);
}
