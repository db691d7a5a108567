#!/usr/bin/env bash
# Installs citadel on this machine: the static binary for its architecture
# (x86_64 or aarch64) to /usr/local/bin/citadel, and with --service the
# systemd unit (through `citadel service install`).
#
#   scripts/install.sh --service                 # from dist/ (or built), as a service
#   scripts/install.sh --binary ./citadel        # air-gapped: this file
#   scripts/install.sh --uninstall               # remove what it installed
#
#   --binary PATH   install this binary (checked: it must run here)
#   --dist DIR      take citadel-<version>-<arch>-linux-musl.tar.gz from DIR,
#                   verified against DIR/SHA256SUMS [dist/ of this checkout]
#   --build         build it first (scripts/build-release.sh --target <arch>)
#   --prefix DIR    install to DIR/bin/citadel [/usr/local]
#   --service       also install, enable and start citadel.service
#   --user NAME     with --service: run as this existing user [a new system user 'citadel']
#   --up            with --service: ExecStart runs `citadel up` (the node's services, then the agent)
#   --uninstall     remove what install.sh installed (and the service it installed), nothing else
#   --root DIR      write under DIR instead of / (for tests and images)
#
# Without --binary, --dist or --build: dist/ of this checkout when it holds
# a tarball for this architecture, else --build.
#
# What it installed is listed in PREFIX/share/citadel/install-manifest
# (files with their SHA-256, directories it created, the service); --uninstall
# removes exactly those (a file changed since is kept, with a warning), and
# keeps /etc/citadel (credentials) and /var/lib/citadel (state). Running it
# twice changes nothing the second time. It needs root for the default prefix
# and for --service: as another user it re-runs itself through sudo, and
# says what it needs when there is no sudo.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script="$here/$(basename "${BASH_SOURCE[0]}")"
repo=$(cd "$here/.." && pwd)

die() {
    printf 'install.sh: %s\n' "$*" >&2
    exit 1
}
say() { printf '%s\n' "$*"; }

