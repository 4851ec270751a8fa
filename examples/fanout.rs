//! Publish/subscribe node for measurements (`ringsock-perf`'s `broadcast` and `crossnode`
//! scenarios): a connection to `/sub/<topic>` is subscribed to `<topic>` when it opens; every
//! message from a connection to `/pub/<topic>` is published to `<topic>` unchanged (binary
//! stays binary), so a load generator's sequence numbers and timestamps arrive intact.
//! Subscribers' own messages are ignored; any other path gets 404.
//!
//! ```sh
//! cargo run --release --example fanout -- --addr 127.0.0.1:9003 --shards 1
//! # across nodes, on a broker (features `redis`, `nats`):
//! cargo build --release --example fanout --features redis,nats
//! target/release/examples/fanout --addr 127.0.0.1:9003 --redis redis://127.0.0.1:6379
//! target/release/examples/fanout --addr 127.0.0.1:9004 --redis redis://127.0.0.1:6379
//! ```
//!
//! The flags every example takes are in `--help` (`examples/common`); the default address is
//! `127.0.0.1:9003`. Prints one line when it listens, then runs until SIGINT/SIGTERM. Exits 2
//! on a bad command line (including `--redis`/`--nats` in a build without that feature, or a
//! URL the engine refuses), 1 when it cannot start or a shard fails.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;

use clap::Parser;
use ringsock::proto::handshake::{HttpError, Request};
use ringsock::server::{Decision, Handler, Message, Upgrade, Ws};

/// Publish/subscribe node: ws://HOST:PORT/sub/TOPIC subscribes to TOPIC; messages sent to
/// ws://HOST:PORT/pub/TOPIC are published to TOPIC unchanged.
#[derive(Parser, Debug)]
#[command(name = "fanout")]
struct Cli {
    #[command(flatten)]
    server: common::ServerArgs,
    #[command(flatten)]
    broker: common::BrokerArgs,
}

/// What a connection is for, from its path.
enum Role {
    Subscriber(String),
    Publisher(Arc<str>),
}

struct Fanout;

impl Handler for Fanout {
    type State = Role;

    fn on_upgrade(&self, req: &Request<'_>, _: &mut Upgrade<Role>) -> Decision<Role> {
        let path = req.path();
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        match (path.strip_prefix("/sub/"), path.strip_prefix("/pub/")) {
            (Some(topic), _) if !topic.is_empty() => {
                Decision::Accept(Role::Subscriber(topic.to_owned()))
            }
            (_, Some(topic)) if !topic.is_empty() => {
                Decision::Accept(Role::Publisher(Arc::from(topic)))
            }
            _ => Decision::from(HttpError::NotFound),
        }
    }

    fn on_open(&self, ws: &mut Ws<'_, Role>) {
        if let Role::Subscriber(topic) = ws.state() {
            let topic = topic.clone();
            ws.subscribe(&topic);
        }
    }

    fn on_message(&self, ws: &mut Ws<'_, Role>, msg: Message<'_>) {
        if let Role::Publisher(topic) = ws.state() {
            // A reference count, not a copy: `ws` is borrowed mutably by publish.
            let topic = Arc::clone(topic);
            ws.publish(&topic, msg);
        }
    }

    #[cfg(any(feature = "redis", feature = "nats"))]
    fn on_broker(&self, notice: ringsock::server::BrokerNotice) {
        tracing::info!(?notice, "fanout: broker link");
    }
}

fn main() {
    let cli: Cli = common::parse("127.0.0.1:9003");
    common::init_logging();
    let server = cli
        .broker
        .connect::<Cli>(cli.server.builder())
        .build(Fanout);
    let handle = common::start("fanout", server);
    let broker = cli
        .broker
        .engine()
        .map_or(String::new(), |(engine, _)| format!(", broker {engine}"));
    common::listening("fanout", &handle, &cli.server, &broker);
    common::serve("fanout", &handle);
}
