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

step() { printf '\n==> %s\n' "$*"; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi

APT_UPDATED=0
# apt_install PKG... : returns non-zero (with a message) instead of exiting.
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "apt-get not found: cannot install $*" >&2
        return 1
    fi
    if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
        echo "not root and no sudo: cannot install $*" >&2
        return 1
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update || return 1
        APT_UPDATED=1
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

add_to_path() {
    local dir
    for dir in "$@"; do
        if [ -d "$dir" ]; then
            case ":$PATH:" in
            *":$dir:"*) ;;
            *) PATH="$dir:$PATH" ;;
            esac
        fi
    done
    export PATH
}

# --- redis-server: the integration tests spawn real servers from PATH --------
if ! command -v redis-server >/dev/null 2>&1; then
    step "installing redis-server"
    apt_install redis-server ||
        die "could not install redis-server; install it by hand (apt-get install redis-server) and rerun"
    # The tests start their own servers on free ports; the packaged service is not needed.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
    fi
fi
command -v redis-server >/dev/null 2>&1 || die "redis-server is not on PATH"

# --- Rust toolchain (best effort) ----------------------------------------------
# ~/.cargo/bin: rustup.rs installs; /usr/lib/rustup/bin: Debian's rustup package.
add_to_path "$HOME/.cargo/bin" /usr/lib/rustup/bin
if ! command -v cargo >/dev/null 2>&1; then
    step "installing a Rust toolchain"
    if ! command -v rustup >/dev/null 2>&1; then
        apt_install rustup || echo "note: no apt 'rustup' package here; trying https://sh.rustup.rs" >&2
    fi
    if ! command -v rustup >/dev/null 2>&1; then
        if ! command -v curl >/dev/null 2>&1; then
            apt_install curl ca-certificates || true
        fi
        command -v curl >/dev/null 2>&1 ||
            die "cannot install Rust (no rustup, no curl); see https://rustup.rs and rerun"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
            sh -s -- -y --no-modify-path --default-toolchain none ||
            die "the rustup.rs installer failed; install Rust by hand (https://rustup.rs) and rerun"
        add_to_path "$HOME/.cargo/bin"
    fi
    rustup default stable ||
        die "'rustup default stable' failed; install Rust by hand (https://rustup.rs) and rerun"
    add_to_path "$HOME/.cargo/bin" /usr/lib/rustup/bin
    # rustc links through the system C compiler.
    if ! command -v cc >/dev/null 2>&1; then
        apt_install build-essential || echo "note: no C compiler (cc); linking may fail" >&2
    fi
    command -v cargo >/dev/null 2>&1 ||
        die "rustup ran but cargo is not on PATH; add ~/.cargo/bin (or /usr/lib/rustup/bin) to PATH and rerun"
fi
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
