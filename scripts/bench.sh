#!/usr/bin/env bash
# Benchmarks of a release build of `citadel work` against a local redis-server
# (not part of the tests). Prints: idle RSS, burn-down of 100 000 pre-enqueued
# echo jobs (full contract: events, status, ack), enqueue→start latency of
# 2 000 jobs enqueued at 500/s, and llm_inference streaming: 256 jobs of
# 1 000 tokens each from a fake vLLM, engine write → chunk event latency and
# agent CPU, once as fast as the engine can and once paced at 100 tokens/s
# per stream (BENCH_LLM_TOKEN_US=10000).
#
#   scripts/bench.sh                    # everything
#   BENCH_JOBS=20000 scripts/bench.sh   # a shorter burn-down
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v redis-server >/dev/null || {
    echo "redis-server is missing: run scripts/test.sh once, or apt-get install redis-server" >&2
    exit 1
}
run_bench() {
    cargo test --release --quiet --test bench -- --ignored --exact "$1" --nocapture --test-threads 1 2>&1 |
        grep -E '^(idle|burn|pickup|enqueued|llm)|panicked|FAILED' || true
}
for b in bench_idle_rss bench_burn_down bench_pickup_latency bench_llm_stream; do
    run_bench "$b"
done
BENCH_LLM_TOKEN_US=10000 run_bench bench_llm_stream
