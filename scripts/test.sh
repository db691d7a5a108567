#!/usr/bin/env bash
# The one command to set up and run the whole test suite on a fresh
# Debian/Ubuntu machine (CI runs it through .ci/run): rustfmt check, clippy
# (warnings are errors), then every test. Integration tests start their own
# real redis-server processes, and tests/real_engine.rs a real llama-server.
#
#   scripts/test.sh                              # everything
#   SKIP_LINT=1 scripts/test.sh                  # tests only (no fmt/clippy)
#   CITADEL_SKIP_REAL_ENGINE=1 scripts/test.sh   # without the real llama-server
#
# Installs, only when missing: redis-server and redis-cli, openssl (the
# rediss:// test), docker.io and busybox-static (tests/docker.rs starts a
# private dockerd per test and builds its images from busybox), a Rust toolchain of at least Cargo.toml's rust-version
# (rustup) with the rustfmt / clippy components, and the real llama-server
# and model: scripts/real-engine.sh builds them the first time (6-10 min on
# 2 cores) into ~/.cache/citadel/real-engine (CITADEL_ENGINE_CACHE), then
# they are reused. apt runs through sudo only when not already root.
#
# Then the static release binaries: scripts/build-release.sh builds them
# (x86_64 and aarch64 musl; the first build installs musl-tools, zig and
# cargo-zigbuild and takes ~5 min on 2 cores, later runs reuse what cargo
# built) and scripts/check-release.sh checks them (static, a real echo job,
# aarch64 under qemu-aarch64-static).
#
# Nothing is skipped unless asked for: only CITADEL_SKIP_REAL_ENGINE=1 skips
# the real-engine tests, and CITADEL_SKIP_RELEASE=1 the release build. The last line always says how many tests were
# skipped and which. Under CI=true a missing tool (openssl, the engine) is a
# failure in the tests themselves too, never a skip.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/deps.sh
. scripts/deps.sh
ensure_redis
ensure_rust
ensure_openssl
ensure_docker
ensure_openai_venv
printf 'using %s, %s\n' "$(cargo --version)" "$(redis-server --version | cut -d' ' -f1-3)"
# tests/install.rs checks the systemd unit with systemd-analyze verify.
if ! command -v systemd-analyze >/dev/null 2>&1; then
    step "installing systemd (systemd-analyze, for the unit's check)"
    apt_install systemd || die "could not install systemd (systemd-analyze); apt-get install systemd and rerun"
fi

# --- lint ---------------------------------------------------------------------
# ensure_component SUBCOMMAND COMPONENT: `cargo SUBCOMMAND` must work.
ensure_component() {
    if ! cargo "$1" --version >/dev/null 2>&1; then
        command -v rustup >/dev/null 2>&1 ||
            die "'cargo $1' is missing and there is no rustup to add the $2 component"
        step "installing the $2 component"
        rustup component add "$2"
    fi
}

if [ "${SKIP_LINT:-0}" = "1" ]; then
    step "skipping cargo fmt / cargo clippy (SKIP_LINT=1)"
else
    ensure_component fmt rustfmt
    ensure_component clippy clippy

    step "cargo fmt --check"
    cargo fmt --check

    step "cargo clippy --all-targets -- -D warnings"
    cargo clippy --all-targets -- -D warnings
fi

# --- the real engine ----------------------------------------------------------
case "${CITADEL_SKIP_REAL_ENGINE:-0}" in
1 | true)
    step "not using the real llama-server (CITADEL_SKIP_REAL_ENGINE=1): its tests are SKIPPED"
    export CITADEL_SKIP_REAL_ENGINE=1
    ;;
0 | false | "")
    unset CITADEL_SKIP_REAL_ENGINE
    step "the real llama-server and model (scripts/real-engine.sh: built once, 6-10 min; then cached)"
    engine_env=$(scripts/real-engine.sh --print-env) ||
        die "scripts/real-engine.sh could not build the real llama-server (see above); to run the other tests without it: CITADEL_SKIP_REAL_ENGINE=1 scripts/test.sh"
    while IFS='=' read -r key value; do
        case "$key" in
        CITADEL_LLAMA_SERVER | CITADEL_LLAMA_MODEL) export "$key=$value" ;;
        esac
    done <<<"$engine_env"
    if [ ! -x "${CITADEL_LLAMA_SERVER:-}" ] || [ ! -f "${CITADEL_LLAMA_MODEL:-}" ]; then
        die "scripts/real-engine.sh --print-env gave no usable engine: $engine_env"
    fi
    echo "llama-server: $CITADEL_LLAMA_SERVER"
    echo "model:        $CITADEL_LLAMA_MODEL"
    ;;
*) die "CITADEL_SKIP_REAL_ENGINE must be 1 or 0, not '$CITADEL_SKIP_REAL_ENGINE'" ;;
esac

# --- tests --------------------------------------------------------------------
step "cargo test --all-targets"
log=$(mktemp "${TMPDIR:-/tmp}/citadel-test.XXXXXX")
trap 'rm -f "$log"' EXIT
rc=0
cargo test --all-targets 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}

# Tests that did not run say so in one `SKIPPED: <test>: <why>` line each.
skipped=$(grep -c '^SKIPPED: ' "$log" || true)
summary="$skipped test(s) skipped"
if [ "$skipped" -gt 0 ]; then
    grep '^SKIPPED: ' "$log" >&2
    names=$(grep '^SKIPPED: ' "$log" | cut -d' ' -f2 | tr -d ':' | sort -u | paste -sd' ' -)
    summary="$summary: $names"
fi
if [ "$rc" -ne 0 ]; then
    step "cargo test failed (exit $rc)"
    echo "FAILED: cargo test exited $rc; $summary"
    exit "$rc"
fi

# --- the static release binaries ------------------------------------------------
# scripts/build-release.sh (x86_64 + aarch64 musl; cargo reuses what is built
# when the sources did not change) and scripts/check-release.sh (static,
# version, a real echo job; aarch64 under qemu-aarch64-static).
case "${CITADEL_SKIP_RELEASE:-0}" in
1 | true)
    step "not building the release binaries (CITADEL_SKIP_RELEASE=1): their checks are SKIPPED"
    skipped=$((skipped + 1))
    summary="$skipped test(s) skipped: ${names:+$names }release-checks"
    ;;
*)
    step "release build (scripts/build-release.sh) and checks (scripts/check-release.sh)"
    release_start=$(date +%s)
    scripts/build-release.sh || { echo "FAILED: scripts/build-release.sh; $summary"; exit 1; }
    release_built=$(date +%s)
    scripts/check-release.sh || { echo "FAILED: scripts/check-release.sh; $summary"; exit 1; }
    release_end=$(date +%s)
    echo "release build took $((release_built - release_start)) s, its checks $((release_end - release_built)) s"
    ;;
esac
step "all checks passed"
echo "all checks passed; $summary"
