#!/usr/bin/env bash
# allotd driven by allot-load on the same data shape as redis.sh and postgres.sh. Builds the
# release binaries (unless --no-build), starts allotd on 127.0.0.1 with a temp data dir, and
# always stops it and removes the temp dir on exit. See README.md in this directory.
set -euo pipefail

SCRIPT_NAME=allot
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BUILD=1
BIN_DIR="${ALLOT_BIN_DIR:-}"
MODES="fsync,buffered"

usage() {
    cat <<EOF
Usage: $0 [options]
allotd driven by allot-load --json, a fresh daemon per durability mode: reserve (uniform), the
hot case (if allot-load has --hot-skus), reserve-batch --batch $BATCH (if allot-load has it),
and once health (the transport's ceiling, no storage).
  --modes LIST         store.durability modes, comma-separated (default $MODES): fsync is
                       the contract (comparable to appendfsync always and synchronous_commit
                       on); buffered survives a crash, not power loss (like appendfsync everysec)
  --no-build           use the binaries already in target/release (or \$ALLOT_BIN_DIR)
  --bin-dir DIR        take allotd and allot-load from DIR (implies --no-build)
  --batch N            items per ReserveBatch call in the batched case (default $BATCH)
  --batch-callers N    callers in the batched case (default $BATCH_CALLERS)
EOF
    common_usage
}

script_flag() {
    case "$1" in
        --no-build) BUILD=0; return 2 ;;
        --bin-dir) BIN_DIR="${2:?--bin-dir needs a value}"; BUILD=0 ;;
        --batch) BATCH="${2:?--batch needs a value}" ;;
        --batch-callers) BATCH_CALLERS="${2:?--batch-callers needs a value}" ;;
        --modes) MODES="${2:?--modes needs a value}" ;;
        *) return 1 ;;
    esac
}

parse_common_flags "$@"
[[ "$BATCH" =~ ^[1-9][0-9]*$ ]] || die "--batch must be a positive whole number"
[[ "$BATCH_CALLERS" =~ ^[1-9][0-9]*$ ]] || die "--batch-callers must be a positive whole number"
[[ -n "$BIN_DIR" ]] && BUILD=0
BIN_DIR="${BIN_DIR:-$REPO_ROOT/target/release}"

if ((BUILD)); then
    command -v cargo >/dev/null || die "cargo is missing (or pass --no-build / --bin-dir)"
    log "cargo build --release (allotd, allot-load); another build holding the lock makes this wait"
    (
        cd "$REPO_ROOT"
        cargo build --release --bin allotd
        cargo build --release -p allot-load --bin allot-load
    ) >"$OUT_DIR/allot-build.log" 2>&1 || die "the build failed; see $OUT_DIR/allot-build.log"
fi
ALLOTD="$BIN_DIR/allotd"
LOAD="$BIN_DIR/allot-load"
[[ -x "$ALLOTD" && -x "$LOAD" ]] || die "no allotd / allot-load in $BIN_DIR (build them or pass --bin-dir)"

LOAD_HELP="$("$LOAD" --help 2>&1)"
has_flag() { grep -q -- "$1" <<<"$LOAD_HELP"; }

ALLOTD_PID=""
stop_servers() {
    stop_pid "$ALLOTD_PID" 30
    ALLOTD_PID=""
}
install_exit_cleanup

CONNECTIONS=4
((CONCURRENCY >= CONNECTIONS)) || CONNECTIONS=$CONCURRENCY

# A fresh allotd with store.durability = MODE on a new data dir, loaded with the data shape.
start_allotd() {
    local durability="$1"
    SCRATCH="$(make_scratch allot)"
    pick_allotd_ports
    ADDR="127.0.0.1:$PORT"
    printf '[store]\ndurability = "%s"\n' "$durability" >"$SCRATCH/allotd.toml"
    start_allotd_process "$SCRATCH/allotd.log" 60 --config "$SCRATCH/allotd.toml" --data-dir "$SCRATCH/data"
    log "allotd on $ADDR, durability = $durability ($(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'))"
    # The data shape through the API, as the README's performance section loads it.
    load --setup --scenario health --duration-secs 0 --concurrency 1 --connections 1 \
        >"$OUT_DIR/allot-setup.log" 2>&1 || { cat "$OUT_DIR/allot-setup.log" >&2; die "allot-load --setup failed"; }
    log "$(grep setup: "$OUT_DIR/allot-setup.log" || echo "setup done")"
}

stop_allotd() {
    stop_pid "$ALLOTD_PID" 30
    ALLOTD_PID=""
    cp "$SCRATCH/allotd.log" "$OUT_DIR/allotd-$1.log" 2>/dev/null || true
    rm -rf "$SCRATCH"
    SCRATCH=""
}

load() { timeout $((DURATION + 120)) "$LOAD" --addr "$ADDR" --skus "$SKUS" --nodes "$NODES" "$@"; }

