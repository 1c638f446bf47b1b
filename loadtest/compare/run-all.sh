#!/usr/bin/env bash
# Runs allot.sh, redis.sh and postgres.sh one after the other and prints one markdown table
# (also written to OUT/results.md). See README.md in this directory.
set -euo pipefail

SCRIPT_NAME=run-all
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ONLY="allot,redis,postgres"
ALLOT_FLAGS=()
TABLE_ONLY=0

usage() {
    cat <<EOF
Usage: $0 [options]
Runs allot.sh, redis.sh and postgres.sh with the same options and prints one table of ops/s,
p99 and server CPU per operation, with ratios to allotd, plus the machine and the date.
  --only LIST          which systems, comma-separated (default $ONLY)
  --no-build           allot.sh uses the existing release binaries
  --bin-dir DIR        allot.sh takes allotd and allot-load from DIR
  --allot-modes LIST   allot.sh --modes (default: fsync,buffered)
  --table-only         run nothing: print the table of the rows already in --out DIR
EOF
    common_usage
}

script_flag() {
    case "$1" in
        --only) ONLY="${2:?--only needs a value}" ;;
        --no-build) ALLOT_FLAGS+=(--no-build); return 2 ;;
        --bin-dir) ALLOT_FLAGS+=(--bin-dir "${2:?--bin-dir needs a value}") ;;
        --allot-modes) ALLOT_FLAGS+=(--modes "${2:?--allot-modes needs a value}") ;;
        --table-only) TABLE_ONLY=1; return 2 ;;
        *) return 1 ;;
    esac
}

parse_common_flags "$@"
((TABLE_ONLY)) || : >"$ROWS"
COMMON=(--out "$OUT_DIR" --duration "$DURATION" --skus "$SKUS" --nodes "$NODES"
    --concurrency "$CONCURRENCY" --hot-skus "$HOT_SKUS" --hot-percent "$HOT_PERCENT")

cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
memory="$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
read -r load1 _ </proc/loadavg
started_at="$(date -u '+%Y-%m-%d %H:%M UTC')"
if ((TABLE_ONLY)); then
    # The rows' time, not now; the load then is unknown.
    started_at="$(date -u -r "$ROWS" '+%Y-%m-%d %H:%M UTC')"
    load1="unknown"
fi
if ((!TABLE_ONLY)) && awk -v l="$load1" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
    log "warning: load average $load1 on $(nproc) cores before the run: the machine is busy, the numbers will be low and noisy"
fi

# Each script is bounded: its own benchmark runs have time limits, and this limit stops a
# script that hangs anyway (SIGTERM runs its cleanup: servers stopped, temp dirs removed).
failed=()
run_script() {
    local name="$1" limit="$2"
    shift 2
    log "== $name.sh"
    if ! timeout --kill-after=60 "$limit" "$COMPARE_DIR/$name.sh" "${COMMON[@]}" "$@"; then
        log "$name.sh failed; its rows are missing from the table"
        failed+=("$name")
    fi
}
IFS=',' read -r -a systems <<<"$ONLY"
for system in "${systems[@]}"; do
    ((TABLE_ONLY)) && break
    case "$system" in
        # The build may take many minutes on a cold cache or wait for another build's lock.
        allot) run_script allot $((3600 + 8 * (DURATION + 120))) "${ALLOT_FLAGS[@]}" ;;
        redis) run_script redis $((600 + 6 * (8 * DURATION + 120))) ;;
        postgres) run_script postgres $((600 + 2 * (DURATION + 120))) ;;
        *) die "unknown system $system (allot, redis, postgres)" ;;
    esac
done

versions=()
if [[ " ${systems[*]} " == *" allot "* ]]; then
    versions+=("allotd $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')")
fi
if [[ " ${systems[*]} " == *" redis "* ]] && command -v redis-server >/dev/null; then
    versions+=("Redis $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')")
fi
if [[ " ${systems[*]} " == *" postgres "* ]]; then
    pg_bin="${PG_BIN:-$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)}"
    [[ -x "$pg_bin/postgres" ]] && versions+=("PostgreSQL $("$pg_bin/postgres" --version | sed -n 's/.*(PostgreSQL) \([0-9.]*\).*/\1/p')")
fi

