#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzingclient against examples/echo and compares the outcome with
# autobahn/expected.json (behavior and close behavior of every case; durations are ignored).
#
#   autobahn/run.sh            all 517 cases (12.x/13.x permessage-deflate take ~12 minutes)
#   autobahn/run.sh --quick    1.x-10.x only (~20 s)
#   autobahn/run.sh --update   rewrite expected.json from this run (review the diff!)
#   autobahn/run.sh --tls      over wss:// (a self-signed certificate made with openssl);
#                              combine with --quick for 1.x-10.x
#
# The client: Docker's crossbario/autobahn-testsuite when a Docker engine answers; otherwise
# the command in $WSTEST, called as `$WSTEST --url URL --out DIR [--cases ...|--exclude ...]`
# (CI sets it to ../shared/autobahn/fuzz, the PyPI suite ported to Python 3).
# Exit status: non-zero on any case or close that differs from expected.json, on any FAILED
# or UNCLEAN outcome, or on missing cases.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
quick=0
update=0
tls=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    --update) update=1 ;;
    --tls) tls=1 ;;
    *) echo "usage: $0 [--quick] [--update] [--tls]" >&2; exit 2 ;;
  esac
done

port=${AUTOBAHN_PORT:-9301}
scheme=ws
reports="$here/reports"
summary="$here/summary.txt"
if [ "$tls" = 1 ]; then
  port=${AUTOBAHN_TLS_PORT:-9302}
  scheme=wss
  reports="$here/reports-tls"
  summary="$here/summary-tls.txt"
fi
rm -rf "$reports"
mkdir -p "$reports"

cd "$root"
cargo build --release --example echo
server_args=(--addr "127.0.0.1:$port")
if [ "$tls" = 1 ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$reports/key.pem" -out "$reports/cert.pem" 2>/dev/null
  server_args+=(--tls "$reports/cert.pem" "$reports/key.pem")
fi
./target/release/examples/echo "${server_args[@]}" >"$reports/echo.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

selection=()
[ "$quick" = 1 ] && selection=(--exclude '12.*,13.*')

if docker info >/dev/null 2>&1; then
  echo "autobahn: using docker crossbario/autobahn-testsuite"
  spec="$reports/fuzzingclient.json"
  python3 - "$here/fuzzingclient.json" "$spec" "$port" "$quick" "$scheme" <<'PY'
import json, sys
spec = json.load(open(sys.argv[1]))
spec["servers"][0]["url"] = "%s://127.0.0.1:%s" % (sys.argv[5], sys.argv[3])
if sys.argv[4] == "1":
    spec["exclude-cases"] = ["12.*", "13.*"]
json.dump(spec, open(sys.argv[2], "w"), indent=2)
PY
  docker run --rm --network host -v "$reports:/reports" \
    crossbario/autobahn-testsuite wstest -m fuzzingclient -s /reports/fuzzingclient.json
elif [ -n "${WSTEST:-}" ]; then
  echo "autobahn: using \$WSTEST=$WSTEST"
  "$WSTEST" --url "$scheme://127.0.0.1:$port" --agent ringsock --out "$reports" --quiet \
    "${selection[@]}" || true # judged below, against expected.json
else
  echo "autobahn: no Docker engine and no \$WSTEST; set WSTEST to a wstest wrapper" \
    "(e.g. WSTEST=../shared/autobahn/fuzz)" >&2
  exit 2
fi

kill $server 2>/dev/null || true
args=("$reports" "$here/expected.json" --summary "$summary")
[ "$quick" = 1 ] && args+=(--exclude '12.,13.')
[ "$update" = 1 ] && args+=(--update)
python3 "$here/compare.py" "${args[@]}"
