#!/usr/bin/env bash
# Fuzz the parsers that take outside input, each for a set time: the
# property tests of src/proptests.rs (job entries, Nexus jobs, settings,
# config files, durations, device configs) and
# src/handlers/inference/proptests.rs (SSE and NDJSON decoders) and
# src/gateway/proptests.rs (gateway request bodies and heads). cargo-fuzz
# would need a nightly toolchain and cargo-fuzz itself; these run on stable.
#
#   scripts/fuzz.sh                    # every target, 60 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh   # longer
#   scripts/fuzz.sh sse_never_panics   # only targets whose name contains this
#
# Each target runs in rounds of PROPTEST_CASES cases (default 2000), each
# round with a fresh random seed, until its time is up. A failing case is
# shrunk and saved by proptest under proptest-regressions/ (commit that file:
# the case is then replayed first by every `cargo test`), and the script
# exits non-zero. One line per target: `FUZZ name cases=N seconds=S ok|FAILED`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${FUZZ_SECONDS:-60}
cases=${PROPTEST_CASES:-2000}
filter=${1:-}

cargo test --bin citadel --no-run 2>/dev/null || cargo test --bin citadel --no-run
targets=$(cargo test -q --bin citadel -- --list 2>/dev/null | sed -n 's/^\(.*proptests::[a-z_0-9]*\): test$/\1/p' | grep -v payload_floats | grep -- "$filter" || true)
[ -n "$targets" ] || { echo "fuzz.sh: no target matches '$filter'" >&2; exit 2; }

failed=0
for t in $targets; do
    start=$(date +%s)
    n=0
    status=ok
    while [ $(($(date +%s) - start)) -lt "$seconds" ]; do
        if ! PROPTEST_CASES="$cases" cargo test -q --bin citadel -- --exact "$t" >/tmp/citadel-fuzz.$$ 2>&1; then
            cat /tmp/citadel-fuzz.$$ >&2
            status=FAILED
            failed=1
            break
        fi
        n=$((n + cases))
    done
    rm -f /tmp/citadel-fuzz.$$
    echo "FUZZ $t cases=$n seconds=$(($(date +%s) - start)) $status"
done
exit "$failed"
