#!/usr/bin/env bash
# Runs both consumer examples (examples/consumer.rs and examples/python/consumer.py) against a real
# gateway and checks, line for line, what they print. CI runs it after the tests.
#
# 1. Filter and live stream: both consumers subscribe with `--type message_created --chat 21`;
#    the two shared fixtures (a chat_closed, a message_created in chat 21) and a third event
#    (message_created in chat 21) are posted; each consumer must print exactly sequences 2 and 3.
# 2. Reconnect and resume: the gateway (embedded store, so events survive) is stopped with
#    SIGTERM and started again on the same address; a redelivered fixture (a duplicate) and a
#    fourth event are posted; each consumer must reconnect by itself and print exactly sequence 4:
#    nothing repeated, nothing skipped.
# 3. Start cursor: each consumer started with `--after 1` and no filter must begin at sequence 2.
#
# Everything it makes lives under target/: the Python venv (target/examples-venv) and this run's
# logs and store (target/examples-run). Exits non-zero on any mismatch, printing what was expected
# and what came.
set -euo pipefail

cd "$(dirname "$0")/.."
fixtures=../shared/fixtures
work=target/examples-run
venv=target/examples-venv
timeout_secs=60

step() { printf '\n==> %s\n' "$*"; }
fail() {
    echo "examples/run.sh: FAILED: $*" >&2
    exit 1
}

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

rm -rf "$work"
mkdir -p "$work"

step "cargo build --bin iqchannels-gateway --example consumer"
cargo build --bin iqchannels-gateway --example consumer
target_dir="${CARGO_TARGET_DIR:-target}"
gateway_bin="$target_dir/debug/iqchannels-gateway"
rust_consumer="$target_dir/debug/examples/consumer"

step "Python venv in $venv (grpcio, grpcio-tools) and stubs"
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    # Debian ships venv support separately from python3.
    SUDO=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        python3 python3-venv >/dev/null
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r examples/python/requirements.txt
PYTHON="$venv/bin/python" examples/python/generate.sh
python_consumer=("$venv/bin/python" examples/python/consumer.py)

# start_gateway LISTEN LOG: starts the gateway on LISTEN with the store in $work/data, sets
# gateway_pid and address (read from its JSON "listening" log line).
start_gateway() {
    "$gateway_bin" serve --store embedded --data-dir "$work/data" --listen "$1" \
        --log-format json --shutdown-grace-secs 2 >"$2" 2>&1 &
    gateway_pid=$!
    pids+=("$gateway_pid")
    address=""
    for _ in $(seq 1 $((timeout_secs * 10))); do
        address="$(sed -n 's/.*"listening[^"]*".*"address":"\([^"]*\)".*/\1/p' "$2" | head -n 1)"
        [ -n "$address" ] && return 0
        kill -0 "$gateway_pid" 2>/dev/null || break
        sleep 0.1
    done
    cat "$2" >&2
    fail "the gateway did not log its listening address"
}

# post FILE: posts one event, fails unless the gateway answers 200.
post() {
    local answer
    answer="$(curl -sS --fail-with-body -H 'Content-Type: application/json' \
        --data-binary "@$1" "http://$address/v1/events")" || fail "POST $1: $answer"
    echo "POST $(basename "$1"): $answer"
}

# wait_lines FILE N: waits until FILE has at least N lines.
wait_lines() {
    for _ in $(seq 1 $((timeout_secs * 10))); do
        [ "$(wc -l <"$1")" -ge "$2" ] && return 0
        sleep 0.1
    done
    return 1
}

# wait_exit NAME PID: waits for a consumer to exit by itself (status 0) within the timeout.
wait_exit() {
    local status=0
    for _ in $(seq 1 $((timeout_secs * 10))); do
        kill -0 "$2" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$2" 2>/dev/null; then
        show "$1"
        fail "$1 did not exit within ${timeout_secs}s"
    fi
    wait "$2" || status=$?
    if [ "$status" != 0 ]; then
        show "$1"
        fail "$1 exited with status $status"
    fi
}

show() {
    echo "--- $1 stdout:" >&2
    cat "$work/$1.out" >&2
    echo "--- $1 stderr:" >&2
    cat "$work/$1.err" >&2
}

# check NAME EXPECTED: the consumer's stdout must be exactly EXPECTED.
check() {
    if ! diff -u <(printf '%s' "$2") "$work/$1.out" >"$work/$1.diff"; then
        echo "--- $1: expected:" >&2
        printf '%s' "$2" >&2
        show "$1"
        echo "--- diff (expected vs. printed):" >&2
        cat "$work/$1.diff" >&2
        fail "$1 printed something else"
    fi
    echo "$1: as expected"
}

