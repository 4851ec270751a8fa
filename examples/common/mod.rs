//! What the examples share: the command line that sets a server up ([`ServerArgs`], and
//! [`BrokerArgs`] in the examples that span nodes), logging, and the line that says where a
//! server listens. Each example includes it with `#[path = "common/mod.rs"] mod common;`;
//! cargo builds only `examples/*.rs` as examples, not this directory.
//!
//! Exit statuses are the same everywhere: 0 after `--help` or a clean shutdown, 2 for a bad
//! command line (with the usage on stderr), 1 when the server cannot start or a shard fails.

// Each example uses part of this module (echo has no broker).
#![allow(dead_code)]

use std::io::IsTerminal;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use ringsock::server::{Builder, Handler, Server, ServerHandle, TlsConfig};
use tracing_subscriber::EnvFilter;

/// Where and how the server runs: the flags every example takes.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Address to listen on (not used with --systemd-socket)
    #[arg(
        long,
        env = "RINGSOCK_ADDR",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:9001"
    )]
    pub addr: String,

    /// Shard threads, 0 for one per CPU
    #[arg(long, env = "RINGSOCK_SHARDS", value_name = "N", default_value_t = 0)]
    pub shards: usize,

    /// Receive with single-shot reads into per-connection buffers instead of a provided-buffer
    /// ring (the fallback path, to measure or exercise it)
    #[arg(long)]
    pub no_buffer_ring: bool,

    /// Let publications wait up to this many microseconds in subscribers' outputs, so that
    /// those published meanwhile go out in one send (0: each at the end of its round)
    #[arg(
        long,
        env = "RINGSOCK_PUBLISH_LINGER_US",
        value_name = "MICROS",
        default_value_t = 0
    )]
    pub publish_linger_us: u64,

    /// Serve the listening socket systemd passes (socket activation) instead of binding --addr
    #[arg(long)]
    pub systemd_socket: bool,

    /// Join the listeners of a server already on --addr (the new process of a restart that
    /// loses nothing: start it, then SIGTERM the old one)
    #[arg(long)]
    pub share_address: bool,

    /// Answer GET PATH with the server's metrics in the Prometheus text format; an empty PATH
    /// turns this off
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/metrics",
        value_parser = metrics_path
    )]
    pub metrics_path: String,

    /// Serve wss:// with this certificate chain and private key (PEM files)
    #[arg(long, num_args = 2, value_names = ["CERT", "KEY"])]
    pub tls: Option<Vec<std::path::PathBuf>>,
}

impl ServerArgs {
    /// A builder set up as the flags say.
    pub fn builder(&self) -> Builder {
        let use_buffer_ring = !self.no_buffer_ring;
        let builder = Builder::new()
            .shards(self.shards)
            .share_address(self.share_address)
            .publish_linger(std::time::Duration::from_micros(self.publish_linger_us))
            .configure(|c| c.buffers.use_buffer_ring = use_buffer_ring);
        let builder = if self.systemd_socket {
            builder.systemd_socket()
        } else {
            builder.addr(self.addr.as_str())
        };
        let builder = match self.tls.as_deref() {
            Some([cert, key]) => match TlsConfig::from_pem_files(cert, key) {
                Ok(tls) => builder.tls(tls),
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(1)
                }
            },
            _ => builder,
        };
        if self.metrics_path.is_empty() {
            builder
        } else {
            builder.metrics_path(&self.metrics_path)
        }
    }

    /// `ws` or `wss`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "wss"
        } else {
            "ws"
        }
    }
}

/// `--metrics-path`: empty, or an absolute path without a query.
fn metrics_path(path: &str) -> Result<String, String> {
    if path.is_empty() || (path.starts_with('/') && !path.contains(['?', '#', ' '])) {
        Ok(path.to_owned())
    } else {
        Err("a path such as /metrics, or empty for none".to_owned())
    }
}

/// The broker that links this node to others, for the examples whose topics span nodes.
#[derive(clap::Args, Debug)]
pub struct BrokerArgs {
    /// Share topics with other nodes through Redis pub/sub, e.g. redis://127.0.0.1:6379
    /// (needs the `redis` feature)
    #[arg(long, value_name = "URL", conflicts_with = "nats")]
    pub redis: Option<String>,

