#!/usr/bin/env bash
# Chaos: N echo jobs (default 10 000) through 3 `citadel work` processes on one
# redis-server (AOF, appendfsync everysec) while workers are SIGKILLed and
# restarted every 2-5 s (at once under the same name, or after claim-idle so
# that the others reclaim), Redis is restarted gracefully and SIGKILLed (AOF
# replay), and refuses writes (maxmemory) for 3 s. A ledger from outside
# (status hashes, events, dead letters, XPENDING, the echo run log) checks
# that nothing was lost. See tests/chaos.rs.
#
#   scripts/chaos.sh                 # 10 000 jobs
#   scripts/chaos.sh --jobs 50000    # more
#   CHAOS_SEED=123 scripts/chaos.sh  # replay a schedule (printed as seed=)
#
# Prints one line starting with `CHAOS` (lost=, duplicates=, ...); exits
# non-zero when a job was lost, ran twice without a reason, or an event
# followed `end`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

jobs=10000
while [ $# -gt 0 ]; do
    case "$1" in
    --jobs) jobs="${2:?--jobs needs a number}"; shift 2 ;;
    --jobs=*) jobs="${1#--jobs=}"; shift ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "chaos.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
case "$jobs" in
'' | *[!0-9]*) echo "chaos.sh: --jobs must be a number, not '$jobs'" >&2; exit 2 ;;
esac

# shellcheck source=scripts/deps.sh
. scripts/deps.sh
ensure_redis
ensure_rust

CHAOS_JOBS="$jobs" cargo test --test chaos -- --ignored --exact chaos_full --nocapture
