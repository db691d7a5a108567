#!/usr/bin/env bash
# Soak (not in CI): 1 000 000 echo jobs, then 10 000 llm_inference jobs
# against the fake vLLM, each through one `citadel work` (release build);
# its RSS and open fds are sampled from /proc every 500 ms and must stay flat.
# See tests/soak.rs. Prints one `SOAK …` line per run: the largest RSS and
# fd count of the first minute after the warm-up and of the last minute (a third of
# a run under 3 min), and of the whole run.
#
#   scripts/soak.sh                                  # 1 000 000 + 10 000
#   scripts/soak.sh --jobs 100000 --llm-jobs 2000    # scaled down
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs=1000000
llm_jobs=10000
while [ $# -gt 0 ]; do
    case "$1" in
    --jobs) jobs="${2:?--jobs needs a number}"; shift 2 ;;
    --llm-jobs) llm_jobs="${2:?--llm-jobs needs a number}"; shift 2 ;;
    -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "soak.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
for n in "$jobs" "$llm_jobs"; do
    case "$n" in
    '' | *[!0-9]*) echo "soak.sh: job counts must be numbers, not '$n'" >&2; exit 2 ;;
    esac
done

# shellcheck source=scripts/deps.sh
. scripts/deps.sh
ensure_redis
ensure_rust

SOAK_JOBS="$jobs" SOAK_LLM_JOBS="$llm_jobs" \
    cargo test --release --test soak -- --ignored --nocapture --test-threads 1
