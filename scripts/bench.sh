#!/usr/bin/env bash
# Benchmarks of a release build of `citadel work` against a local redis-server
# (not part of the tests). Prints: idle RSS, burn-down of 100 000 pre-enqueued
# echo jobs (full contract: events, status, ack), enqueue→start latency of
# 2 000 jobs enqueued at 500/s (and, in the same run, of a floor consumer
# that only reads and publishes `start`), and llm_inference streaming: 256 jobs of
# 1 000 tokens each from a fake vLLM, engine write → chunk event latency and
# agent CPU, once as fast as the engine can and once paced at 100 tokens/s
# per stream (BENCH_LLM_TOKEN_US=10000); model_download of a 1 GiB file from a
# local server against `curl -o` of it (BENCH_DOWNLOAD_MIB=256 for less);
# the gateway: 64 streaming chat requests through `citadel gateway` against the
# same sent straight to the fake engine (added latency per token, CPU).
#
#   scripts/bench.sh                    # everything
#   BENCH_JOBS=20000 scripts/bench.sh   # a shorter burn-down
#
# The burn-down runs citadel at --concurrency 8 and 64, at 64 once more with
# --events-stream=false (what the replayable events stream costs), and
# BullMQ (the npm package pinned in bench/package-lock.json, installed here
# with `npm ci` when missing; needs node and npm; BENCH_PEERS=0 skips it),
# each on its own redis-server, 3 interleaved rounds (BENCH_ROUNDS), medians
# with min–max; with each, the Redis memory a finished job leaves behind.
#
# Exits 1, naming them, when any benchmark fails or does not run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${BENCH_PEERS:-1}" != 0 ] && [ ! -d bench/node_modules/bullmq ]; then
    command -v npm >/dev/null || {
        echo "npm is missing (the BullMQ peer needs node 20 and npm): apt-get install nodejs npm, or BENCH_PEERS=0" >&2
        exit 1
    }
    (cd bench && npm ci --no-audit --no-fund --loglevel=error) || {
        echo "npm ci in bench/ failed: the BullMQ peer cannot run (BENCH_PEERS=0 skips it)" >&2
        exit 1
    }
fi
command -v redis-server >/dev/null || {
    echo "redis-server is missing: run scripts/test.sh once, or apt-get install redis-server" >&2
    exit 1
}
# run_bench NAME: prints the benchmark's result lines; a benchmark that fails
# (or does not build) prints its whole output and is remembered in FAILED.
FAILED=()
run_bench() {
    local out rc=0 why
    out=$(cargo test --release --quiet --test bench -- --ignored --exact "$1" --nocapture --test-threads 1 2>&1) || rc=$?
    # `--exact` with a name that matches nothing runs 0 tests and passes.
    why="exit $rc"
    if [ "$rc" -eq 0 ] && ! grep -q 'test result: ok\. 1 passed' <<<"$out"; then
        rc=1
        why="no benchmark of that name ran"
    fi
    if [ "$rc" -eq 0 ]; then
        grep -E '^(idle|burn|pickup|enqueued|llm|download|gateway|cluster)' <<<"$out" || true
    else
        printf '%s\n' "$out"
        echo "bench: $1 FAILED ($why)" >&2
        FAILED+=("$1${BENCH_LLM_TOKEN_US:+ (BENCH_LLM_TOKEN_US=$BENCH_LLM_TOKEN_US)}${BENCH_LLM_COALESCE:+ (BENCH_LLM_COALESCE=$BENCH_LLM_COALESCE)}")
    fi
}
for b in bench_idle_rss bench_burn_down bench_pickup_latency bench_llm_stream bench_model_download bench_gateway_stream bench_cluster_burn_down; do
    run_bench "$b"
done
BENCH_LLM_TOKEN_US=10000 run_bench bench_llm_stream
# The same two with --coalesce-chunks (--chunk-hold 0s: only what waits together).
BENCH_LLM_COALESCE=0s run_bench bench_llm_stream
BENCH_LLM_COALESCE=0s BENCH_LLM_TOKEN_US=10000 run_bench bench_llm_stream
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "bench: ${#FAILED[@]} benchmark(s) failed: ${FAILED[*]}" >&2
    exit 1
fi
