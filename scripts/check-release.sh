#!/usr/bin/env bash
# Checks what scripts/build-release.sh made (run it first; scripts/test.sh
# runs both):
#
# - dist/SHA256SUMS matches the tarballs, and each tarball holds the binary
#   that was built;
# - x86_64: `file` says statically linked, `ldd` finds nothing to load; it
#   prints its version, and runs a real echo job end to end: `citadel work`
#   against a real redis-server on a free port, the job enqueued and
#   followed with `citadel submit --follow`;
# - aarch64: `file` says ARM aarch64, statically linked; under
#   qemu-aarch64-static (Debian's qemu-user-static) it prints its version and
#   runs `citadel run-job` with an echo job;
# - each binary is at most 5 MiB;
# - x86_64: its /metrics listener answers and counts the echo job.
#
# Installs, only when missing: file, qemu-user-static, redis-server.
# Exit 0 when every check passed; otherwise 1, naming the failed checks.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/deps.sh
. scripts/deps.sh

version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n1)
failed=()
pass() { printf 'ok:   %s\n' "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    failed+=("$1")
}

command -v file >/dev/null 2>&1 || apt_install file || die "could not install file"
command -v qemu-aarch64-static >/dev/null 2>&1 || apt_install qemu-user-static ||
    die "could not install qemu-user-static (qemu-aarch64-static runs the aarch64 binary)"
ensure_redis

step "checksums"
[ -f dist/SHA256SUMS ] || die "dist/SHA256SUMS is missing: run scripts/build-release.sh first"
if (cd dist && sha256sum --quiet -c SHA256SUMS); then
    pass "dist/SHA256SUMS matches"
else
    fail "checksums" "dist/SHA256SUMS does not match the tarballs"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/citadel-check-release.XXXXXX")
redis_pid=""
worker_pid=""
stop() {
    [ -n "$1" ] || return 0
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
cleanup() {
    stop "$worker_pid"
    stop "$redis_pid"
    rm -rf "$work"
}
trap cleanup EXIT

# unpack ARCH: the binary from its tarball (what a node gets), into $work/ARCH.
unpack() {
    local arch=$1 name="citadel-$version-$1-linux-musl"
    local tarball="dist/$name.tar.gz"
    [ -f "$tarball" ] || die "$tarball is missing: run scripts/build-release.sh first"
    mkdir -p "$work/$arch"
    tar -xzf "$tarball" -C "$work/$arch"
    local bin="$work/$arch/$name/citadel"
    [ -x "$bin" ] || die "$tarball holds no executable $name/citadel"
    if cmp -s "$bin" "target/$arch-unknown-linux-musl/release/citadel"; then
        pass "$arch: the tarball holds the binary built"
    else
        fail "$arch-tarball" "$arch: $tarball does not hold target/$arch-unknown-linux-musl/release/citadel"
    fi
    local bytes
    bytes=$(stat -c %s "$bin")
    if [ "$bytes" -le $((5 << 20)) ]; then
        pass "$arch: $bytes bytes (at most 5 MiB)"
    else
        fail "$arch-size" "$arch: $bytes bytes, over the 5 MiB target"
    fi
    BIN=$bin
}

# --- x86_64 -------------------------------------------------------------------
step "x86_64"
unpack x86_64
x86=$BIN
desc=$(file -b "$x86")
case "$desc" in
*x86-64*static*) pass "x86_64: file: $desc" ;;
*) fail "x86_64-static" "x86_64: file says: $desc" ;;
esac
ldd_out=$(ldd "$x86" 2>&1 || true)
case "$ldd_out" in
*"not a dynamic executable"* | *"statically linked"*) pass "x86_64: ldd: $(echo "$ldd_out" | head -n1 | tr -s '\t ' ' ')" ;;
*) fail "x86_64-ldd" "x86_64: ldd lists libraries: $ldd_out" ;;
esac
if [ "$("$x86" version)" = "citadel $version" ]; then
    pass "x86_64: citadel version"
else
    fail "x86_64-version" "x86_64: 'citadel version' printed '$("$x86" version 2>&1)'"
fi