# start_consumers SUFFIX ARGS...: starts both consumers with ARGS against the gateway; they print
# to $work/rustSUFFIX.out and $work/pythonSUFFIX.out (stderr beside, in .err).
declare -A consumer_pid
start_consumers() {
    local suffix="$1"
    shift
    "$rust_consumer" --server "http://$address" "$@" \
        >"$work/rust$suffix.out" 2>"$work/rust$suffix.err" &
    consumer_pid["rust$suffix"]=$!
    pids+=($!)
    "${python_consumer[@]}" --server "http://$address" "$@" \
        >"$work/python$suffix.out" 2>"$work/python$suffix.err" &
    consumer_pid["python$suffix"]=$!
    pids+=($!)
}

# Events beyond the fixtures: message_created in chat 21, by a client (third) and by the system
# (fourth).
cat >"$work/third.json" <<'EOF'
{"ChatEvent": {"Id": 9001, "Type": "message_created", "ChatId": 21, "Actor": "client",
               "ClientId": 13, "CreatedAt": 1632751090000}}
EOF
cat >"$work/fourth.json" <<'EOF'
{"ChatEvent": {"Id": 9002, "Type": "message_created", "ChatId": 21, "Actor": "system",
               "CreatedAt": 1632751091000}}
EOF
line2='2 message_created chat=21 actor=user'
line3='3 message_created chat=21 actor=client'
line4='4 message_created chat=21 actor=system'

step "1. filter and live stream"
start_gateway 127.0.0.1:0 "$work/gateway-1.log"
echo "gateway listening on $address"
start_consumers "" --type message_created --chat 21 --exit-after 3
post "$fixtures/chat_closed.json"
post "$fixtures/message_created_file.json"
post "$work/third.json"
for name in rust python; do
    if ! wait_lines "$work/$name.out" 2; then
        show "$name"
        fail "$name did not print 2 lines within ${timeout_secs}s"
    fi
    check "$name" "$line2"$'\n'"$line3"$'\n'
done

step "2. reconnect and resume across a gateway restart"
kill -TERM "$gateway_pid"
wait "$gateway_pid" || true
echo "gateway stopped"
start_gateway "$address" "$work/gateway-2.log"
echo "gateway listening again on $address"
post "$fixtures/message_created_file.json"
post "$work/fourth.json"
for name in rust python; do
    wait_exit "$name" "${consumer_pid[$name]}"
    check "$name" "$line2"$'\n'"$line3"$'\n'"$line4"$'\n'
    if ! grep -q "resuming after sequence 3" "$work/$name.err"; then
        show "$name"
        fail "$name did not report resuming after sequence 3"
    fi
done
echo "both consumers reconnected and resumed after sequence 3"

step "3. start cursor: --after 1 begins at sequence 2"
start_consumers -after --after 1 --exit-after 1
for name in rust-after python-after; do
    wait_exit "$name" "${consumer_pid[$name]}"
    check "$name" "$line2"$'\n'
done

step "4. an event nested past protobuf's recursion limit: stored cut, read past by both"
options="$(printf '[%.0s' $(seq 50))1$(printf ']%.0s' $(seq 50))"
printf '{"ChatEvent":{"Id":9003,"Type":"chat_changed","ChatId":21,"CreatedAt":1},"Rels":{"Projects":[{"Id":5,"Options":%s}]}}' \
    "$options" >"$work/poison.json"
post "$work/poison.json"
grep -q '"outcome":"cut"' <(curl -sS -H 'Content-Type: application/json' \
    --data-binary "@$work/poison.json" "http://$address/v1/events") ||
    fail "the redelivered poison body does not report its cut"
cat >"$work/sixth.json" <<'EOF'
{"ChatEvent": {"Id": 9004, "Type": "message_created", "ChatId": 21, "Actor": "client",
               "CreatedAt": 1632751092000}}
EOF
post "$work/sixth.json"
# From the beginning, so the stream has to carry the cut event between the others.
start_consumers -poison --exit-after 6
for name in rust-poison python-poison; do
    wait_exit "$name" "${consumer_pid[$name]}"
    check "$name" '1 chat_closed chat=13 actor=user'$'\n'"$line2"$'\n'"$line3"$'\n'"$line4"$'\n''5 chat_changed chat=21 actor=-'$'\n''6 message_created chat=21 actor=client'$'\n'
done

step "examples: all checks passed"
