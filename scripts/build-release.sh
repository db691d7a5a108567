#!/usr/bin/env bash
# Builds the static release binaries: x86_64 and aarch64 Linux, musl, one
# file each with no shared library needed (minimal and air-gapped nodes,
# Grace-based ARM servers). Output:
#
#   dist/citadel-<version>-x86_64-linux-musl.tar.gz
#   dist/citadel-<version>-aarch64-linux-musl.tar.gz
#   dist/SHA256SUMS
#
#   scripts/build-release.sh                    # both
#   scripts/build-release.sh --target x86_64    # one (x86_64 | aarch64)
#
# How, and why this way:
# - x86_64: `cargo build --target x86_64-unknown-linux-musl` with Debian's
#   musl-tools: ring (rustls' crypto, C and assembly) is compiled by
#   musl-gcc; Rust's own musl target links the rest statically.
# - aarch64: `cargo zigbuild --target aarch64-unknown-linux-musl`, zig from
#   PyPI's `ziglang`. zig is a C cross compiler and linker for aarch64 musl
#   in one download with no sysroot to set up. Debian has no aarch64 musl
#   cross toolchain (musl-tools is native only; gcc-aarch64-linux-gnu
#   targets glibc), so the Debian route would mean a multiarch musl-dev:arm64
#   plus linker wrappers.
# - Rust's musl targets come from `rustup target add`.
# - --no-default-features: no `nvml` (a static binary cannot dlopen
#   libnvidia-ml.so; these builds read GPUs with nvidia-smi).
# Installs, only when missing: those targets, musl-tools, ziglang (pip,
# user site), cargo-zigbuild (cargo install). Sources unchanged: cargo
# rebuilds nothing, and a tarball whose binary did not change is kept as it
# is (same bytes, same checksum). Tarballs are reproducible: sorted names,
# mtime 0, owner 0, gzip -n.
#
# Prints each binary's size; the target is at most 5 MiB (a bigger one is a
# warning here, and a failure of scripts/check-release.sh).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/deps.sh
. scripts/deps.sh

targets=(x86_64 aarch64)
while [ $# -gt 0 ]; do
    case "$1" in
    --target)
        [ $# -ge 2 ] || die "--target needs x86_64 or aarch64"
        case "$2" in
        x86_64 | aarch64) targets=("$2") ;;
        *) die "--target: '$2' is not x86_64 or aarch64" ;;
        esac
        shift 2
        ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done

ensure_rust
version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n1)
[ -n "$version" ] || die "no version in Cargo.toml"

ensure_target() {
    if ! rustup target list --installed 2>/dev/null | grep -qx "$1"; then
        step "rustup target add $1"
        rustup target add "$1" || die "'rustup target add $1' failed"
    fi
}

ensure_musl_gcc() {
    command -v musl-gcc >/dev/null 2>&1 && return 0
    step "installing musl-tools (musl-gcc, for ring on x86_64 musl)"
    apt_install musl-tools || die "could not install musl-tools; apt-get install musl-tools and rerun"
}

ensure_zig() {
    if python3 -m ziglang version >/dev/null 2>&1 || command -v zig >/dev/null 2>&1; then
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-pip || true
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3-pip || die "no pip to install ziglang with; apt-get install python3-pip and rerun"
    fi
    step "installing zig (PyPI ziglang, user site)"
    python3 -m pip install --user ziglang ||
        python3 -m pip install --user --break-system-packages ziglang ||
        python3 -m pip install ziglang ||
        die "could not install ziglang from PyPI"
    python3 -m ziglang version >/dev/null 2>&1 || die "ziglang installed, but 'python3 -m ziglang version' fails"
}

ensure_zigbuild() {
    add_to_path "$HOME/.cargo/bin"
    command -v cargo-zigbuild >/dev/null 2>&1 && return 0
    step "cargo install cargo-zigbuild (once, a few minutes)"
    cargo install --locked cargo-zigbuild || die "cargo install cargo-zigbuild failed"
}

mkdir -p dist
sizes=()
for arch in "${targets[@]}"; do
    triple="$arch-unknown-linux-musl"
    ensure_target "$triple"
    case "$arch" in
    x86_64)
        ensure_musl_gcc
        step "cargo build --release --no-default-features --target $triple"
        CC_x86_64_unknown_linux_musl=musl-gcc cargo build --release --locked --no-default-features --target "$triple"
        ;;
    aarch64)
        ensure_zig
        ensure_zigbuild
        step "cargo zigbuild --release --no-default-features --target $triple"
        cargo zigbuild --release --locked --no-default-features --target "$triple"
        ;;
    esac
    bin="target/$triple/release/citadel"
    [ -x "$bin" ] || die "$bin was not built"
    name="citadel-$version-$arch-linux-musl"
    tarball="dist/$name.tar.gz"
    stage=$(mktemp -d "${TMPDIR:-/tmp}/citadel-release.XXXXXX")
    mkdir "$stage/$name"
    cp "$bin" "$stage/$name/citadel"
    cp LICENSE "$stage/$name/LICENSE"
    # Rebuilt only when the binary changed: the same bytes keep the same checksum.
    if [ -f "$tarball" ] && tar -xzOf "$tarball" "$name/citadel" 2>/dev/null | cmp -s - "$bin"; then
        echo "$tarball: binary unchanged, kept"
    else
        tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
            -C "$stage" -cf - "$name" | gzip -n -9 >"$tarball.tmp"
        mv "$tarball.tmp" "$tarball"
        echo "wrote $tarball"
    fi
    rm -rf "$stage"
    bytes=$(stat -c %s "$bin")
    sizes+=("$(printf '%-8s %s bytes (%s MiB)' "$arch" "$bytes" "$(awk -v b="$bytes" 'BEGIN{printf "%.2f", b/1048576}')")")
    if [ "$bytes" -gt $((5 << 20)) ]; then
        note "$bin is larger than the 5 MiB target"
    fi
done

# SHA256SUMS over every tarball of this version in dist/.
(
    cd dist
    sha256sum citadel-"$version"-*-linux-musl.tar.gz >SHA256SUMS.tmp
    mv SHA256SUMS.tmp SHA256SUMS
)
step "release binaries (static, musl)"
printf '%s\n' "${sizes[@]}"
echo
cat dist/SHA256SUMS