# A real echo job against a real redis-server: a free port, retried on a bind race.
for _ in 1 2 3 4 5; do
    port=$(free_port)
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$work" --daemonize no >"$work/redis.log" 2>&1 &
    redis_pid=$!
    for _ in $(seq 100); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && break
        kill -0 "$redis_pid" 2>/dev/null || break
        sleep 0.1
    done
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    stop "$redis_pid"
    redis_pid=""
done
[ -n "$redis_pid" ] || die "could not start redis-server (see $work/redis.log)"
url="redis://127.0.0.1:$port"
env -u CITADEL_CONFIG CITADEL_CONFIG=/dev/null CITADEL_STATE_DIR="$work/state" \
    "$x86" work --redis-url "$url" --node-name release-check --block 1s \
    --heartbeat-interval 0 --metrics-addr 127.0.0.1:0 >"$work/worker.log" 2>&1 &
worker_pid=$!
if out=$(CITADEL_CONFIG=/dev/null CITADEL_STATE_DIR="$work/state" timeout 60 \
    "$x86" submit --redis-url "$url" --type echo --payload '{"chunks":3,"said":"static"}' --follow 2>&1) &&
    grep -q '"said":"static"' <<<"$out"; then
    pass "x86_64: an echo job through citadel work and a real redis-server"
else
    fail "x86_64-job" "x86_64: the echo job did not complete: $out; worker log: $(tail -n 20 "$work/worker.log")"
fi
# The metrics listener (an ephemeral port, so a busy 9464 does not matter):
# /metrics counts the job just run.
maddr=$(sed -n 's|.*metrics: http://\([0-9.]*\):\([0-9]*\)/metrics.*|\1 \2|p' "$work/worker.log" | head -n1)
metrics=""
if [ -n "$maddr" ] && exec 3<>"/dev/tcp/${maddr% *}/${maddr#* }"; then
    printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
    metrics=$(timeout 10 cat <&3 || true)
    exec 3<&-
fi
if grep -q '^citadel_jobs_completed_total{type="echo"} 1' <<<"$metrics"; then
    pass "x86_64: /metrics counts the job"
else
    fail "x86_64-metrics" "x86_64: /metrics did not count the echo job (listener '${maddr:-none}'): $(head -c 400 <<<"$metrics")"
fi
kill -TERM "$worker_pid" 2>/dev/null || true
for _ in $(seq 300); do
    kill -0 "$worker_pid" 2>/dev/null || break
    sleep 0.1
done
if kill -0 "$worker_pid" 2>/dev/null; then
    fail "x86_64-stop" "x86_64: citadel work did not exit within 30 s of SIGTERM"
else
    rc=0
    wait "$worker_pid" || rc=$?
    if [ "$rc" -eq 0 ]; then
        pass "x86_64: citadel work exits 0 on SIGTERM"
    else
        fail "x86_64-stop" "x86_64: citadel work exited $rc on SIGTERM"
    fi
fi
worker_pid=""

# --- aarch64 ------------------------------------------------------------------
step "aarch64 (under qemu-aarch64-static)"
unpack aarch64
arm=$BIN
desc=$(file -b "$arm")
case "$desc" in
*aarch64*static*) pass "aarch64: file: $desc" ;;
*) fail "aarch64-static" "aarch64: file says: $desc" ;;
esac
if [ "$(qemu-aarch64-static "$arm" version)" = "citadel $version" ]; then
    pass "aarch64: citadel version"
else
    fail "aarch64-version" "aarch64: 'citadel version' printed '$(qemu-aarch64-static "$arm" version 2>&1)'"
fi
if out=$(CITADEL_CONFIG=/dev/null CITADEL_STATE_DIR="$work/state-arm" timeout 60 \
    qemu-aarch64-static "$arm" run-job '{"type":"echo","payload":{"arch":"aarch64"}}' 2>&1) &&
    grep -q '"arch":"aarch64"' <<<"$out"; then
    pass "aarch64: citadel run-job echo"
else
    fail "aarch64-run-job" "aarch64: run-job failed: $out"
fi

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "release checks FAILED: ${failed[*]}"
    exit 1
fi
echo "release checks passed"
