#!/usr/bin/env bash
# Benchmarks of a release build of `citadel work` against a local redis-server
# (not part of the tests). Prints: idle RSS, burn-down of 100 000 pre-enqueued
# echo jobs (full contract: events, status, ack), and enqueue→start latency of
# 2 000 jobs enqueued at 500/s.
#
#   scripts/bench.sh                    # everything
#   BENCH_JOBS=20000 scripts/bench.sh   # a shorter burn-down
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v redis-server >/dev/null || {
    echo "redis-server is missing: run scripts/test.sh once, or apt-get install redis-server" >&2
    exit 1
}
for b in bench_idle_rss bench_burn_down bench_pickup_latency; do
    cargo test --release --quiet --test bench -- --ignored --exact "$b" --nocapture --test-threads 1 2>&1 |
        grep -E '^(idle|burn|pickup|enqueued)|panicked|FAILED' || true
done