# The rows by case (uniform, hot, batched, health), then allotd, redis, postgres, then durable
# before buffered, keeping each script's own order within that.
sort_rows() {
    awk -F'\t' -v OFS='\t' '
        BEGIN {
            split("reserve reserve-hot reserve-batched reserve-pipelined health", c, " ")
            for (i in c) case_rank[c[i]] = i
            system_rank["allotd"] = 1; system_rank["redis"] = 2; system_rank["postgres"] = 3
        }
        {
            cr = ($3 in case_rank) ? case_rank[$3] : 9
            sr = ($1 in system_rank) ? system_rank[$1] : 9
            print cr, sr, ($9 == "buffered") ? 2 : 1, NR, $0
        }' "$1" | sort -t$'\t' -k1,1n -k2,2n -k3,3n -k4,4n | cut -f5-
}

RESULTS="$OUT_DIR/results.md"
{
    echo "## Reservations: allotd, Redis and PostgreSQL side by side"
    echo
    echo "- Date: $started_at$( ((QUICK)) && echo ' (--quick: a smoke run, not for publishing)')"
    echo "- Machine: $(nproc) cores ($cpu_model), $memory, kernel $(uname -r); load average $load1 before the run"
    joined="$(IFS=','; echo "${versions[*]}")"
    echo "- Versions: ${joined//,/, }"
    echo "- Data: $SKUS SKUs x $NODES nodes, on_hand 1e9 each; qty 1 per reservation; $CONCURRENCY clients; $DURATION s per case; hot case: $HOT_PERCENT % of reserves on $HOT_SKUS SKUs"
    echo "- Client and server share the machine's cores. Server CPU is the server processes' user + system time over the case, divided by the reservations made."
    echo "- Ratios are to allotd's row of the same case and durability (fsync'd before the reply, or not: Redis everysec and allotd buffered); the pipelined Redis rows are compared with allotd's ReserveBatch row. Above 1 means more ops/s, or more CPU per op, than allotd."
    echo
    echo "| system | mode | case | ops/s | p99 ms | server CPU µs/op | ops/s vs allotd | CPU/op vs allotd |"
    echo "|---|---|---|---:|---:|---:|---:|---:|"
    awk -F'\t' -v hot_skus="$HOT_SKUS" -v hot_pct="$HOT_PERCENT" '
        function group(c) { return (c == "reserve-pipelined" || c == "reserve-batched") ? "batched" : c }
        function label(c) {
            if (c == "reserve") return "reserve, uniform"
            if (c == "reserve-hot") return "reserve, " hot_pct " % on " hot_skus " SKUs"
            if (c == "reserve-pipelined") return "reserve, pipelined"
            if (c == "reserve-batched") return "reserve, batched"
            if (c == "health") return "health check (transport ceiling)"
            return c
        }
        function commas(x,    s, neg) {
            s = sprintf("%.0f", x)
            while (s ~ /[0-9][0-9][0-9][0-9]/) sub(/[0-9][0-9][0-9]([,.]|$)/, ",&", s)
            return s
        }
        function ratio(a, b) { return (b > 0 && a != "nan" && b != "nan") ? sprintf("%.2f×", a / b) : "–" }
        { rows[NR] = $0 }
        $1 == "allotd" { ref_ops[group($3), $9] = $4; ref_cpu[group($3), $9] = $6 }
        END {
            for (i = 1; i <= NR; i++) {
                split(rows[i], f, "\t")
                # The allotd row of the same case and durability class, else the durable one.
                class = f[9]
                if (!((group(f[3]), class) in ref_ops)) class = "durable"
                k = group(f[3]) SUBSEP class
                r_ops = ((k in ref_ops) && f[3] != "health") ? ratio(f[4], ref_ops[k]) : "–"
                r_cpu = ((k in ref_cpu) && f[3] != "health") ? ratio(f[6], ref_cpu[k]) : "–"
                printf "| %s | %s | %s | %s | %.2f | %.1f | %s | %s |\n", f[1], f[2], label(f[3]), commas(f[4]), f[5], f[6], r_ops, r_cpu
            }
        }' <(sort_rows "$ROWS")
    if ((${#failed[@]})); then
        echo
        echo "Failed (rows missing): ${failed[*]}; logs in $OUT_DIR"
    fi
} >"$RESULTS"
cat "$RESULTS"
log "table in $RESULTS, rows in $ROWS, logs in $OUT_DIR"
((${#failed[@]} == 0))
