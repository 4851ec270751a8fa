//! Echo server: every message comes back with its type (text stays text). The Autobahn
//! target.
//!
//! ```sh
//! cargo run --release --example echo -- --addr 127.0.0.1:9001 --shards 2
//! ```
//!
//! `--addr` (or `RINGSOCK_ADDR`) defaults to `127.0.0.1:9001`; `--shards` (or
//! `RINGSOCK_SHARDS`) defaults to one per CPU. permessage-deflate is enabled. Messages up to
//! 64 MiB are accepted, in frames of up to 64 MiB. `--no-buffer-ring` switches to the
//! fallback path (single-shot receives into per-connection buffers).

use ringsock::proto::handshake::Request;
use ringsock::server::{Builder, Decision, Handler, Message, Upgrade, Ws};

struct Echo;

impl Handler for Echo {
    type State = ();

    fn on_upgrade(&self, _req: &Request<'_>, _upgrade: &mut Upgrade<()>) -> Decision<()> {
        Decision::Accept(())
    }

    fn on_message(&self, ws: &mut Ws<'_, ()>, msg: Message<'_>) {
        ws.send(msg);
    }
}

fn arg(name: &str, env: &str) -> Option<String> {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == name {
            return args.next();
        }
        if let Some(value) = a.strip_prefix(&format!("{name}=")) {
            return Some(value.to_owned());
        }
    }
    std::env::var(env).ok()
}

fn main() {
    let addr = arg("--addr", "RINGSOCK_ADDR").unwrap_or_else(|| "127.0.0.1:9001".into());
    let shards = match arg("--shards", "RINGSOCK_SHARDS").map(|s| s.parse::<usize>()) {
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("echo: bad --shards: {e}");
            std::process::exit(2);
        }
        None => 0,
    };
    // For measuring and for exercising the fallback: single-shot receives.
    let plain_recv = std::env::args().any(|a| a == "--no-buffer-ring");
    let server = Builder::new()
        .addr(addr.as_str())
        .shards(shards)
        .configure(|c| {
            c.buffers.use_buffer_ring = !plain_recv;
        })
        .max_message_size(64 << 20)
        .max_frame_size(64 << 20)
        .build(Echo);
    let handle = match server.start() {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("echo: cannot start: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "echo: listening on ws://{} with {} shards",
        handle.local_addr(),
        handle.shards()
    );
    if let Err(e) = handle.run_until_signal() {
        eprintln!("echo: {e}");
        std::process::exit(1);
    }
}
