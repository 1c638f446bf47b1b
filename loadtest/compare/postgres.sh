#!/usr/bin/env bash
# PostgreSQL 15 with a conditional UPDATE + INSERT per reservation (reserve.pgbench), driven by
# pgbench. Starts its own cluster on 127.0.0.1 in a temp dir (initdb), and always stops it and
# removes the temp dir on exit. See README.md in this directory.
set -euo pipefail

SCRIPT_NAME=postgres
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $0 [options]
PostgreSQL 15 (synchronous_commit = on, fsync = on): the conditional UPDATE ... WHERE
on_hand - reserved - safety >= q plus an INSERT of the reservation, one transaction each,
driven by pgbench -M prepared: a uniform case and the hot case.
Run as root, the server runs as the 'postgres' user (root may not run it).
EOF
    common_usage
}

script_flag() { return 1; }

parse_common_flags "$@"

# The server binaries: $PG_BIN, else the newest /usr/lib/postgresql/*/bin (15 on Debian 12).
find_pg_bin() {
    if [[ -n "${PG_BIN:-}" ]]; then
        echo "$PG_BIN"
        return
    fi
    find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1
}
PG_BIN="$(find_pg_bin)"
if [[ -z "$PG_BIN" || ! -x "$PG_BIN/postgres" ]]; then
    [[ "$(id -u)" == 0 ]] || die "PostgreSQL is missing: install the Debian package postgresql (apt-get install postgresql)"
    log "installing postgresql (apt-get)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql postgresql-contrib >"$OUT_DIR/apt-postgresql.log" 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql postgresql-contrib >"$OUT_DIR/apt-postgresql.log" 2>&1 ||
            die "apt-get install postgresql failed; see $OUT_DIR/apt-postgresql.log"
    fi
    PG_BIN="$(find_pg_bin)"
    [[ -x "$PG_BIN/postgres" ]] || die "postgres not found after installing postgresql"
fi
for tool in initdb postgres pgbench psql pg_isready; do
    [[ -x "$PG_BIN/$tool" ]] || die "$PG_BIN/$tool is missing"
done
pg_version="$("$PG_BIN/postgres" --version | sed -n 's/.*(PostgreSQL) \([0-9.]*\).*/\1/p')"
[[ "${pg_version%%.*}" == 15 ]] || log "note: PostgreSQL $pg_version, not 15"

# Root may not run postgres: as root the server runs as the postgres user.
if [[ "$(id -u)" == 0 ]]; then
    id postgres >/dev/null 2>&1 || die "no postgres user (the postgresql package creates it)"
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_pg() { "$@"; }
fi

PG_PID=""
WRAPPER_PID=""
stop_servers() {
    # SIGINT to the postmaster is PostgreSQL's fast shutdown.
    stop_pid "$PG_PID" 30 INT
    stop_pid "$WRAPPER_PID" 5
    PG_PID=""
    WRAPPER_PID=""
}
install_exit_cleanup

SCRATCH="$(make_scratch postgres)"
PGDATA="$SCRATCH/data"
mkdir -p "$SCRATCH/pgbench"
if [[ "$(id -u)" == 0 ]]; then
    chown postgres: "$SCRATCH"
    as_pg test -w "$SCRATCH" || die "the postgres user cannot write $SCRATCH (set TMPDIR to a directory it can reach)"
fi
PORT="$(free_port)"

log "initdb ($PG_BIN, PostgreSQL $pg_version) in $PGDATA"
as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C >"$OUT_DIR/postgres-initdb.log" 2>&1 ||
    die "initdb failed; see $OUT_DIR/postgres-initdb.log"

# Durable commits (the defaults, spelled out) and the usual sizing for a 24 GiB machine. The
# WAL is flushed by whichever backend commits first for everyone waiting: PostgreSQL's own
# group commit. max_wal_size keeps checkpoints out of short runs. Room for every pgbench
# client and the script's own psql (the default of 100 refused --concurrency 256).
MAX_CONNECTIONS=$((CONCURRENCY + 10 > 100 ? CONCURRENCY + 10 : 100))
as_pg "$PG_BIN/postgres" -D "$PGDATA" \
    -c listen_addresses=127.0.0.1 -c port="$PORT" -c unix_socket_directories="$SCRATCH" \
    -c synchronous_commit=on -c fsync=on -c full_page_writes=on \
    -c shared_buffers=256MB -c max_wal_size=2GB -c max_connections="$MAX_CONNECTIONS" \
    -c log_min_messages=warning >"$SCRATCH/postgres.log" 2>&1 &
