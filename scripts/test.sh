#!/usr/bin/env bash
# The one command to set up and run the whole test suite on a fresh
# Debian/Ubuntu machine: rustfmt check, clippy (warnings are errors), then
# every test (integration tests start their own real redis-server processes).
#
#   scripts/test.sh              # everything
#   SKIP_LINT=1 scripts/test.sh  # tests only (no fmt/clippy)
#
# Installs, only when missing: redis-server (apt), a Rust toolchain (Debian's
# `rustup` package, else the https://sh.rustup.rs installer) and the rustfmt /
# clippy components. apt runs through sudo only when not already root.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/deps.sh
. scripts/deps.sh
ensure_redis
ensure_rust
printf 'using %s, %s\n' "$(cargo --version)" "$(redis-server --version | cut -d' ' -f1-3)"

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

# --- tests --------------------------------------------------------------------
step "cargo test --all-targets"
cargo test --all-targets

step "all checks passed"
