#!/usr/bin/env bash
# allotd alone on its hot path: the README's closed-loop and open-loop rows. Every case runs on
# a fresh allotd (durability fsync, a temp data dir, 127.0.0.1) loaded with allot-load --setup;
# then the open loop runs health, atp, route and reserve at fractions of their closed-loop
# rates, and atp and route at fractions of reserve's. One markdown table: ops/s, latency, the daemon's and the generator's CPU per
# operation, and how idle the machine was. See README.md in this directory.
set -euo pipefail

SCRIPT_NAME=hot-path
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BIN_DIR="${ALLOT_BIN_DIR:-}"
WARMUP_SECS=1
OPEN_FRACTIONS="0.5,0.25"
RESERVE_FRACTIONS="0.5"
DURATION=8
COMMIT_INTERVAL_US=""

usage() {
    cat <<EOF
Usage: $0 [options]
Closed loop: health (16 and 64 callers), atp, route, reserve (uniform, hot, 64 callers) and
reserve-batch (100 x 4, 50 x 4, 20 x 8, 100 x 16) and reserve-stream (4 streams x 64 in
flight); open loop: health, atp, route and reserve at each fraction of their closed-loop rate,
and atp and route at each fraction of reserve's closed-loop rate (target 2 of issue 7 read
as "50% of the durable Reserve's saturation rate"), at --concurrency callers. Default
$DURATION s per case.
  --bin-dir DIR           allotd and allot-load from DIR (default target/release; build them
                          with cargo build --release --workspace --bins)
  --warmup SECS           allot-load --warmup-secs (default $WARMUP_SECS); CPU is counted after it
  --open-fractions LIST   comma-separated fractions of the closed-loop rate (default $OPEN_FRACTIONS;
                          "none" skips the open loop)
  --reserve-fractions LIST  comma-separated fractions of reserve's closed-loop rate at which
                          atp and route also run open (default $RESERVE_FRACTIONS; "none" skips them)
  --commit-interval-us N  run every daemon with store.commit_interval_us = N (default: the
                          built-in default, 0)
EOF
    common_usage
}

script_flag() {
    case "$1" in
        --bin-dir) BIN_DIR="${2:?--bin-dir needs a value}" ;;
        --warmup) WARMUP_SECS="${2:?--warmup needs a value}" ;;
        --open-fractions) OPEN_FRACTIONS="${2:?--open-fractions needs a value}" ;;
        --reserve-fractions) RESERVE_FRACTIONS="${2:?--reserve-fractions needs a value}" ;;
        --commit-interval-us) COMMIT_INTERVAL_US="${2:?--commit-interval-us needs a value}" ;;
        *) return 1 ;;
    esac
}

parse_common_flags "$@"
[[ "$WARMUP_SECS" =~ ^[1-9][0-9]*$ ]] || die "--warmup must be a whole number of seconds, at least 1"
[[ -z "$COMMIT_INTERVAL_US" || "$COMMIT_INTERVAL_US" =~ ^[0-9]+$ ]] || die "--commit-interval-us must be a whole number"
# Checks a --*-fractions list up front (a bad one would otherwise stop the script minutes in)
# and leaves it in FRACTIONS; "none" leaves FRACTIONS empty.
fractions_of() {
    local list="$1" fraction
    [[ "$list" == none ]] && return 0
    IFS=',' read -r -a FRACTIONS <<<"$list"
    for fraction in "${FRACTIONS[@]}"; do
        [[ "$fraction" =~ ^0?\.[0-9]+$|^1$ ]] || die "not a fraction: $fraction"
    done
}
FRACTIONS=()
fractions_of "$OPEN_FRACTIONS"
open_fractions=("${FRACTIONS[@]}")
FRACTIONS=()
fractions_of "$RESERVE_FRACTIONS"
reserve_fractions=("${FRACTIONS[@]}")

BIN_DIR="${BIN_DIR:-$REPO_ROOT/target/release}"
ALLOTD="$BIN_DIR/allotd"
LOAD="$BIN_DIR/allot-load"
[[ -x "$ALLOTD" && -x "$LOAD" ]] || die "no allotd / allot-load in $BIN_DIR (cargo build --release --workspace --bins)"
"$LOAD" --help 2>&1 | grep -q -- --callers-per-stream || die "$LOAD is too old for this script"

ALLOTD_PID=""
LOAD_PID=""
stop_servers() {
    stop_pid "$LOAD_PID" 5 KILL
    stop_pid "$ALLOTD_PID" 30
    LOAD_PID=""
    ALLOTD_PID=""
}
install_exit_cleanup

