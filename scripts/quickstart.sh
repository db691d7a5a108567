#!/usr/bin/env bash
# Quickstart on a fresh Debian/Ubuntu machine: installs what is missing
# (redis-server, a Rust toolchain), builds and installs `citadel`, then shows
# a job processed end to end: a worker on a local Redis, a job submitted with
# --follow (its chunks stream back), the status hash, and a clean shutdown.
#
#   scripts/quickstart.sh                          # starts a throwaway redis-server
#   CITADEL_REDIS_URL=redis://host:6379 scripts/quickstart.sh   # uses yours
#   PREFIX=/opt/citadel scripts/quickstart.sh      # install to $PREFIX/bin
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/deps.sh
. scripts/deps.sh
ensure_rust
[ -n "${CITADEL_REDIS_URL:-}" ] || ensure_redis

step "building citadel (release)"
cargo build --release --locked
if [ -z "${PREFIX:-}" ]; then
    if [ "$(id -u)" -eq 0 ]; then PREFIX=/usr/local; else PREFIX="$HOME/.local"; fi
fi
install -D -m 0755 target/release/citadel "$PREFIX/bin/citadel"
CITADEL="$PREFIX/bin/citadel"
echo "installed $CITADEL ($("$CITADEL" version))"

work=$(mktemp -d)
cleanup() {
    [ -n "${worker:-}" ] && kill "$worker" 2>/dev/null && wait "$worker" 2>/dev/null
    [ -n "${redis_pid:-}" ] && kill "$redis_pid" 2>/dev/null && wait "$redis_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

if [ -z "${CITADEL_REDIS_URL:-}" ]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 6390)
    step "starting a throwaway redis-server on 127.0.0.1:$port"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
    redis_pid=$!
    export CITADEL_REDIS_URL="redis://127.0.0.1:$port"
    for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
fi
export CITADEL_NODE_NAME=quickstart

step "starting 'citadel work' (log: $work/worker.log)"
"$CITADEL" work --concurrency 2 >"$work/worker.log" 2>&1 &
worker=$!

step "citadel submit --type echo --payload '{\"chunks\":3,\"sleep_ms\":200}' --follow"
"$CITADEL" submit --type echo --job-id quickstart-1 --payload '{"chunks":3,"sleep_ms":200}' --follow

step "the job's status hash (job:quickstart-1:status)"
redis-cli -u "$CITADEL_REDIS_URL" hgetall job:quickstart-1:status | paste - -

step "a job that fails for good goes to the dead-letter stream"
"$CITADEL" submit --type echo --payload '{"fail":"permanent"}' --follow || true
"$CITADEL" dlq list

step "stopping the worker (SIGTERM: finish in-flight jobs, exit 0)"
kill -TERM "$worker"
wait "$worker" && echo "worker exited 0"
worker=
echo
echo "worker log:"
sed 's/^/  /' "$work/worker.log"