# One allot-load run. ITEMS_PER_CALL > 1 for the batched case: ops are reservations, not calls.
# CALLERS: allot-load --concurrency (default $CONCURRENCY).
run_case() {
    local case_name="$1" mode_label="$2" class="$3" seed="$4" items_per_call="$5"
    shift 5
    local callers="${CALLERS:-$CONCURRENCY}"
    local json before after requests errors seconds ops ops_s p99 cpu items rate field
    before="$(proc_ticks "$ALLOTD_PID")"
    # A seed per case: allot-load's idempotency keys are load-SEED-CALLER-SEQUENCE, and a key
    # already used would be answered as a replay.
    json="$(load --concurrency "$callers" --connections "$CONNECTIONS" --duration-secs "$DURATION" \
        --ttl-ms "$TTL_MS" --seed "$seed" "${WARMUP[@]}" --json "$@" 2>"$OUT_DIR/allot-$case_name-$class.stderr")" || {
        cat "$OUT_DIR/allot-$case_name-$class.stderr" >&2
        die "allot-load $* failed"
    }
    after="$(proc_ticks "$ALLOTD_PID")"
    echo "$json" >"$OUT_DIR/allot-$case_name-$class.json"
    json="$(tr -d '\n' <<<"$json")"
    requests="$(json_num requests "$json")"
    errors="$(json_num errors "$json")"
    seconds="$(json_num seconds "$json")"
    p99="$(json_num p99_ms "$json")"
    [[ -n "$requests" && -n "$seconds" && -n "$p99" ]] || die "could not read allot-load's JSON: $json"
    ((${errors:-0} == 0)) || log "warning: $errors errors in $case_name: $json"
    # Ops are reservations: a reservation count if allot-load reports one, else a reservation
    # rate, else successful calls x items per call.
    items=""
    for field in reservations items reserved; do
        [[ -n "$items" ]] || items="$(json_num "$field" "$json")"
    done
    rate="$(json_num reservations_per_second "$json")"
    [[ -n "$rate" ]] || rate="$(json_num items_per_second "$json")"
    if [[ -n "$items" ]]; then
        ops="${items%.*}"
    elif [[ -n "$rate" && "$items_per_call" -gt 1 ]]; then
        ops="$(awk -v r="$rate" -v s="$seconds" 'BEGIN { printf "%.0f", r * s }')"
    else
        ops=$(((requests - ${errors:-0}) * items_per_call))
    fi
    ops_s="$(awk -v n="$ops" -v s="$seconds" 'BEGIN { printf "%.1f", n / s }')"
    cpu="$(cpu_us_per_op $((after - before)) "$ops")"
    add_row allotd "$mode_label" "$case_name" "$ops_s" "$p99" "$cpu" "$ops" \
        "allot-load -c $callers --connections $CONNECTIONS $*" "$class"
}

# No warm-up: the CPU sampled around a run must cover exactly the calls it counts (pgbench and
# redis-benchmark count every call too).
WARMUP=()
has_flag --warmup-secs && WARMUP=(--warmup-secs 0)
HAS_HOT=0
has_flag --hot-skus && HAS_HOT=1
HAS_BATCH=0
has_flag reserve-batch && has_flag --batch && HAS_BATCH=1
((HAS_HOT)) || log "skipping the hot case: this allot-load has no --hot-skus"
((HAS_BATCH)) || log "skipping the batched case: this allot-load has no --scenario reserve-batch / --batch"
hot_fraction="$(awk -v p="$HOT_PERCENT" 'BEGIN { printf "%g", p / 100 }')"

IFS=',' read -r -a mode_list <<<"$MODES"
seed=100
health_done=0
for durability in "${mode_list[@]}"; do
    case "$durability" in
        fsync) class=durable; label="durability fsync (group commit)" ;;
        buffered) class=buffered; label="durability buffered (no fsync wait)" ;;
        *) die "unknown durability mode $durability (fsync, buffered)" ;;
    esac
    start_allotd "$durability"
    run_case reserve "$label" "$class" $((seed += 1)) 1 --scenario reserve
    if ((HAS_HOT)); then
        run_case reserve-hot "$label" "$class" $((seed += 1)) 1 --scenario reserve \
            --hot-skus "$HOT_SKUS" --hot-fraction "$hot_fraction"
    fi
    if ((HAS_BATCH)); then
        CALLERS="$BATCH_CALLERS" run_case reserve-batched "$label, ReserveBatch of $BATCH x $BATCH_CALLERS callers" \
            "$class" $((seed += 1)) "$BATCH" --scenario reserve-batch --batch "$BATCH"
    fi
    if ((!health_done)); then
        run_case health "transport only (no storage)" "$class" $((seed += 1)) 1 --scenario health
        health_done=1
    fi
    stop_allotd "$durability"
done
log "rows in $ROWS"