TABLE="$OUT_DIR/hot-path.md"
# The open-loop rows' send lag: how late the generator sent its requests after their due
# time. The latency is taken from the due time, so this lag is part of each p99 above.
LAGS="$OUT_DIR/send-lag.md"
: >"$LAGS"
{
    echo "| case | load | ops/s | p50 ms | p99 ms | p99.9 ms | errors | daemon CPU µs/op | generator CPU µs/op | machine idle |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
} >"$TABLE"

# Idle and total jiffies of the whole machine (/proc/stat's cpu line: idle + iowait, sum).
machine_jiffies() {
    local -a f
    read -r -a f </proc/stat
    echo "$((f[4] + f[5])) $((f[1] + f[2] + f[3] + f[4] + f[5] + f[6] + f[7] + f[8]))"
}

# One case on a fresh daemon: NAME LOAD_LABEL allot-load-args... Prints and stores its row and
# leaves the case's ops/s in CASE_RATE.
CASE_RATE=0
run_case() {
    local name="$1" label="$2"
    shift 2
    local json requests errors seconds ops ops_s cpu client per_op idle
    local before after idle0 total0 idle1 total1
    SCRATCH="$(make_scratch hot-path)"
    pick_allotd_ports
    local -a config=()
    if [[ -n "$COMMIT_INTERVAL_US" ]]; then
        printf '[store]\ncommit_interval_us = %s\n' "$COMMIT_INTERVAL_US" >"$SCRATCH/allotd.toml"
        config=(--config "$SCRATCH/allotd.toml")
    fi
    start_allotd_process "$SCRATCH/allotd.log" 60 "${config[@]}" --data-dir "$SCRATCH/data"
    local -a common=(--addr "127.0.0.1:$PORT" --skus "$SKUS" --nodes "$NODES")
    timeout 600 "$LOAD" "${common[@]}" --setup --scenario health --duration-secs 0 --concurrency 1 \
        --connections 1 >"$OUT_DIR/setup-$name.log" 2>&1 ||
        { cat "$OUT_DIR/setup-$name.log" >&2; die "allot-load --setup failed"; }
    timeout $((WARMUP_SECS + DURATION + 120)) "$LOAD" "${common[@]}" --json --warmup-secs "$WARMUP_SECS" \
        --duration-secs "$DURATION" "$@" >"$OUT_DIR/$name.json" 2>"$OUT_DIR/$name.stderr" &
    LOAD_PID=$!
    # The daemon's CPU and the machine's idle time from the end of the warm-up (the generator
    # counts its own over the same window) to the generator's exit.
    sleep "$WARMUP_SECS"
    before="$(proc_ticks "$ALLOTD_PID")"
    read -r idle0 total0 <<<"$(machine_jiffies)"
    wait "$LOAD_PID" || { cat "$OUT_DIR/$name.stderr" >&2; die "allot-load $* failed"; }
    LOAD_PID=""
    after="$(proc_ticks "$ALLOTD_PID")"
    read -r idle1 total1 <<<"$(machine_jiffies)"
    stop_pid "$ALLOTD_PID" 30
    ALLOTD_PID=""
    cp "$SCRATCH/allotd.log" "$OUT_DIR/allotd-$name.log"
    rm -rf "$SCRATCH"
    SCRATCH=""

    json="$(tr -d '\n' <"$OUT_DIR/$name.json")"
    requests="$(json_num requests "$json")"
    errors="$(json_num errors "$json")"
    seconds="$(json_num seconds "$json")"
    [[ -n "$requests" && -n "$seconds" ]] || die "could not read allot-load's JSON: $json"
    # Ops are reservations for reserve-batch, requests otherwise.
    ops="$(json_num reservations "$json")"
    ops="${ops:-$requests}"
    ops="${ops%.*}"
    ops_s="$(awk -v n="$ops" -v s="$seconds" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')"
    cpu="$(cpu_us_per_op $((after - before)) "$ops")"
    client="$(json_num client_cpu_seconds "$json")"
    per_op="$(awk -v c="${client:-0}" -v n="$ops" 'BEGIN { if (n > 0 && c > 0) printf "%.1f", c * 1e6 / n; else print "–" }')"
    idle="$(awk -v i=$((idle1 - idle0)) -v t=$((total1 - total0)) 'BEGIN { printf "%.0f%%", (t > 0 ? 100 * i / t : 0) }')"
    local unit=""
    [[ "$name" == batch* ]] && unit=" per call"
    printf '| %s | %s | %s | %s%s | %s%s | %s%s | %s | %s | %s | %s |\n' "$name" "$label" "$ops_s" \
        "$(json_num p50_ms "$json")" "$unit" "$(json_num p99_ms "$json")" "$unit" \
        "$(json_num p999_ms "$json")" "$unit" "${errors:-?}" "$cpu" "$per_op" "$idle" >>"$TABLE"
    log "$(tail -n 1 "$TABLE")"
    local lag
    lag="$({ grep -o '"send_lag_ms": *{[^}]*}' <<<"$json" || true; } | head -n 1)"
    if [[ -n "$lag" ]]; then
        printf -- '- %s: p50 %s ms, p99 %s ms, p99.9 %s ms\n' "$name" "$(json_num p50 "$lag")" \
            "$(json_num p99 "$lag")" "$(json_num p999 "$lag")" >>"$LAGS"
    fi
    CASE_RATE="$ops_s"
}

