#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/quickstart.sh (from the repository
# root): installs, only when missing, what building and testing citadel needs
# on a Debian/Ubuntu machine. apt runs through sudo only when not root.
#
#   ensure_rust       a Rust toolchain at least Cargo.toml's rust-version:
#                     Debian's apt cargo is often older, so a too-old one is
#                     replaced by rustup's stable (Debian's `rustup` package,
#                     else the https://sh.rustup.rs installer)
#   ensure_redis      redis-server and redis-cli
#   ensure_redis_cli  redis-cli alone (redis-tools)
#   ensure_openssl    openssl (the rediss:// test makes its certificates with it)
#   ensure_docker     dockerd + the docker CLI (docker.io) and a static busybox
#                     (busybox-static): tests/docker.rs starts private daemons
#   ensure_openai_venv  a Python venv with the official `openai` client (PyPI),
#                     under target/tmp/openai-venv, for tests/gateway_openai.rs
#   free_port         a free 127.0.0.1 port (never a fixed fallback)
#   path_hint DIR     tells how to put DIR on PATH when it is not there

step() { printf '\n==> %s\n' "$*"; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
note() { printf 'note: %s\n' "$*" >&2; }

# PATH as the caller had it, for path_hint: add_to_path changes ours.
CALLER_PATH=${CALLER_PATH:-$PATH}

# CI=true (or 1): what would be skipped elsewhere is a failure.
in_ci() {
    case "${CI:-}" in
    true | TRUE | True | 1) return 0 ;;
    *) return 1 ;;
    esac
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
    hash -r
}

# path_hint DIR: DIR holds something just installed; say how to reach it if
# the caller's PATH does not have it.
path_hint() {
    case ":$CALLER_PATH:" in
    *":$1:"*) ;;
    *)
        note "$1 is not on your PATH; add it, e.g.:"
        printf "    echo 'export PATH=\"%s:\$PATH\"' >>~/.profile && . ~/.profile\n" "$1" >&2
        ;;
    esac
}

# free_port: a port that was free on 127.0.0.1 a moment ago (the kernel picks
# it). Callers retry on a bind race; there is no fixed fallback.
free_port() {
    if ! command -v python3 >/dev/null 2>&1; then
        apt_install python3 >&2 || die "python3 is needed to pick a free port; install it and rerun"
    fi
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()' ||
        die "could not pick a free port on 127.0.0.1"
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
    ensure_redis_cli
}

ensure_redis_cli() {
    if ! command -v redis-cli >/dev/null 2>&1; then
        step "installing redis-tools (redis-cli)"
        apt_install redis-tools ||
            die "could not install redis-tools; install it by hand (apt-get install redis-tools) and rerun"
    fi
    command -v redis-cli >/dev/null 2>&1 || die "redis-cli is not on PATH"
}

# ensure_openssl: the rediss:// test (tests/tls.rs) makes a throwaway CA with
# it. Outside CI a machine without it only skips that test (loudly).
ensure_openssl() {
    command -v openssl >/dev/null 2>&1 && return 0
    step "installing openssl (for the rediss:// test)"
    if ! apt_install openssl || ! command -v openssl >/dev/null 2>&1; then
        in_ci && die "could not install openssl, which the rediss:// test needs (CI=true: no skipping)"
        note "no openssl: the rediss:// test will be SKIPPED"
    fi
}

# ensure_docker: tests/docker.rs starts a private dockerd per test (Debian's
# docker.io gives /usr/sbin/dockerd and the CLI) and makes its test images
# from a static busybox (busybox-static). Outside CI a machine without them
# only skips those tests (loudly).
ensure_docker() {
    local missing=()
    [ -x /usr/sbin/dockerd ] || command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v docker >/dev/null 2>&1 || case " ${missing[*]} " in *" docker.io "*) ;; *) missing+=(docker.io) ;; esac
    if ! { [ -x /bin/busybox ] && file_is_static /bin/busybox; }; then
        missing+=(busybox-static)
    fi
    [ "${#missing[@]}" -eq 0 ] && return 0
    step "installing ${missing[*]} (for the Docker tests)"
    if ! apt_install "${missing[@]}"; then
        in_ci && die "could not install ${missing[*]}, which tests/docker.rs needs (CI=true: no skipping)"
        note "no ${missing[*]}: the Docker tests will be SKIPPED"
    fi
}