    /// Share topics with other nodes through NATS core subjects, e.g. nats://127.0.0.1:4222
    /// (needs the `nats` feature)
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
}

impl BrokerArgs {
    /// The engine asked for and its URL, if any.
    pub fn engine(&self) -> Option<(&'static str, &str)> {
        match (&self.redis, &self.nats) {
            (Some(url), _) => Some(("redis", url)),
            (None, Some(url)) => Some(("nats", url)),
            (None, None) => None,
        }
    }

    /// `builder` linked to the broker asked for. A build without that engine's feature, or a
    /// URL the engine refuses, is a bad command line of `T`: the usage and exit status 2.
    pub fn connect<T: CommandFactory>(&self, builder: Builder) -> Builder {
        let Some((engine, url)) = self.engine() else {
            return builder;
        };
        with_broker(builder, engine, url)
            .unwrap_or_else(|message| T::command().error(ErrorKind::InvalidValue, message).exit())
    }
}

#[cfg(any(feature = "redis", feature = "nats"))]
fn with_broker(builder: Builder, engine: &str, url: &str) -> Result<Builder, String> {
    use ringsock::broker::BrokerConfig;
    let config = match engine {
        #[cfg(feature = "redis")]
        "redis" => BrokerConfig::redis(url),
        #[cfg(feature = "nats")]
        "nats" => BrokerConfig::nats(url),
        _ => return Err(missing_feature(engine)),
    };
    config
        .map(|config| builder.broker(config))
        .map_err(|e| format!("--{engine} {url}: {e}"))
}

#[cfg(not(any(feature = "redis", feature = "nats")))]
fn with_broker(_: Builder, engine: &str, _: &str) -> Result<Builder, String> {
    Err(missing_feature(engine))
}

fn missing_feature(engine: &str) -> String {
    format!("--{engine} needs the `{engine}` feature: build the example with `--features {engine}`")
}

/// Parses the command line into `T`, with `default_addr` as the default of `--addr`. Exits 0
/// after printing `--help` or `--version`, and 2 with the usage on stderr for a bad command
/// line.
pub fn parse<T: Parser>(default_addr: &'static str) -> T {
    let mut command = T::command().mut_arg("addr", |arg| arg.default_value(default_addr));
    let matches = command.get_matches_mut();
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut command).exit())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`; e.g. `RUST_LOG=ringsock=debug`).
/// Stdout is left to the one line of [`listening`].
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal, not for a log file or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Says where `handle` listens: one line on stdout for scripts and tests,
/// `NAME: listening on ws://ADDR with N shards[, DETAILS]`, and the same as a log event.
pub fn listening(name: &str, handle: &ServerHandle, args: &ServerArgs, details: &str) {
    let addr = handle.local_addr();
    let shards = handle.shards();
    let scheme = args.scheme();
    println!("{name}: listening on {scheme}://{addr} with {shards} shards{details}");
    let metrics = (!args.metrics_path.is_empty()).then_some(args.metrics_path.as_str());
    tracing::info!(
        %addr,
        shards,
        systemd_socket = args.systemd_socket,
        metrics,
        "{name}: listening{details}"
    );
}

/// Runs `handle` until SIGINT or SIGTERM, then exits: 0 after a graceful shutdown, 1 when a
/// shard failed.
pub fn serve(name: &str, handle: &ServerHandle) -> ! {
    match handle.run_until_signal() {
        Ok(()) => {
            tracing::info!("{name}: stopped");
            std::process::exit(0)
        }
        Err(e) => {
            tracing::error!(error = %e, "{name}: stopped");
            std::process::exit(1)
        }
    }
}

/// Starts `server`, or exits 1 saying why.
pub fn start<H: Handler>(name: &str, server: Server<H>) -> ServerHandle {
    server.start().unwrap_or_else(|e| {
        tracing::error!(error = %e, "{name}: cannot start");
        std::process::exit(1)
    })
}