WRAPPER_PID=$!
for _ in $(seq 300); do
    [[ -s "$PGDATA/postmaster.pid" ]] && break
    kill -0 "$WRAPPER_PID" 2>/dev/null || break
    sleep 0.1
done
PG_PID="$(head -n 1 "$PGDATA/postmaster.pid" 2>/dev/null || true)"
[[ -n "$PG_PID" ]] || { cat "$SCRATCH/postgres.log" >&2; die "postgres did not start"; }
ready=0
for _ in $(seq 300); do
    if "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 1; then
        ready=1
        break
    fi
    kill -0 "$PG_PID" 2>/dev/null || break
    sleep 0.1
done
((ready)) || { cat "$SCRATCH/postgres.log" >&2; die "postgres does not accept connections"; }

sql() { timeout 300 "$PG_BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres "$@"; }

# The data shape, as allot-load --setup makes it: SKU-0000000.. x DC-000.., on_hand 1e9.
# fillfactor 80 leaves room on each page for HOT updates of `reserved` (no index holds it).
started=$SECONDS
sql <<SQL
CREATE TABLE positions (
    sku text NOT NULL,
    node text NOT NULL,
    on_hand bigint NOT NULL,
    reserved bigint NOT NULL DEFAULT 0,
    safety bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (sku, node)
) WITH (fillfactor = 80);
CREATE TABLE reservations (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sku text NOT NULL,
    node text NOT NULL,
    qty bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- What an expiry sweeper reads (allotd and the Redis script keep an expiry index too).
CREATE INDEX reservations_expires_at ON reservations (expires_at);
INSERT INTO positions (sku, node, on_hand)
SELECT 'SKU-' || lpad(s::text, 7, '0'), 'DC-' || lpad(n::text, 3, '0'), 1000000000
FROM generate_series(0, $SKUS - 1) AS s, generate_series(0, $NODES - 1) AS n;
VACUUM ANALYZE positions;
CHECKPOINT;
SQL
log "loaded $((SKUS * NODES)) positions ($SKUS SKUs x $NODES nodes) in $((SECONDS - started)) s"

JOBS=2
((CONCURRENCY >= JOBS)) || JOBS=1

run_case() {
    local case_name="$1" hot_pct="$2" output before after before_rows after_rows tps processed p99 cpu latencies
    rm -f "$SCRATCH"/pgbench/*
    before_rows="$(sql -c 'SELECT count(*) FROM reservations')"
    before="$(tree_ticks "$PG_PID")"
    output="$(timeout $((DURATION + 120)) "$PG_BIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -n \
        -M prepared -c "$CONCURRENCY" -j "$JOBS" -T "$DURATION" \
        -D skus="$SKUS" -D nodes="$NODES" -D hot_skus="$HOT_SKUS" -D hot_pct="$hot_pct" -D ttl_s=$((TTL_MS / 1000)) \
        -f "$COMPARE_DIR/reserve.pgbench" -l --log-prefix="$SCRATCH/pgbench/log" postgres 2>&1)" || {
        echo "$output" >&2
        die "pgbench failed"
    }
    # Backends exit when pgbench disconnects; give the postmaster a moment to reap them so
    # their CPU time is in its cutime/cstime.
    sleep 1
    after="$(tree_ticks "$PG_PID")"
    after_rows="$(sql -c 'SELECT count(*) FROM reservations')"
    echo "$output" >"$OUT_DIR/pgbench-$case_name.txt"
    tps="$(echo "$output" | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -n 1)"
    processed="$(echo "$output" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')"
    [[ -n "$tps" && -n "$processed" ]] || { echo "$output" >&2; die "could not read pgbench's output"; }
    ((after_rows - before_rows == processed)) ||
        log "warning: $((after_rows - before_rows)) reservations inserted for $processed transactions"
    # p99 from pgbench's per-transaction log (-l): the third field is the latency in us.
    latencies="$SCRATCH/latencies.txt"
    cat "$SCRATCH"/pgbench/log* | awk '$3 ~ /^[0-9]+$/ { print $3 / 1000 }' >"$latencies"
    p99="$(percentile 99 "$latencies")"
    cpu="$(cpu_us_per_op $((after - before)) "$processed")"
    add_row postgres "synchronous_commit=on" "$case_name" "$tps" "$(printf '%.3f' "$p99")" "$cpu" "$processed" \
        "pgbench -M prepared -c $CONCURRENCY -j $JOBS -T $DURATION; UPDATE+INSERT in one statement"
}

log "PostgreSQL $pg_version on 127.0.0.1:$PORT"
run_case reserve 0
run_case reserve-hot "$HOT_PERCENT"
cp "$SCRATCH/postgres.log" "$OUT_DIR/postgres.log" 2>/dev/null || true
log "rows in $ROWS"
