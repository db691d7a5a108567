#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/quickstart.sh: installs, only when
# missing, what building and testing citadel needs on a Debian/Ubuntu machine:
# redis-server (apt) and a Rust toolchain (Debian's `rustup` package, else the
# https://sh.rustup.rs installer). apt runs through sudo only when not root.

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

ensure_redis() {
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
}

ensure_rust() {
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
}