C="$CONCURRENCY"
declare -A closed_rate
run_case health "closed, $C callers" --scenario health --concurrency "$C"
closed_rate[health]="$CASE_RATE"
run_case health-64 "closed, 64 callers" --scenario health --concurrency 64
run_case atp "closed, $C callers" --scenario atp --concurrency "$C"
closed_rate[atp]="$CASE_RATE"
run_case route "closed, $C callers (3 lines)" --scenario route --concurrency "$C"
closed_rate[route]="$CASE_RATE"
run_case reserve "closed, $C callers" --scenario reserve --concurrency "$C"
closed_rate[reserve]="$CASE_RATE"
hot_fraction="$(awk -v p="$HOT_PERCENT" 'BEGIN { printf "%g", p / 100 }')"
run_case reserve-hot "closed, $C callers, $HOT_PERCENT% on $HOT_SKUS SKUs" --scenario reserve \
    --concurrency "$C" --hot-skus "$HOT_SKUS" --hot-fraction "$hot_fraction"
run_case reserve-64 "closed, 64 callers" --scenario reserve --concurrency 64
run_case batch-100x4 "closed, ReserveBatch 100 × 4 callers" --scenario reserve-batch --batch 100 --concurrency 4
run_case batch-50x4 "closed, ReserveBatch 50 × 4 callers" --scenario reserve-batch --batch 50 --concurrency 4
run_case batch-20x8 "closed, ReserveBatch 20 × 8 callers" --scenario reserve-batch --batch 20 --concurrency 8
run_case batch-100x16 "closed, ReserveBatch 100 × 16 callers" --scenario reserve-batch --batch 100 --concurrency 16
run_case stream-64x4 "closed, ReserveStream 4 streams × 64 in flight" --scenario reserve-stream \
    --concurrency 256 --callers-per-stream 64

if ((${#open_fractions[@]} > 0)); then
    for fraction in "${open_fractions[@]}"; do
        for scenario in health atp route reserve; do
            rate="$(awk -v r="${closed_rate[$scenario]}" -v f="$fraction" 'BEGIN { printf "%d", r * f }')"
            ((rate >= 1)) || die "no closed-loop rate for $scenario"
            run_case "$scenario-open-$fraction" "open, $rate/s ($fraction × closed), $C lanes" \
                --scenario "$scenario" --concurrency "$C" --rate "$rate"
        done
    done
fi
if ((${#reserve_fractions[@]} > 0)); then
    for fraction in "${reserve_fractions[@]}"; do
        rate="$(awk -v r="${closed_rate[reserve]}" -v f="$fraction" 'BEGIN { printf "%d", r * f }')"
        ((rate >= 1)) || die "no closed-loop rate for reserve"
        for scenario in atp route; do
            run_case "$scenario-open-reserve-$fraction" "open, $rate/s ($fraction × reserve's closed), $C lanes" \
                --scenario "$scenario" --concurrency "$C" --rate "$rate"
        done
    done
fi

echo
echo "allotd hot path, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'); $SKUS SKUs x $NODES nodes, $DURATION s per case after a ${WARMUP_SECS} s warm-up${COMMIT_INTERVAL_US:+; store.commit_interval_us = $COMMIT_INTERVAL_US}"
echo
cat "$TABLE"
if [[ -s "$LAGS" ]]; then
    echo
    echo "The generator's send lag in open loop (part of the latency above):"
    echo
    cat "$LAGS"
fi
log "table and each run's JSON in $OUT_DIR"
