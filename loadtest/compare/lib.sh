# shellcheck shell=bash disable=SC2034
# (SC2034: the defaults below are read by the scripts that source this file.)
# Shared helpers for the comparison scripts in loadtest/compare/ (sourced, not run).
#
# Every script writes its result rows to "$OUT_DIR/rows.tsv", one row per case, tab-separated:
#   system  mode  case  ops_per_s  p99_ms  cpu_us_per_op  ops  note  class
# class is "durable" (acknowledged = fsync'd) or "buffered" (acknowledged = written, fsync'd
# later): run-all.sh takes each ratio to the allotd row of the same case and class.
# run-all.sh turns the rows of all three scripts into one markdown table.

COMPARE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$COMPARE_DIR/../.." && pwd)"

# Defaults, changed by the common flags below.
DURATION=10          # seconds per measured case
QUICK=0
SKUS=10000
NODES=4
CONCURRENCY=16       # clients / callers in flight (pgbench -c, redis-benchmark -c, allot-load)
HOT_SKUS=10
HOT_PERCENT=90
TTL_MS=600000       # reservation TTL: longer than any run, so no system expires any during one
PIPELINE=16          # redis-benchmark -P for the pipelined case
BATCH=50             # allot-load --batch for the batched case
BATCH_CALLERS=4      # allot-load --concurrency for the batched case (4 x 50 = 200 reservations
                     # in flight, against redis-benchmark's 16 clients x -P 16 = 256)
OUT_DIR=""
MIN_FREE_MB="${MIN_FREE_MB:-512}"

log() { printf '[%s %s] %s\n' "$(date -u +%H:%M:%S)" "${SCRIPT_NAME:-compare}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

common_usage() {
    cat <<EOF
Common options:
  --quick              about 2 s per case (a smoke run; the numbers are not for publishing)
  --duration SECS      seconds per measured case (default $DURATION)
  --out DIR            directory for rows.tsv and logs (default: a new temp directory, kept)
  --skus N --nodes N   data shape (default $SKUS x $NODES positions, on_hand 1e9 each)
  --concurrency N      clients in flight (default $CONCURRENCY)
  --hot-skus N         hot case: SKUs that get the hot share (default $HOT_SKUS)
  --hot-percent P      hot case: percent of reserves on the hot SKUs (default $HOT_PERCENT)
Environment: TMPDIR (where the servers' temp dirs go; the same disk for every system),
MIN_FREE_MB (refuse to start below this much free space there, default 512).
EOF
}

# Parses the common flags; any other flag is handed to the script's own handler
# `script_flag NAME VALUE` (which returns 1 for an unknown flag, 2 if it took no value).
parse_common_flags() {
    while (($#)); do
        case "$1" in
            --quick) QUICK=1; DURATION=2; shift ;;
            --duration) DURATION="${2:?--duration needs a value}"; shift 2 ;;
            --out) OUT_DIR="${2:?--out needs a value}"; shift 2 ;;
            --skus) SKUS="${2:?}"; shift 2 ;;
            --nodes) NODES="${2:?}"; shift 2 ;;
            --concurrency) CONCURRENCY="${2:?}"; shift 2 ;;
            --hot-skus) HOT_SKUS="${2:?}"; shift 2 ;;
            --hot-percent) HOT_PERCENT="${2:?}"; shift 2 ;;
            -h | --help) usage; exit 0 ;;
            *)
                local rc=0
                script_flag "$1" "${2:-}" || rc=$?
                case "$rc" in
                    0) shift 2 ;;
                    2) shift ;;
                    *) usage >&2; die "unknown option $1" ;;
                esac
                ;;
        esac
    done
    for value in "$DURATION" "$SKUS" "$NODES" "$CONCURRENCY" "$HOT_SKUS" "$HOT_PERCENT"; do
        [[ "$value" =~ ^[0-9]+$ ]] || die "not a whole number: $value"
    done
    ((DURATION >= 1 && SKUS >= 1 && NODES >= 1 && CONCURRENCY >= 1)) || die "values must be at least 1"
    ((HOT_SKUS >= 1 && HOT_SKUS <= SKUS && HOT_PERCENT <= 100)) || die "bad hot-case values"
    if [[ -z "$OUT_DIR" ]]; then
        OUT_DIR="$(mktemp -d "${TMPDIR:-/tmp}/allot-compare-results.XXXXXX")"
    fi
    mkdir -p "$OUT_DIR"
    OUT_DIR="$(cd "$OUT_DIR" && pwd)"
    ROWS="$OUT_DIR/rows.tsv"
    touch "$ROWS"
}