binary="" dist="" build=0 prefix=/usr/local service=0 user="" up=0 uninstall=0 root=""
orig=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
    --binary | --dist | --prefix | --user | --root)
        [ $# -ge 2 ] || die "$1 needs a value"
        case "$1" in
        --binary) binary=$2 ;;
        --dist) dist=$2 ;;
        --prefix) prefix=$2 ;;
        --user) user=$2 ;;
        --root) root=$2 ;;
        esac
        shift 2
        ;;
    --build) build=1 && shift ;;
    --service) service=1 && shift ;;
    --up) up=1 && shift ;;
    --uninstall) uninstall=1 && shift ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case "$prefix" in /*) ;; *) die "--prefix must be an absolute path, not '$prefix'" ;; esac
if [ -n "$root" ]; then
    mkdir -p "$root" 2>/dev/null || true
    root=$(cd "$root" && pwd) || die "--root $root is not a directory"
    [ "$root" = / ] && root=""
fi
if [ -n "$binary" ]; then
    [ -f "$binary" ] || die "--binary $binary: no such file"
    binary=$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")
fi
if [ -n "$dist" ]; then
    [ -d "$dist" ] || die "--dist $dist: no such directory"
    dist=$(cd "$dist" && pwd)
fi
[ -z "$user" ] || [ "$service" -eq 1 ] || die "--user goes with --service"

bindir="$root$prefix/bin"
dest="$bindir/citadel"
manifest_dir="$root$prefix/share/citadel"
manifest="$manifest_dir/install-manifest"

# --- root, or sudo ------------------------------------------------------------
# The nearest existing directory of PATH.
existing() {
    local p=$1
    while [ ! -e "$p" ]; do p=$(dirname "$p"); done
    printf '%s\n' "$p"
}
need_root=0
[ "$service" -eq 1 ] && need_root=1
if [ "$uninstall" -eq 1 ] && [ -f "$manifest" ] && grep -qx 'service' "$manifest"; then
    need_root=1
fi
for d in "$bindir" "$manifest_dir"; do
    [ -w "$(existing "$d")" ] || need_root=1
done
if [ "$need_root" -eq 1 ] && [ "$(id -u)" -ne 0 ]; then
    sudo_cmd=${CITADEL_INSTALL_SUDO:-sudo}
    if [ -n "${CITADEL_INSTALL_VIA_SUDO:-}" ]; then
        die "ran through sudo but still not root (uid $(id -u))"
    fi
    if command -v "$sudo_cmd" >/dev/null 2>&1; then
        say "install.sh: root is needed (to write $bindir$([ "$service" -eq 1 ] && echo ' and the systemd unit')): running it through sudo"
        exec "$sudo_cmd" -- env CITADEL_INSTALL_VIA_SUDO=1 bash "$script" "${orig[@]}"
    fi
    die "root is needed to write $bindir$([ "$service" -eq 1 ] && echo ', create the service user and install the systemd unit'), and this is uid $(id -u) with no sudo: run it as root, install sudo, or choose a --prefix you can write (e.g. --prefix \$HOME/.local) without --service"
fi

# --- the manifest ---------------------------------------------------------------
# Lines: `dir PATH` (created by install.sh), `file PATH SHA256`, `service`.
manifest_lines=()
if [ -f "$manifest" ]; then
    mapfile -t manifest_lines <"$manifest"
fi
has_line() {
    local l
    for l in "${manifest_lines[@]+"${manifest_lines[@]}"}"; do
        [ "$l" = "$1" ] && return 0
    done
    return 1
}
add_line() { has_line "$1" || manifest_lines+=("$1"); }
drop_prefix() {
    local keep=() l
    for l in "${manifest_lines[@]+"${manifest_lines[@]}"}"; do
        case "$l" in "$1"*) ;; *) keep+=("$l") ;; esac
    done
    manifest_lines=("${keep[@]+"${keep[@]}"}")
}
# mkdirs DIR: creates DIR and missing parents, recording each one created.
mkdirs() {
    local d=$1 missing=()
    while [ ! -d "$d" ]; do
        missing=("$d" "${missing[@]+"${missing[@]}"}")
        d=$(dirname "$d")
    done
    for d in "${missing[@]+"${missing[@]}"}"; do
        mkdir -m 0755 "$d"
        add_line "dir ${d#"$root"}"
    done
}
# Sorted: a directory's line comes before its children's (uninstall removes
# them in reverse), and the same install writes the same bytes.
save_manifest() {
    local text
    mkdirs "$manifest_dir"
    text=$(printf '%s\n' "${manifest_lines[@]+"${manifest_lines[@]}"}" | LC_ALL=C sort -u)
    if [ -f "$manifest" ] && [ "$(cat "$manifest")" = "$text" ]; then
        return 0
    fi
    printf '%s\n' "$text" >"$manifest.tmp"
    mv "$manifest.tmp" "$manifest"
}

# --- uninstall --------------------------------------------------------------------
if [ "$uninstall" -eq 1 ]; then
    if [ ! -f "$manifest" ]; then
        say "nothing to remove: $manifest does not exist (install.sh installed nothing under $root$prefix)"
        exit 0
    fi
    if has_line service; then
        if [ -x "$dest" ]; then
            "$dest" service uninstall --root "${root:-/}"
        else
            say "warning: $dest is gone; remove citadel.service with systemctl by hand" >&2
        fi
    fi
    for l in "${manifest_lines[@]}"; do
        case "$l" in
        "file "*)
            read -r _ path sum <<<"$l"
            if [ ! -e "$root$path" ]; then
                :
            elif [ "$(sha256sum "$root$path" | cut -d' ' -f1)" = "$sum" ]; then
                rm -f "$root$path"
                say "removed $root$path"
            else
                say "kept $root$path: it changed since install.sh installed it" >&2
            fi
            ;;
        esac
    done
    rm -f "$manifest"
    # Directories it created, deepest first, when empty.
    for ((i = ${#manifest_lines[@]} - 1; i >= 0; i--)); do
        case "${manifest_lines[$i]}" in
        "dir "*) rmdir "$root${manifest_lines[$i]#dir }" 2>/dev/null || true ;;
        esac
    done
    say "uninstalled (kept /etc/citadel and /var/lib/citadel: credentials and state)"
    exit 0
fi

# --- the binary -------------------------------------------------------------------
case "$(uname -m)" in
x86_64 | amd64) arch=x86_64 ;;
aarch64 | arm64) arch=aarch64 ;;
*) die "no static build for $(uname -m) (x86_64 and aarch64 only)" ;;
esac
tmp=$(mktemp -d "${TMPDIR:-/tmp}/citadel-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# from_dist DIR: the newest tarball for this arch in DIR, checked against SHA256SUMS.
from_dist() {
    local d=$1 tarball name
    tarball=$(find "$d" -maxdepth 1 -name "citadel-*-$arch-linux-musl.tar.gz" -printf '%f\n' | sort -V | tail -n1)
    [ -n "$tarball" ] || die "no citadel-*-$arch-linux-musl.tar.gz in $d"
    [ -f "$d/SHA256SUMS" ] || die "$d/SHA256SUMS is missing: cannot verify $tarball"
    grep -E "^[0-9a-f]{64}  $tarball\$" "$d/SHA256SUMS" >"$tmp/sum" ||
        die "$d/SHA256SUMS has no line for $tarball"
    (cd "$d" && sha256sum --quiet -c "$tmp/sum") ||
        die "$d/$tarball does not match its SHA-256 in SHA256SUMS: not installed"
    name=${tarball%.tar.gz}
    tar -xzf "$d/$tarball" -C "$tmp" "$name/citadel" || die "$tarball holds no $name/citadel"
    mv "$tmp/$name/citadel" "$tmp/citadel"
    say "verified $d/$tarball against SHA256SUMS"
}

if [ -n "$binary" ]; then
    cp "$binary" "$tmp/citadel"
elif [ -n "$dist" ]; then
    from_dist "$dist"
else
    if [ "$build" -eq 0 ] && ! find "$repo/dist" -maxdepth 1 -name "citadel-*-$arch-linux-musl.tar.gz" 2>/dev/null | grep -q .; then
        build=1
    fi
    if [ "$build" -eq 1 ]; then
        [ -f "$repo/scripts/build-release.sh" ] || die "no binary given (--binary, --dist) and no checkout to build from"
        "$repo/scripts/build-release.sh" --target "$arch"
    fi
    from_dist "$repo/dist"
fi
chmod 0755 "$tmp/citadel"
version=$("$tmp/citadel" version 2>&1) || die "the binary does not run here ($(uname -m)): $version"
say "installing $version"

# --- install ----------------------------------------------------------------------
mkdirs "$bindir"
if [ -f "$dest" ] && cmp -s "$tmp/citadel" "$dest"; then
    say "$dest: already this binary, unchanged"
else
    cp "$tmp/citadel" "$dest.tmp.$$"
    chmod 0755 "$dest.tmp.$$"
    mv "$dest.tmp.$$" "$dest"
    say "installed $dest"
fi
drop_prefix "file $prefix/bin/citadel "
add_line "file $prefix/bin/citadel $(sha256sum "$dest" | cut -d' ' -f1)"
if [ "$service" -eq 1 ]; then
    args=(service install --root "${root:-/}" --binary "$prefix/bin/citadel")
    [ -n "$user" ] && args+=(--user "$user")
    [ "$up" -eq 1 ] && args+=(--up)
    "$dest" "${args[@]}"
    add_line service
fi
save_manifest
if [ "$service" -eq 0 ]; then
    case ":$PATH:" in
    *":$prefix/bin:"*) ;;
    *) say "note: $prefix/bin is not on PATH" ;;
    esac
fi
say "done: next, 'citadel init' authorizes this node (or put a redis_url in /etc/citadel/config.json)"
