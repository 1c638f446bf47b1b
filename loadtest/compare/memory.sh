#!/usr/bin/env bash
# allotd's memory and restart with a large state (the README's target 6): 10,000,000 positions
# and about 1,000,000 open reservations by default. Loads them through the API on a fresh
# allotd (temp data dir, 127.0.0.1), reads the RSS, kills the daemon with SIGKILL, restarts it
# and times it to serving, twice. See README.md in this directory.
set -euo pipefail

SCRIPT_NAME=memory
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BIN_DIR="${ALLOT_BIN_DIR:-}"
SKUS=2500000
RESERVE_CALLS=10000

usage() {
    cat <<EOF
Usage: $0 [options]
Loads --skus x --nodes positions (default $SKUS x $NODES) with allot-load --setup, then
--reserve-calls ReserveBatch calls of 100 (default $RESERVE_CALLS, after a 1 s warm-up that adds
some), reports the RSS serving that state, then kill -9 and restart, twice, with each
restart's time to serving (the daemon's startup_ms) and the RSS after it.
  --bin-dir DIR         allotd and allot-load from DIR (default target/release)
  --reserve-calls N     measured ReserveBatch calls of 100 reservations each
EOF
    common_usage
}

script_flag() {
    case "$1" in
        --bin-dir) BIN_DIR="${2:?--bin-dir needs a value}" ;;
        --reserve-calls) RESERVE_CALLS="${2:?--reserve-calls needs a value}" ;;
        *) return 1 ;;
    esac
}

parse_common_flags "$@"
[[ "$RESERVE_CALLS" =~ ^[0-9]+$ ]] || die "--reserve-calls must be a whole number"
BIN_DIR="${BIN_DIR:-$REPO_ROOT/target/release}"
ALLOTD="$BIN_DIR/allotd"
LOAD="$BIN_DIR/allot-load"
[[ -x "$ALLOTD" && -x "$LOAD" ]] || die "no allotd / allot-load in $BIN_DIR (cargo build --release --workspace --bins)"

ALLOTD_PID=""
stop_servers() {
    stop_pid "$ALLOTD_PID" 30
    ALLOTD_PID=""
}
install_exit_cleanup
MIN_FREE_MB=4096
SCRATCH="$(make_scratch memory)"
pick_allotd_ports
RESULTS="$OUT_DIR/memory.md"
echo "| step | figure |" >"$RESULTS"
echo "|---|---|" >>"$RESULTS"
row() {
    printf '| %s | %s |\n' "$1" "$2" >>"$RESULTS"
    log "$1: $2"
}

START_COUNT=0
# Starts allotd on the scratch data dir and waits until it serves; leaves its log's path in
# DAEMON_LOG.
start_daemon() {
    START_COUNT=$((START_COUNT + 1))
    DAEMON_LOG="$OUT_DIR/allotd-$START_COUNT.log"
    start_allotd_process "$DAEMON_LOG" 300 --data-dir "$SCRATCH/data"
}

rss() {
    awk '/^VmRSS/ { printf "%.2f GiB (%d kB)", $2 / 1048576, $2 }' "/proc/$ALLOTD_PID/status"
}

startup_ms() {
    sed -n 's/.*startup_ms=\([0-9]*\).*/\1/p' "$DAEMON_LOG" | tail -n 1
}

open_reservations() {
    local metrics
    metrics="$(allotd_metrics)" || { echo "?"; return; }
    awk '/^allot_open_reservations / { printf "%d", $2 }' <<<"$metrics"
}

# SIGKILL, then a restart timed to serving.
kill_and_restart() {
    local what="$1"
    kill -KILL "$ALLOTD_PID"
    wait "$ALLOTD_PID" 2>/dev/null || true
    ALLOTD_PID=""
    start_daemon
    row "$what: restart to serving (startup_ms)" "$(awk -v ms="$(startup_ms)" 'BEGIN { printf "%.1f s", ms / 1000 }')"
    # The RSS once the restart's temporary memory has gone back (a few seconds after serving).
    sleep 5
    row "$what: RSS serving after the restart" "$(rss)"
}

LOAD_ARGS=(--addr "127.0.0.1:$PORT" --skus "$SKUS" --nodes "$NODES")
start_daemon
started=$(date +%s)
timeout 3600 "$LOAD" "${LOAD_ARGS[@]}" --setup --scenario health --duration-secs 0 --concurrency 1 \
    --connections 1 >"$OUT_DIR/setup.log" 2>&1 || { cat "$OUT_DIR/setup.log" >&2; die "allot-load --setup failed"; }
row "loading $((SKUS * NODES)) positions through SetStock (allot-load --setup)" "$(($(date +%s) - started)) s"
if ((RESERVE_CALLS > 0)); then
    started=$(date +%s)
    timeout 3600 "$LOAD" "${LOAD_ARGS[@]}" --scenario reserve-batch --batch 100 --concurrency 4 \
        --requests-max "$RESERVE_CALLS" --ttl-ms 0 --warmup-secs 1 --duration-secs 600 \
        >"$OUT_DIR/reserve.log" 2>&1 || { cat "$OUT_DIR/reserve.log" >&2; die "allot-load reserve-batch failed"; }
    row "ReserveBatch 100 × 4 callers, $RESERVE_CALLS calls after a 1 s warm-up (--ttl-ms 0)" "$(($(date +%s) - started)) s"
fi
sleep 2  # the gauge is refreshed by a background task
row "open reservations held (allot_open_reservations)" "$(open_reservations)"
row "RSS serving that state" "$(rss)"
kill_and_restart "kill -9 just after the load"
kill_and_restart "kill -9 of the idle daemon"

echo
echo "allotd memory and restart, $(date -u '+%Y-%m-%d %H:%M UTC'), $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo
cat "$RESULTS"
log "results and logs in $OUT_DIR"
