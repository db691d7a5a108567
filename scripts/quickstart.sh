#!/usr/bin/env bash
# Quickstart on a fresh Debian/Ubuntu machine: installs what is missing
# (redis-server and redis-cli, a Rust toolchain), builds and installs
# `citadel`, then shows jobs processed end to end by `citadel work` on a local
# Redis: an echo job submitted with --follow (its chunks stream back), the
# status hash, a job that fails into the dead-letter stream, a clean shutdown
# — and the agent's main job, `llm_inference` on a real llama.cpp
# llama-server (SmolLM2-135M), its tokens streamed back as they are made.
#
#   scripts/quickstart.sh            # the LLM job too when the real engine is
#                                    # cached (scripts/real-engine.sh)
#   scripts/quickstart.sh --llm      # the LLM job for sure: builds and caches
#                                    # the engine first when it is missing
#                                    # (6-10 min on 2 cores, once)
#   scripts/quickstart.sh --no-llm   # echo jobs only
#   CITADEL_REDIS_URL=redis://host:6379 scripts/quickstart.sh   # your Redis
#   PREFIX=/opt/citadel scripts/quickstart.sh      # install to $PREFIX/bin
#
# Redis and llama-server are throwaway processes on free 127.0.0.1 ports,
# stopped on exit. The engine cache is CITADEL_ENGINE_CACHE (default
# ~/.cache/citadel/real-engine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LLM=auto
for arg in "$@"; do
    case "$arg" in
    --llm) LLM=yes ;;
    --no-llm) LLM=no ;;
    -h | --help)
        sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "quickstart: unknown argument: $arg (see --help)" >&2
        exit 2
        ;;
    esac
done

# shellcheck source=scripts/deps.sh
. scripts/deps.sh
ensure_rust
if [ -n "${CITADEL_REDIS_URL:-}" ]; then ensure_redis_cli; else ensure_redis; fi

# The real engine: from the cache, built only when asked for (--llm).
llama_server="" llama_model=""
engine_env=""
case "$LLM" in
yes)
    step "the real llama-server and model (scripts/real-engine.sh: built once, 6-10 min; then cached)"
    engine_env=$(scripts/real-engine.sh --print-env) ||
        die "scripts/real-engine.sh could not build the real llama-server (see above)"
    ;;
auto)
    engine_env=$(scripts/real-engine.sh --cached) || engine_env=""
    ;;
esac
while IFS='=' read -r key value; do
    case "$key" in
    CITADEL_LLAMA_SERVER) llama_server=$value ;;
    CITADEL_LLAMA_MODEL) llama_model=$value ;;
    esac
done <<<"$engine_env"

step "building citadel (release)"
cargo build --release --locked
if [ -z "${PREFIX:-}" ]; then
    if [ "$(id -u)" -eq 0 ]; then PREFIX=/usr/local; else PREFIX="$HOME/.local"; fi
fi
install -D -m 0755 target/release/citadel "$PREFIX/bin/citadel"
CITADEL="$PREFIX/bin/citadel"
echo "installed $CITADEL ($("$CITADEL" version))"
path_hint "$PREFIX/bin"

work=$(mktemp -d)
worker="" redis_pid="" llama_pid=""
stop() {
    if [ -n "$1" ] && kill "$1" 2>/dev/null; then
        wait "$1" 2>/dev/null || true
    fi
}
cleanup() {
    stop "$worker"
    stop "$llama_pid"
    stop "$redis_pid"
    rm -rf "$work"
}
trap cleanup EXIT

# wait_for WHAT PID SECONDS CMD...: until CMD succeeds; false when PID exits
# first, fatal after SECONDS.
wait_for() {
    local what=$1 pid=$2 deadline=$((SECONDS + $3))
    shift 3
    until "$@" >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || return 1
        [ "$SECONDS" -lt "$deadline" ] || die "$what did not come up within $3 s"
        sleep 0.05
    done
}