# ensure_openai_venv: tests/gateway_openai.rs drives `citadel gateway` with
# the official openai Python client, from a venv kept under target/ (made
# once; a warm run finds it). Needs python3 with venv (Debian: python3-venv).
# Outside CI a machine without it only skips that test (loudly).
ensure_openai_venv() {
    local venv="${CARGO_TARGET_DIR:-target}/tmp/openai-venv"
    [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import openai' >/dev/null 2>&1 && return 0
    step "making $venv (the openai Python client, for the gateway test)"
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt_install python3 python3-venv || true
    fi
    rm -rf "$venv"
    if ! { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet openai; }; then
        rm -rf "$venv"
        in_ci && die "could not make the openai venv that tests/gateway_openai.rs needs (CI=true: no skipping)"
        note "no openai venv: the gateway's openai-client test will be SKIPPED"
    fi
}

# file_is_static PATH: PATH is an executable that needs no shared library.
file_is_static() {
    ! ldd "$1" >/dev/null 2>&1
}

# --- Rust ---------------------------------------------------------------------

# The rust-version Cargo.toml asks for (e.g. 1.80).
required_rust() {
    sed -n 's/^rust-version *= *"\([0-9][0-9.]*\)".*/\1/p' Cargo.toml | head -n1
}

# The version of the rustc on PATH (e.g. 1.95.0), or nothing when there is
# none that works (a rustup proxy without a toolchain does not).
rustc_version() {
    { rustc --version 2>/dev/null || true; } | awk '{print $2}' | sed 's/-.*//'
}

# version_ge HAVE NEED: HAVE >= NEED, compared as versions.
version_ge() {
    printf '%s\n%s\n' "$2" "$1" | sort -V -C
}

install_rustup() {
    apt_install rustup || note "no apt 'rustup' package here; trying https://sh.rustup.rs"
    add_to_path /usr/lib/rustup/bin
    command -v rustup >/dev/null 2>&1 && return 0
    if ! command -v curl >/dev/null 2>&1; then
        apt_install curl ca-certificates || true
    fi
    command -v curl >/dev/null 2>&1 ||
        die "cannot install Rust (no rustup, no curl); see https://rustup.rs and rerun"
    local installer
    installer=$(mktemp)
    if ! curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs -o "$installer" ||
        ! sh "$installer" -y --no-modify-path --default-toolchain none; then
        rm -f "$installer"
        die "the rustup.rs installer failed; install Rust by hand (https://rustup.rs) and rerun"
    fi
    rm -f "$installer"
    add_to_path "$HOME/.cargo/bin"
    command -v rustup >/dev/null 2>&1 ||
        die "the rustup.rs installer ran but rustup is not in ~/.cargo/bin; install Rust by hand (https://rustup.rs) and rerun"
    path_hint "$HOME/.cargo/bin"
}

ensure_rust() {
    # ~/.cargo/bin: rustup.rs installs; /usr/lib/rustup/bin: Debian's rustup
    # package. Both go before /usr/bin, where an apt cargo may be.
    add_to_path "$HOME/.cargo/bin" /usr/lib/rustup/bin
    local need have
    need=$(required_rust)
    [ -n "$need" ] || die "no rust-version in Cargo.toml"
    have=$(rustc_version)
    if [ -n "$have" ] && version_ge "$have" "$need" && command -v cargo >/dev/null 2>&1; then
        return 0
    fi
    if [ -z "$have" ]; then
        step "installing a Rust toolchain (Cargo.toml needs rust-version >= $need)"
    else
        step "rustc $have ($(command -v rustc)) is older than Cargo.toml's rust-version $need: installing rustup's stable toolchain"
    fi
    command -v rustup >/dev/null 2>&1 || install_rustup
    # `toolchain install` also updates a stable that is already there but old.
    rustup toolchain install stable ||
        die "'rustup toolchain install stable' failed; install Rust >= $need by hand (https://rustup.rs) and rerun"
    rustup default stable ||
        die "'rustup default stable' failed; install Rust >= $need by hand (https://rustup.rs) and rerun"
    add_to_path "$HOME/.cargo/bin" /usr/lib/rustup/bin
    have=$(rustc_version)
    if [ -z "$have" ] || ! version_ge "$have" "$need"; then
        die "rustc ${have:-is missing} ($(command -v rustc || echo 'not on PATH')) but Cargo.toml needs rust-version >= $need; put rustup's toolchain first on PATH (~/.cargo/bin or /usr/lib/rustup/bin) or remove the old one (e.g. apt-get remove cargo rustc), and rerun"
    fi
    # rustc links through the system C compiler.
    if ! command -v cc >/dev/null 2>&1; then
        apt_install build-essential || note "no C compiler (cc); linking may fail"
    fi
    command -v cargo >/dev/null 2>&1 ||
        die "rustup ran but cargo is not on PATH; add ~/.cargo/bin (or /usr/lib/rustup/bin) to PATH and rerun"
    echo "using rustc $have (Cargo.toml needs >= $need)"
}
