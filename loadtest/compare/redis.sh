#!/usr/bin/env bash
# Redis 7 with a Lua check-and-reserve script (reserve.lua), driven by redis-benchmark.
# Starts its own redis-server on 127.0.0.1 in a temp dir, once per appendfsync mode, and
# always stops it and removes the temp dir on exit. See README.md in this directory.
set -euo pipefail

SCRIPT_NAME=redis
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MODES="always,everysec"

usage() {
    cat <<EOF
Usage: $0 [options]
Redis 7 (AOF, no RDB) with reserve.lua via EVALSHA, driven by redis-benchmark: a uniform case,
the hot case and a pipelined case (-P $PIPELINE), for each appendfsync mode.
  --modes LIST         appendfsync modes, comma-separated (default $MODES)
  --pipeline N         pipeline depth of the pipelined case (default $PIPELINE)
EOF
    common_usage
}

script_flag() {
    case "$1" in
        --modes) MODES="${2:?--modes needs a value}" ;;
        --pipeline) PIPELINE="${2:?--pipeline needs a value}" ;;
        *) return 1 ;;
    esac
}

parse_common_flags "$@"
[[ "$PIPELINE" =~ ^[1-9][0-9]*$ ]] || die "--pipeline must be a positive whole number"

ensure_command redis-server redis-server redis-tools
ensure_command redis-benchmark redis-tools
ensure_command redis-cli redis-tools
redis_version="$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')"
[[ "${redis_version%%.*}" -ge 7 ]] || log "warning: redis-server $redis_version, not 7.x"

REDIS_PID=""
stop_servers() {
    stop_pid "$REDIS_PID" 20
    REDIS_PID=""
}
install_exit_cleanup

POSITIONS=$((SKUS * NODES))
HOT_POSITIONS=$((HOT_SKUS * NODES))
HOT_PER_MILLE=$((HOT_PERCENT * 10))
RAND_RANGE=1000000000 # __rand_int__ draws 0..RAND_RANGE-1; reserve.lua splits it

start_redis() {
    local fsync_mode="$1"
    SCRATCH="$(make_scratch redis)"
    PORT="$(free_port)"
    redis-server --bind 127.0.0.1 --port "$PORT" --protected-mode yes --daemonize no \
        --dir "$SCRATCH" --logfile "$SCRATCH/redis.log" \
        --save "" --appendonly yes --appendfsync "$fsync_mode" --appenddirname aof \
        --auto-aof-rewrite-percentage 0 &
    REDIS_PID=$!
    wait_for_port "$PORT" "$REDIS_PID" 30 || {
        cat "$SCRATCH/redis.log" >&2 || true
        die "redis-server did not start"
    }
    for _ in $(seq 50); do
        [[ "$(rcli PING 2>/dev/null)" == PONG ]] && return 0
        sleep 0.1
    done
    die "redis-server does not answer PING"
}

stop_redis() {
    stop_pid "$REDIS_PID" 20
    REDIS_PID=""
    rm -rf "$SCRATCH"
    SCRATCH=""
}

rcli() { timeout 60 redis-cli -h 127.0.0.1 -p "$PORT" "$@"; }

# The data shape: POSITIONS hashes {on_hand 1e9, reserved 0, safety 0} through one pipe.
load_positions() {
    local started=$SECONDS
    awk -v n="$POSITIONS" 'BEGIN {
        for (i = 0; i < n; i++) {
            key = "pos:" i
            printf "*8\r\n$4\r\nHSET\r\n$%d\r\n%s\r\n$7\r\non_hand\r\n$10\r\n1000000000\r\n$8\r\nreserved\r\n$1\r\n0\r\n$6\r\nsafety\r\n$1\r\n0\r\n", length(key), key
        }
    }' | timeout 120 redis-cli -h 127.0.0.1 -p "$PORT" --pipe >"$OUT_DIR/redis-load.log" 2>&1 ||
        die "loading positions failed; see $OUT_DIR/redis-load.log"
    [[ "$(rcli DBSIZE)" == "$POSITIONS" ]] || die "expected $POSITIONS keys after the load"
    log "loaded $POSITIONS positions ($SKUS SKUs x $NODES nodes) in $((SECONDS - started)) s"
}

