#!/usr/bin/env bash
# The comparison behind the tables in perf/README.md: every target scenario, ringsock against the
# peers, round-robin repetitions, medians. About 8 minutes on 2 cores for the echo scenarios;
# FANOUT=1 adds broadcast and crossnode (crossnode needs redis-server and nats-server).
# Output: tables on stdout, JSON and SVG per case in perf/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${REPS:-3}"
DUR="${DUR:-3}"
cargo build --release --example echo -p ringsock
cargo build --release -p ringsock-perf
perf=target/release/ringsock-perf
status=0
run() { "$perf" compare --reps "$REPS" "$@" || status=1; }
run --scenario throughput --conns 100 --inflight 16 --size 16,64 --duration "$DUR"
run --scenario rtt --size 16,64 --duration "$DUR"
run --scenario big --size 16M --fragment 0,64k --duration "$DUR"
run --scenario chop --size 1M --chop 64 --duration "$DUR"
run --scenario connections --conns 10000
if [ "${FANOUT:-0}" = 1 ]; then
    cargo build --release --example fanout -p ringsock --features redis,nats
    run --scenario broadcast --conns 10,1000,10000 --size 1k --duration "$DUR"
    run --scenario broadcast --conns 1000 --size 1k --rate 2000 --duration "$DUR"
    run --scenario crossnode --conns 1,100,1000 --rate 10000 --duration "$DUR"
fi
exit $status
