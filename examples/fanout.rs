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
//! Prints one line when it listens, then runs until SIGINT/SIGTERM. Exits 2 on a bad command
//! line (including `--redis`/`--nats` in a build without that feature), 1 when it cannot
//! start or a shard fails.

use std::process::exit;
use std::sync::Arc;

use ringsock::proto::handshake::{HttpError, Request};
use ringsock::server::{Builder, Decision, Handler, Message, Upgrade, Ws};

const USAGE: &str = "\
usage: fanout [--addr HOST:PORT] [--shards N] [--redis URL | --nats URL]

  --addr HOST:PORT  where to listen (default 127.0.0.1:9003)
  --shards N        shard threads, 0 for one per CPU (default 0)
  --redis URL       share topics with other nodes over Redis pub/sub (feature `redis`)
  --nats URL        share topics with other nodes over NATS core subjects (feature `nats`)
  --help            this text

ws://HOST:PORT/sub/TOPIC subscribes to TOPIC; messages sent to ws://HOST:PORT/pub/TOPIC are
published to TOPIC unchanged.
";

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
        eprintln!("fanout: broker: {notice:?}");
    }
}

/// The command line.
struct Options {
    addr: String,
    shards: usize,
    /// `(flag, URL)` of the broker, if one was given.
    broker: Option<(&'static str, String)>,
}

fn usage_error(text: &str) -> ! {
    eprintln!("fanout: {text}\n\n{USAGE}");
    exit(2);
}

fn parse_args() -> Options {
    let mut options = Options {
        addr: "127.0.0.1:9003".into(),
        shards: 0,
        broker: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        if flag == "--help" || flag == "-h" {
            print!("{USAGE}");
            exit(0);
        }
        let flag: &'static str = match flag.as_str() {
            "--addr" => "--addr",
            "--shards" => "--shards",
            "--redis" => "--redis",
            "--nats" => "--nats",
            _ => usage_error(&format!("unknown argument {arg:?}")),
        };
        let Some(value) = inline.or_else(|| args.next()) else {
            usage_error(&format!("{flag} needs a value"));
        };
        match flag {
            "--addr" => options.addr = value,
            "--shards" => match value.parse() {
                Ok(n) => options.shards = n,
                Err(e) => usage_error(&format!("bad --shards {value:?}: {e}")),
            },
            _ => {
                if let Some((other, _)) = &options.broker {
                    usage_error(&format!("{flag} and {other}: give one broker"));
                }
                options.broker = Some((flag, value));
            }
        }
    }
    options
}

/// Connects the builder to the broker given on the command line; exits 2 if the build lacks
/// the engine's feature, 1 if the URL is refused.
#[allow(unused_mut)]
fn with_broker(mut builder: Builder, broker: Option<(&'static str, String)>) -> Builder {
    let Some((flag, url)) = broker else {
        return builder;
    };
    let engine = flag.trim_start_matches("--");
    let built = [
        ("redis", cfg!(feature = "redis")),
        ("nats", cfg!(feature = "nats")),
    ];
    let enabled = built.iter().any(|&(name, on)| name == engine && on);
    if !enabled {
        eprintln!(
            "fanout: {flag} needs the `{engine}` feature: cargo build --release --example \
             fanout --features {engine}"
        );
        exit(2);
    }
    #[cfg(any(feature = "redis", feature = "nats"))]
    {
        use ringsock::broker::BrokerConfig;
        let config = match engine {
            #[cfg(feature = "redis")]
            "redis" => BrokerConfig::redis(&url),
            #[cfg(feature = "nats")]
            "nats" => BrokerConfig::nats(&url),
            _ => unreachable!("checked against the enabled features above"),
        };
        match config {
            Ok(config) => builder = builder.broker(config),
            Err(e) => {
                eprintln!("fanout: {flag}: {e}");
                exit(1);
            }
        }
    }
    let _ = url;
    builder
}

fn main() {
    let options = parse_args();
    let broker = options.broker.as_ref().map(|(flag, _)| *flag);
    let builder = Builder::new()
        .addr(options.addr.as_str())
        .shards(options.shards);
    let server = with_broker(builder, options.broker).build(Fanout);
    let handle = match server.start() {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("fanout: cannot start: {e}");
            exit(1);
        }
    };
    println!(
        "fanout: listening on ws://{} with {} shards{}",
        handle.local_addr(),
        handle.shards(),
        broker.map_or(String::new(), |f| format!(", broker {}", &f[2..]))
    );
    if let Err(e) = handle.run_until_signal() {
        eprintln!("fanout: {e}");
        exit(1);
    }
}