if [ -z "${CITADEL_REDIS_URL:-}" ]; then
    # A free port, then another if it was taken before redis-server bound it.
    for _ in 1 2 3; do
        port=$(free_port)
        step "starting a throwaway redis-server on 127.0.0.1:$port"
        redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
        redis_pid=$!
        if wait_for redis-server "$redis_pid" 10 redis-cli -p "$port" ping; then
            export CITADEL_REDIS_URL="redis://127.0.0.1:$port"
            break
        fi
        wait "$redis_pid" 2>/dev/null || true
        redis_pid=""
        grep -q 'Address already in use' "$work/redis.log" || {
            cat "$work/redis.log" >&2
            die "redis-server did not start"
        }
    done
    [ -n "$redis_pid" ] || die "redis-server could not get a free port"
fi
export CITADEL_NODE_NAME=quickstart

llama_ready() {
    "$CITADEL" status --llamacpp-url "$1" 2>/dev/null | grep -qE '^llamacpp +[^ ]+ +ready'
}
work_args=(--concurrency 2)
if [ -n "$llama_server" ]; then
    for _ in 1 2 3; do
        lport=$(free_port)
        llama_url="http://127.0.0.1:$lport"
        step "starting the real llama-server on $llama_url (log: $work/llama-server.log)"
        # One thread: on a small machine its threads spin-wait on each other.
        "$llama_server" -m "$llama_model" --host 127.0.0.1 --port "$lport" \
            -c 2048 -np 1 -t 1 --no-webui >"$work/llama-server.log" 2>&1 &
        llama_pid=$!
        if wait_for llama-server "$llama_pid" 120 llama_ready "$llama_url"; then
            break
        fi
        wait "$llama_pid" 2>/dev/null || true
        llama_pid=""
        grep -qi 'bind\|address already in use' "$work/llama-server.log" || {
            tail -n 30 "$work/llama-server.log" >&2
            die "llama-server did not start"
        }
    done
    [ -n "$llama_pid" ] || die "llama-server could not get a free port"
    work_args+=(--llamacpp-url "$llama_url")
    step "citadel status --llamacpp-url $llama_url"
    "$CITADEL" status --llamacpp-url "$llama_url" | grep -E '^(ENGINE|llamacpp)'
fi

step "starting 'citadel work ${work_args[*]}' (log: $work/worker.log)"
"$CITADEL" work "${work_args[@]}" >"$work/worker.log" 2>&1 &
worker=$!

step "citadel submit --type echo --payload '{\"chunks\":3,\"sleep_ms\":200}' --follow"
"$CITADEL" submit --type echo --job-id quickstart-1 --payload '{"chunks":3,"sleep_ms":200}' --follow

step "the job's status hash (job:quickstart-1:status)"
redis-cli -u "$CITADEL_REDIS_URL" hgetall job:quickstart-1:status | paste - -

step "a job that fails for good goes to the dead-letter stream"
"$CITADEL" submit --type echo --payload '{"fail":"permanent"}' --follow || true
"$CITADEL" dlq list

if [ -n "$llama_server" ]; then
    payload='{"backend":"llamacpp","model":"smollm2","messages":[{"role":"user","content":"Tell me a short story about a lighthouse."}],"max_tokens":96,"temperature":0}'
    step "the agent's main job: llm_inference on the real llama-server, tokens streamed as they come"
    echo "citadel submit --type llm_inference --payload '$payload' --follow"
    "$CITADEL" submit --type llm_inference --job-id quickstart-llm --payload "$payload" --follow
    step "its status hash (job:quickstart-llm:status)"
    redis-cli -u "$CITADEL_REDIS_URL" hgetall job:quickstart-llm:status | paste - -
elif [ "$LLM" = auto ]; then
    note "no llm_inference job: the real llama-server is not cached (scripts/quickstart.sh --llm builds it, 6-10 min once)"
fi

step "stopping the worker (SIGTERM: finish in-flight jobs, exit 0)"
kill -TERM "$worker"
wait "$worker" && echo "worker exited 0"
worker=""
echo
echo "worker log:"
sed 's/^/  /' "$work/worker.log"
