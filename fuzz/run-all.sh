#!/bin/sh
# Runs every fuzz target for SECONDS each (default 60), seeded from fuzz/seeds/<target>, and
# fails on the first crash. For CI: `fuzz/run-all.sh 60`. Needs `cargo +nightly fuzz`.
set -eu
seconds="${1:-60}"
cd "$(dirname "$0")/.."
for target in fuzz/fuzz_targets/*.rs; do
    name="$(basename "$target" .rs)"
    mkdir -p "fuzz/corpus/$name"
    seeds=""
    [ -d "fuzz/seeds/$name" ] && seeds="fuzz/seeds/$name"
    echo "== $name: ${seconds}s"
    # shellcheck disable=SC2086 # $seeds is empty or one directory
    cargo +nightly fuzz run "$name" "fuzz/corpus/$name" $seeds -- \
        -max_total_time="$seconds" -print_final_stats=1
done