# A scratch directory for one server, on the same disk for every system ($TMPDIR).
make_scratch() {
    local name="$1" base="${TMPDIR:-/tmp}" free_mb
    free_mb=$(df -Pm "$base" | awk 'NR == 2 { print $4 }')
    if ((free_mb < MIN_FREE_MB)); then
        die "only ${free_mb} MB free in $base (MIN_FREE_MB=$MIN_FREE_MB); the logs and WALs need room"
    fi
    ((free_mb >= 2048)) || log "warning: only ${free_mb} MB free in $base; long runs write large logs"
    mktemp -d "$base/allot-compare-$name.XXXXXX"
}

# A TCP port on 127.0.0.1 that no socket uses right now (the servers bind it just after). It is
# drawn below the kernel's ephemeral range, where client sockets take their local ports.
free_port() {
    local port tries low=1024 span
    read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || low=32768
    span=$((low - 10000))
    ((span > 1000)) || die "the ephemeral port range starts at $low; no room below it"
    for ((tries = 0; tries < 200; tries++)); do
        port=$((10000 + (RANDOM * 32768 + RANDOM) % span))
        if ! ss -Htan "( sport = :$port )" 2>/dev/null | grep -q . &&
            ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    die "no free port found"
}

# Waits until something accepts TCP connections on 127.0.0.1:PORT while PID lives.
wait_for_port() {
    local port="$1" pid="$2" seconds="${3:-30}" i
    for ((i = 0; i < seconds * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# Two distinct free ports for an allotd: PORT (gRPC) and METRICS_PORT.
pick_allotd_ports() {
    PORT="$(free_port)"
    METRICS_PORT="$(free_port)"
    [[ "$METRICS_PORT" != "$PORT" ]] || METRICS_PORT="$(free_port)"
}

# Starts "$ALLOTD" on 127.0.0.1:PORT and METRICS_PORT (see pick_allotd_ports) with the extra
# ARGS, logging to LOG, and waits up to SECS until it serves: its log's "allotd serving" line,
# which carries startup_ms (the ports are bound before the store is opened, so an open port
# is not yet a serving daemon). Leaves its pid in ALLOTD_PID.
start_allotd_process() {
    local log_file="$1" seconds="$2" i
    shift 2
    "$ALLOTD" --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$METRICS_PORT" \
        --log-format text "$@" >"$log_file" 2>&1 &
    ALLOTD_PID=$!
    for ((i = 0; i < seconds * 10; i++)); do
        grep -q 'allotd serving' "$log_file" && return 0
        kill -0 "$ALLOTD_PID" 2>/dev/null || break
        sleep 0.1
    done
    cat "$log_file" >&2
    die "allotd did not start serving"
}

# The Prometheus text of the allotd on METRICS_PORT (see pick_allotd_ports); fails when it
# does not answer.
allotd_metrics() {
    (exec 3<>"/dev/tcp/127.0.0.1/$METRICS_PORT" &&
        printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3 && cat <&3)
}

# Cleanup on any exit, installed by install_exit_cleanup: the script's own stop_servers (when it
# defines one), then the scratch directory; Ctrl-C and TERM exit with their usual codes.
SCRATCH=""
_exit_cleanup() {
    local rc=$?
    if declare -F stop_servers >/dev/null; then
        stop_servers
    fi
    [[ -n "$SCRATCH" ]] && rm -rf "$SCRATCH"
    SCRATCH=""
    exit "$rc"
}
install_exit_cleanup() {
    trap _exit_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# Stops PID: SIGNAL (default TERM), up to SECS seconds, then SIGKILL. Only that process id.
stop_pid() {
    local pid="$1" seconds="${2:-15}" signal="${3:-TERM}" i
    [[ -n "$pid" ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill "-$signal" "$pid" 2>/dev/null || true
    for ((i = 0; i < seconds * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid did not stop in ${seconds}s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

CLK_TCK="$(getconf CLK_TCK)"

# Fields of /proc/PID/stat after the command name (which may hold spaces and parentheses):
# index 0 = state (field 3), so field N is at index N-3: ppid 1, utime 11, stime 12,
# cutime 13, cstime 14.
_stat_fields() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    echo "${stat##*) }"
}

# CPU clock ticks of one process, all its threads: utime + stime.
proc_ticks() {
    local -a f
    read -r -a f <<<"$(_stat_fields "$1")" || { echo 0; return; }
    echo $((f[11] + f[12]))
}

# CPU clock ticks of a process tree one level deep (a postmaster and its backends): the
# parent's own and reaped children's time (utime + stime + cutime + cstime) plus the same for
# every live child. A child that exits moves its time into the parent's cutime/cstime once
# reaped, so nothing is lost or counted twice between two samples.
tree_ticks() {
    local parent="$1" total=0 stat dir
    local -a f
    for dir in /proc/[0-9]*; do
        stat="$(cat "$dir/stat" 2>/dev/null)" || continue
        read -r -a f <<<"${stat##*) }"
        if [[ "${dir#/proc/}" == "$parent" || "${f[1]}" == "$parent" ]]; then
            total=$((total + f[11] + f[12] + f[13] + f[14]))
        fi
    done
    echo "$total"
}

# Microseconds of CPU per operation from a tick delta and an operation count.
cpu_us_per_op() {
    awk -v t="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN { if (n > 0) printf "%.1f", t / hz * 1e6 / n; else print "nan" }'
}

# A number field of allot-load's JSON object, its first occurrence ("" when absent).
json_num() { { grep -o "\"$1\": *[0-9.eE+-]*" <<<"$2" || true; } | head -n 1 | sed 's/.*: *//'; }

# The P-th percentile (0-100) of the numbers in FILE (one per line), nearest rank.
percentile() {
    local p="$1" file="$2" n
    n=$(wc -l <"$file")
    ((n > 0)) || { echo nan; return; }
    # awk reads to the end: leaving at line k would kill sort with SIGPIPE once its output
    # outgrows the pipe, and pipefail would turn that into a failed run (seen at 140,000 lines).
    sort -n "$file" | awk -v p="$p" -v n="$n" 'BEGIN { k = int(p / 100 * n + 0.999999); if (k < 1) k = 1 } NR == k { print }'
}

# Appends one result row (see the top of this file).
add_row() {
    local system="$1" mode="$2" case_name="$3" ops_s="$4" p99="$5" cpu="$6" ops="$7" note="${8:-}" class="${9:-durable}"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$system" "$mode" "$case_name" "$ops_s" "$p99" "$cpu" "$ops" "$note" "$class" >>"$ROWS"
    log "$(printf '%-8s %-34s %-16s %10.0f ops/s  p99 %8s ms  %8s us CPU/op' "$system" "$mode" "$case_name" "$ops_s" "$p99" "$cpu")"
}

# Installs Debian packages when COMMAND is missing (root only; otherwise says what to install).
ensure_command() {
    local command="$1"
    shift
    command -v "$command" >/dev/null 2>&1 && return 0
    if [[ "$(id -u)" != 0 ]]; then
        die "$command is missing: install the Debian package(s) $* (as root: apt-get install $*)"
    fi
    log "installing $* (apt-get)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >"${OUT_DIR:-/tmp}/apt-$command.log" 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >"${OUT_DIR:-/tmp}/apt-$command.log" 2>&1 ||
            die "apt-get install $* failed; see ${OUT_DIR:-/tmp}/apt-$command.log"
    fi
    command -v "$command" >/dev/null 2>&1 || die "$command still missing after installing $*"
}
