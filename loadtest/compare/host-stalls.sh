#!/usr/bin/env bash
# Is the tail of a durable reserve allotd's or the host's? Runs `reserve` in open loop at one
# rate on a fresh allotd per durability mode (fsync, then buffered), with vm-stalls.py (a
# process that only sleeps) alongside, and prints one table: the latency, the generator's own
# send lag, the daemon's group commits over 5 ms, and how often the sleeping process woke
# over 5 ms late, that is how often the whole VM stood still. See README.md in this directory.
set -euo pipefail

SCRIPT_NAME=host-stalls
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BIN_DIR="${ALLOT_BIN_DIR:-}"
RATE=3300
SCENARIO=reserve
MODES="fsync,buffered"
INTERVALS="0"

usage() {
    cat <<EOF
Usage: $0 [options]
allot-load --scenario (default $SCENARIO) in open loop at --rate (default $RATE/s,
about a quarter of a durable reserve's closed-loop rate on the reference machine) with
--concurrency lanes, for --duration s after a 1 s warm-up, on a fresh allotd per
store.durability mode, with vm-stalls.py running alongside.
  --bin-dir DIR      allotd and allot-load from DIR (default target/release)
  --rate N           arrivals per second
  --scenario NAME    an allot-load scenario (reserve, atp, route, health, ...)
  --modes LIST       store.durability modes, comma-separated (default $MODES)
  --intervals LIST   store.commit_interval_us values, comma-separated (default $INTERVALS); each
                     mode runs once per value
EOF
    common_usage
}

script_flag() {
    case "$1" in
        --bin-dir) BIN_DIR="${2:?--bin-dir needs a value}" ;;
        --rate) RATE="${2:?--rate needs a value}" ;;
        --scenario) SCENARIO="${2:?--scenario needs a value}" ;;
        --modes) MODES="${2:?--modes needs a value}" ;;
        --intervals) INTERVALS="${2:?--intervals needs a value}" ;;
        *) return 1 ;;
    esac
}

parse_common_flags "$@"
if ! [[ "$RATE" =~ ^[0-9]+$ ]] || ((RATE < 1)); then
    die "--rate must be a whole number of at least 1"
fi
BIN_DIR="${BIN_DIR:-$REPO_ROOT/target/release}"
ALLOTD="$BIN_DIR/allotd"
LOAD="$BIN_DIR/allot-load"
PROBE="$(dirname "${BASH_SOURCE[0]}")/vm-stalls.py"
[[ -x "$ALLOTD" && -x "$LOAD" ]] || die "no allotd / allot-load in $BIN_DIR (cargo build --release --workspace --bins)"
ensure_command python3 python3-minimal
IFS=',' read -r -a mode_list <<<"$MODES"
IFS=',' read -r -a interval_list <<<"$INTERVALS"
for interval in "${interval_list[@]}"; do
    [[ "$interval" =~ ^[0-9]+$ ]] || die "not a whole number of µs: $interval"
done

ALLOTD_PID=""
PROBE_PID=""
stop_servers() {
    stop_pid "$PROBE_PID" 5
    stop_pid "$ALLOTD_PID" 30
    PROBE_PID=""
    ALLOTD_PID=""
}
install_exit_cleanup

TABLE="$OUT_DIR/host-stalls.md"
{
    echo "| durability | commit interval µs | load | p50 ms | p99 ms | p99.9 ms | send lag p99 ms | commits over 5 ms | VM stood still over 5 / 10 ms | phases (ms mod 100) |"
    echo "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"
} >"$TABLE"

# The group commits whose journal write took over 5 ms, from allot_commit_fsync_seconds.
commits_over_5ms() {
    local metrics
    metrics="$(allotd_metrics)" || { echo "?"; return; }
    awk '/^allot_commit_fsync_seconds_bucket\{le="0.005"\}/ { within = $2 }
         /^allot_commit_fsync_seconds_count / { total = $2 }
         END { if (within == "") print "?"; else printf "%d of %d", total - within, total }' <<<"$metrics"
}

for durability in "${mode_list[@]}"; do
    case "$durability" in fsync | buffered) ;; *) die "unknown durability mode: $durability" ;; esac
    for interval in "${interval_list[@]}"; do
        run="$durability-$interval"
        SCRATCH="$(make_scratch "stalls-$durability")"
        pick_allotd_ports
        printf '[store]\ndurability = "%s"\ncommit_interval_us = %s\n' "$durability" "$interval" \
            >"$SCRATCH/allotd.toml"
        start_allotd_process "$OUT_DIR/allotd-$run.log" 60 --config "$SCRATCH/allotd.toml" \
            --data-dir "$SCRATCH/data"
        LOAD_ARGS=(--addr "127.0.0.1:$PORT" --skus "$SKUS" --nodes "$NODES")
        "$LOAD" "${LOAD_ARGS[@]}" --setup --scenario health --duration-secs 0 --concurrency 1 \
            --connections 1 >"$OUT_DIR/setup-$run.log" 2>&1 ||
            { cat "$OUT_DIR/setup-$run.log" >&2; die "allot-load --setup failed"; }
        log "$SCENARIO at $RATE/s, durability = $durability, commit_interval_us = $interval"
        python3 "$PROBE" --seconds "$((DURATION + 1))" --json >"$OUT_DIR/vm-stalls-$run.json" &
        PROBE_PID=$!
        "$LOAD" "${LOAD_ARGS[@]}" --scenario "$SCENARIO" --concurrency "$CONCURRENCY" --rate "$RATE" \
            --warmup-secs 1 --duration-secs "$DURATION" --json >"$OUT_DIR/$run.json" \
            2>"$OUT_DIR/$run.stderr" || { cat "$OUT_DIR/$run.stderr" >&2; die "allot-load failed"; }
        wait "$PROBE_PID" || die "vm-stalls.py failed"
        PROBE_PID=""
        commits="$(commits_over_5ms)"
        stop_pid "$ALLOTD_PID" 30
        ALLOTD_PID=""
        rm -rf "$SCRATCH"
        SCRATCH=""

        json="$(tr -d '\n' <"$OUT_DIR/$run.json")"
        lag="$({ grep -o '"send_lag_ms": *{[^}]*}' <<<"$json" || true; } | head -n 1)"
        stalls="$(cat "$OUT_DIR/vm-stalls-$run.json")"
        phases="$(grep -o '"phases_ms": *\[.*\]' <<<"$stalls" | sed 's/.*: *//; s/\[\([0-9]*\), *\([0-9]*\)\]/\1: \2/g; s/^\[//; s/\]$//')"
        printf '| %s | %s | %s/s, %s lanes | %s | %s | %s | %s | %s | %s / %s | %s |\n' "$durability" "$interval" "$RATE" \
            "$CONCURRENCY" "$(json_num p50_ms "$json")" "$(json_num p99_ms "$json")" \
            "$(json_num p999_ms "$json")" "$(json_num p99 "$lag")" "$commits" \
            "$(json_num late_over_5ms "$stalls")" "$(json_num late_over_10ms "$stalls")" "${phases:--}" >>"$TABLE"
        log "$(tail -n 1 "$TABLE")"
    done
done

echo
echo "allotd under the host, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'); $SCENARIO in open loop, $SKUS SKUs x $NODES nodes, $DURATION s after a 1 s warm-up"
echo
cat "$TABLE"
log "table, JSON and logs in $OUT_DIR"