# One redis-benchmark run; prints "rps p99_ms" from its --csv line.
bench() {
    local requests="$1" pipeline="$2" hot="$3" csv
    csv="$(timeout $((DURATION * 6 + 60)) redis-benchmark -h 127.0.0.1 -p "$PORT" \
        -c "$CONCURRENCY" -n "$requests" -P "$pipeline" -r "$RAND_RANGE" --csv \
        EVALSHA "$SHA" 0 __rand_int__ 1 "$POSITIONS" "$hot" "$HOT_PER_MILLE" "$TTL_MS")" ||
        die "redis-benchmark failed (see above)"
    # "test","rps","avg","min","p50","p95","p99","max"
    echo "$csv" | awk -F'","' 'NR == 2 { gsub(/"/, "", $8); print $2, $7 }'
}

run_case() {
    local fsync_mode="$1" case_name="$2" pipeline="$3" hot="$4" mode_label="$5" class=durable
    [[ "$fsync_mode" == always ]] || class=buffered
    local calibration rps requests before_seq after_seq before_ticks after_ticks result p99 cpu reserved
    # redis-benchmark stops after -n requests, not after a time: a short calibration run (not
    # measured) sizes -n for about DURATION seconds.
    calibration=$((500 * pipeline * CONCURRENCY / 4))
    ((calibration >= 1000)) || calibration=1000
    rps="$(bench "$calibration" "$pipeline" "$hot" | awk '{ print $1 }')"
    requests="$(awk -v r="$rps" -v d="$DURATION" 'BEGIN { n = int(r * d); if (n < 1000) n = 1000; print n }')"
    before_seq="$(rcli GET reservation:seq)"
    before_ticks="$(proc_ticks "$REDIS_PID")"
    result="$(bench "$requests" "$pipeline" "$hot")"
    after_ticks="$(proc_ticks "$REDIS_PID")"
    after_seq="$(rcli GET reservation:seq)"
    # With -P, redis-benchmark sends whole pipelines and may overshoot -n by a few calls: the
    # reservations made are the operation count.
    reserved=$((after_seq - before_seq))
    ((reserved >= requests)) || log "warning: $reserved reservations made for $requests calls"
    rps="${result%% *}"
    p99="${result##* }"
    cpu="$(cpu_us_per_op $((after_ticks - before_ticks)) "$reserved")"
    add_row redis "$mode_label" "$case_name" "$rps" "$p99" "$cpu" "$reserved" \
        "redis-benchmark -c $CONCURRENCY -P $pipeline; EVALSHA reserve.lua; appendfsync $fsync_mode" "$class"
}

IFS=',' read -r -a mode_list <<<"$MODES"
for fsync_mode in "${mode_list[@]}"; do
    case "$fsync_mode" in
        always) label="AOF appendfsync always" ;;
        everysec) label="AOF appendfsync everysec (fsync once a second)" ;;
        *) die "unknown appendfsync mode $fsync_mode (always, everysec)" ;;
    esac
    log "redis-server $redis_version, appendfsync $fsync_mode"
    start_redis "$fsync_mode"
    load_positions
    SHA="$(rcli SCRIPT LOAD "$(cat "$COMPARE_DIR/reserve.lua")")"
    [[ "$SHA" =~ ^[0-9a-f]{40}$ ]] || die "SCRIPT LOAD failed: $SHA"
    run_case "$fsync_mode" reserve 1 0 "$label"
    run_case "$fsync_mode" reserve-hot 1 "$HOT_POSITIONS" "$label"
    run_case "$fsync_mode" reserve-pipelined "$PIPELINE" 0 "$label, -P $PIPELINE"
    cp "$SCRATCH/redis.log" "$OUT_DIR/redis-$fsync_mode.log" 2>/dev/null || true
    stop_redis
done
log "rows in $ROWS"
