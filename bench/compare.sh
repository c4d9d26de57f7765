#!/usr/bin/env bash
# bench/compare.sh — blkmesh vs qemu-storage-daemon (qsd), same client.
#
# For each workload point, measures qsd's vhost-user-blk export and
# blkmesh's export of the same page-cached image (and of a null device),
# alternating targets, REPS times; prints medians and blkmesh/qsd ratios.
# The client is `blkmesh-io bench` (libblkio virtio-blk-vhost-user), pinned
# to CLIENT_CPU; every server (and all its child processes and threads) is
# pinned to SERVER_CPU the same way, with taskset.
#
# Usage: bench/compare.sh            (from anywhere in the repo)
# Environment (defaults in brackets):
#   REPS [3]            repetitions of each point (medians are reported)
#   RUN_SECONDS [10]    measured seconds per run;  WARMUP [1] warm-up seconds
#   IMAGE_SIZE [1G]     image size (pre-filled with dd, kept in page cache)
#   CLIENT_CPU [0]      SERVER_CPU [1]
#   TARGETS ["qsd-file blkmesh-file qsd-null blkmesh-null iouring-file"]
#     iouring-file is the ceiling: no server, the client itself drives the
#     image with libblkio's io_uring driver (blkmesh-io --file) on CLIENT_CPU
#   WORKLOADS           subset of workload names (see WORKLOAD_LIST below)
#   WORKDIR [mktemp]    scratch dir: image, sockets, logs, results.tsv
#   QSD [qemu-storage-daemon]   BLKMESH_BIN [target/release/blkmesh]
#   BLKMESH_BIN_OLD     a second blkmesh build (e.g. the previous commit's):
#     adds targets blkmesh-old-file / blkmesh-old-null, run alternately with
#     the others, and a new/old column to the table
#   BLKMESH_START_FILE / BLKMESH_START_NULL: command templates overriding how
#     blkmesh is started; @IMAGE@, @SOCKET@, @SIZE@ (bytes) and @WORKDIR@ are
#     substituted. See start_blkmesh_file / start_blkmesh_null.
#   QUIET_PCT [10] QUIET_WAIT [30]: before each run, wait up to QUIET_WAIT s
#     for the machine to use at most QUIET_PCT% of one CPU (shared machines)
#   NOISY_PCT [10] NOISY_RETRIES [2]: a run whose other-CPU% exceeds NOISY_PCT
#     is discarded (kept in noisy.tsv) and repeated, at most NOISY_RETRIES times
#   NO_BUILD=1          skip `cargo build --release -p blkmesh-io`
#   FORMAT [raw]        qcow2: the *-file targets serve a qcow2 image instead
#     (qsd driver=qcow2 over its file; blkmesh a qcow2 node over an io_uring
#     node, from a configuration file), fully allocated from the dd-filled
#     raw image, which target blkmesh-raw serves as raw (the same data).
#     Workload 4k-randwrite-alloc-qd32 gets a fresh thin image of
#     ALLOC_SIZE [64G] before every run: its writes allocate clusters.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPS=${REPS:-3}
RUN_SECONDS=${RUN_SECONDS:-10}
WARMUP=${WARMUP:-1}
IMAGE_SIZE=${IMAGE_SIZE:-1G}
CLIENT_CPU=${CLIENT_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
TARGETS=${TARGETS:-"qsd-file blkmesh-file qsd-null blkmesh-null iouring-file"}
QSD=${QSD:-qemu-storage-daemon}
BLKMESH_BIN=${BLKMESH_BIN:-$ROOT/target/release/blkmesh}
BLKMESH_BIN_OLD=${BLKMESH_BIN_OLD:-}
CLIENT=$ROOT/target/release/blkmesh-io
QUIET_PCT=${QUIET_PCT:-10}
QUIET_WAIT=${QUIET_WAIT:-30}
NOISY_PCT=${NOISY_PCT:-10}
NOISY_RETRIES=${NOISY_RETRIES:-2}
EXPORT_QUEUES=${EXPORT_QUEUES:-1}
FORMAT=${FORMAT:-raw}
ALLOC_SIZE=${ALLOC_SIZE:-64G}

# name|rw|bs|qd|queues — the first is the headline.
WORKLOAD_LIST=(
    "4k-randread-qd32|randread|4k|32|1"
    "4k-randwrite-qd32|randwrite|4k|32|1"
    "64k-read-qd8|read|64k|8|1"
    "128k-read-qd8|read|128k|8|1"
    "4k-randread-qd1|randread|4k|1|1"
    "4k-randread-qd32-q2|randread|4k|32|2"
    "4k-randread-qd32-q4|randread|4k|32|4"
    "4k-randwrite-alloc-qd32|randwrite|4k|32|1"
)
# Default: the workloads whose queue count is the export's.
WORKLOADS=${WORKLOADS:-$(printf '%s\n' "${WORKLOAD_LIST[@]}" | awk -F'|' -v q="$EXPORT_QUEUES" '$5 == q { print $1 }' | tr '\n' ' ')}
# blkmesh's workers, and whether the export's queues are spread over them.
BLKMESH_WORKERS=${BLKMESH_WORKERS:-1}
BLKMESH_SPREAD=${BLKMESH_SPREAD:+--spread}

log() { printf '%s\n' "$*" >&2; }
die() { log "compare.sh: $*"; exit 1; }

to_bytes() {
    local v=$1 n=${1%[kKmMgGtT]} s=1
    case $v in
        *[kK]) s=$((1 << 10)) ;; *[mM]) s=$((1 << 20)) ;;
        *[gG]) s=$((1 << 30)) ;; *[tT]) s=$((1 << 40)) ;;
    esac
    echo $((n * s))
}

if [[ -z ${WORKDIR:-} ]]; then
    WORKDIR=$(mktemp -d /tmp/blkmesh-bench.XXXXXX)
fi
mkdir -p "$WORKDIR"
RAW_IMAGE=$WORKDIR/disk.img
IMAGE=$RAW_IMAGE
[[ $FORMAT == qcow2 ]] && IMAGE=$WORKDIR/disk.qcow2
SIZE_BYTES=$(to_bytes "$IMAGE_SIZE")
RESULTS=$WORKDIR/results.tsv

SERVER_PID=
SOCKET=

# --------------------------------------------------------------------------
# Server lifecycle

# Waits (bounded) for $SOCKET to appear while $SERVER_PID is alive.
wait_for_socket() {
    local name=$1 i
    for ((i = 0; i < 200; i++)); do
        [[ -S $SOCKET ]] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || {
            log "$name exited during start-up; log:"
            cat "$WORKDIR/$name.log" >&2 || true
            return 1
        }
        sleep 0.05
    done
    log "$name did not create $SOCKET within 10 s"
    return 1
}

# Starts "$@" pinned to SERVER_CPU, logging to $WORKDIR/<name>.log.
launch() {
    local name=$1
    shift
    SOCKET=$WORKDIR/$name.sock
    rm -f "$SOCKET"
    # Children and threads inherit the affinity: whole server on SERVER_CPU.
    # setsid makes the server a process-group leader (same PID), so
    # stop_server can signal it together with any child processes.
    setsid taskset -c "$SERVER_CPU" "$@" >"$WORKDIR/$name.log" 2>&1 &
    SERVER_PID=$!
    wait_for_socket "$name"
}

stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    # The server's own process group (see launch): it and its children.
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
    rm -f "$SOCKET"
}
trap stop_server EXIT
trap 'stop_server; exit 130' INT TERM

qsd_export() {
    echo "type=vhost-user-blk,id=e0,node-name=$1,addr.type=unix,addr.path=$SOCKET,writable=on,num-queues=$EXPORT_QUEUES"
}

start_qsd_file() {
    SOCKET=$WORKDIR/qsd-file.sock
    launch qsd-file "$QSD" \
        --blockdev "driver=file,node-name=file0,filename=$IMAGE,cache.direct=off,aio=io_uring" \
        --blockdev "driver=$FORMAT,node-name=fmt0,file=file0" \
        --export "$(qsd_export fmt0)"
}

start_qsd_null() {
    SOCKET=$WORKDIR/qsd-null.sock
    launch qsd-null "$QSD" \
        --blockdev "driver=null-co,node-name=null0,size=$SIZE_BYTES,read-zeroes=on" \
        --export "$(qsd_export null0)"
}

# Expands @IMAGE@/@SOCKET@/@SIZE@/@WORKDIR@ in a command template.
expand() {
    local t=$1
    t=${t//@IMAGE@/$IMAGE}
    t=${t//@SOCKET@/$SOCKET}
    t=${t//@SIZE@/$SIZE_BYTES}
    t=${t//@WORKDIR@/$WORKDIR}
    echo "$t"
}

# ======================== BLKMESH START-UP: EDIT HERE ========================
# blkmesh is started with `blkmesh up` (override with BLKMESH_START_FILE /
# BLKMESH_START_NULL).
# Requirements: serve a vhost-user-blk export of the image (file, page cache,
# io_uring, like qsd's cache.direct=off,aio=io_uring) or of a null device that
# reads zeroes, with $EXPORT_QUEUES queue(s), on @SOCKET@; stay in the
# foreground; exit on SIGTERM. taskset pins it and all its child processes.
BLKMESH_OVERRIDE=${BLKMESH_START_FILE:+1}${BLKMESH_START_NULL:+1}
# The workers run as root here, like qsd: the image sits in a private
# scratch directory their own user (blkmesh up's default as root) could
# not reach; the uid makes no difference to the figures.
BLKMESH_START_FILE=${BLKMESH_START_FILE:-"$BLKMESH_BIN up --dir @WORKDIR@/blkmesh-file --worker-user root --listen 127.0.0.1:0 --workers $BLKMESH_WORKERS $BLKMESH_SPREAD --image @IMAGE@ --queues $EXPORT_QUEUES --socket @SOCKET@"}
BLKMESH_START_NULL=${BLKMESH_START_NULL:-"$BLKMESH_BIN up --dir @WORKDIR@/blkmesh-null --worker-user root --listen 127.0.0.1:0 --workers $BLKMESH_WORKERS $BLKMESH_SPREAD --null --size @SIZE@ --queues $EXPORT_QUEUES --socket @SOCKET@"}
# =============================================================================

# FORMAT=qcow2: the same `blkmesh up`, with a configuration file naming
# the qcow2 node over the image's io_uring node.
qcow2_config() {
    local dir=$1 config=$1.toml
    cat >"$config" <<TOML
[[node]]
name = "disk0-file"
io_uring = { path = "$IMAGE" }
[[node]]
name = "disk0"
qcow2 = { file = "disk0-file" }
[[export]]
id = "disk0"
node = "disk0"
socket = "$SOCKET"
writable = true
num_queues = $EXPORT_QUEUES
TOML
    echo "$BLKMESH_BIN up --dir $dir --worker-user root --listen 127.0.0.1:0 --workers $BLKMESH_WORKERS --config $config"
}

start_blkmesh_file() {
    SOCKET=$WORKDIR/blkmesh-file.sock
    local t=$BLKMESH_START_FILE
    if [[ $FORMAT == qcow2 && -z $BLKMESH_OVERRIDE ]]; then
        rm -rf "$WORKDIR/blkmesh-file" # the state names the last run's nodes
        t=$(qcow2_config "$WORKDIR/blkmesh-file")
    fi
    # shellcheck disable=SC2046 # the template is split into words on purpose
    launch blkmesh-file $(expand "$t")
}

# FORMAT=qcow2: blkmesh's raw path on the same data (the dd-filled image).
start_blkmesh_raw() {
    SOCKET=$WORKDIR/blkmesh-raw.sock
    local t=${BLKMESH_START_FILE//@IMAGE@/$RAW_IMAGE}
    t=${t//@WORKDIR@\/blkmesh-file/@WORKDIR@\/blkmesh-raw}
    rm -rf "$WORKDIR/blkmesh-raw"
    # shellcheck disable=SC2046
    launch blkmesh-raw $(expand "$t")
}

start_blkmesh_null() {
    SOCKET=$WORKDIR/blkmesh-null.sock
    # shellcheck disable=SC2046
    launch blkmesh-null $(expand "$BLKMESH_START_NULL")
}

# The ceiling: no server; run_point gives the client the image itself.
start_iouring_file() {
    SOCKET= SERVER_PID=
}

# The same two with the BLKMESH_BIN_OLD build.
start_blkmesh_old_file() {
    SOCKET=$WORKDIR/blkmesh-old-file.sock
    local t=${BLKMESH_START_FILE/#$BLKMESH_BIN/$BLKMESH_BIN_OLD}
    # Its own state directory: the other build's state names the other socket.
    t=${t//@WORKDIR@\/blkmesh-file/@WORKDIR@\/blkmesh-old-file}
    # shellcheck disable=SC2046
    launch blkmesh-old-file $(expand "$t")
}

start_blkmesh_old_null() {
    SOCKET=$WORKDIR/blkmesh-old-null.sock
    local t=${BLKMESH_START_NULL/#$BLKMESH_BIN/$BLKMESH_BIN_OLD}
    # Its own state directory: the other build's state names the other socket.
    t=${t//@WORKDIR@\/blkmesh-null/@WORKDIR@\/blkmesh-old-null}
    # shellcheck disable=SC2046
    launch blkmesh-old-null $(expand "$t")
}

# --------------------------------------------------------------------------
# Measurement

CLK_TCK=$(getconf CLK_TCK)

# Busy CPU ticks of the whole machine (user nice system irq softirq steal).
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }

# CPU ticks used so far by process group $1 (the server and its children).
group_ticks() {
    cat /proc/[0-9]*/stat 2>/dev/null | awk -v pg="$1" '{
        sub(/^.*\) /, "")   # drop "pid (comm) ": $3 is now pgrp, $12.. utime
        if ($3 == pg) t += $12 + $13 + $14 + $15 } END { print t + 0 }'
}

# Context switches so far of every thread of process group $1: how often
# the server slept and was woken (or preempted).
group_switches() {
    local pid t=0 n
    for pid in $(cat /proc/[0-9]*/stat 2>/dev/null |
        awk -v pg="$1" '{ pid = $1; sub(/^.*\) /, ""); if ($3 == pg) print pid }'); do
        n=$(cat /proc/"$pid"/task/*/status 2>/dev/null |
            awk '/ctxt_switches/ { t += $2 } END { print t + 0 }')
        t=$((t + n))
    done
    echo "$t"
}

# Waits (at most QUIET_WAIT s) until the machine is nearly idle, so other
# users' work does not land inside a measurement.
wait_for_quiet() {
    local deadline=$((SECONDS + QUIET_WAIT)) a b busy
    while :; do
        a=$(machine_ticks)
        sleep 0.5
        b=$(machine_ticks)
        busy=$(((b - a) * 200 / CLK_TCK)) # % of one CPU
        ((busy <= QUIET_PCT)) && return 0
        if ((SECONDS >= deadline)); then
            log "  machine still busy (${busy}% of a CPU) after ${QUIET_WAIT}s; measuring anyway"
            return 0
        fi
        sleep 1
    done
}

# run_point TARGET WORKLOAD-SPEC REP: one measured run, appended to RESULTS.
run_point() {
    local target=$1 spec=$2 rep=$3 name rw bs qd queues json
    IFS='|' read -r name rw bs qd queues <<<"$spec"
    if [[ $name == *-alloc-* ]]; then
        [[ $FORMAT == qcow2 ]] || die "$name needs FORMAT=qcow2"
        rm -f "$IMAGE"
        qemu-img create -q -f qcow2 "$IMAGE" "$ALLOC_SIZE"
        QCOW2_FULL=0
    fi
    wait_for_quiet
    "start_${target//-/_}" || die "cannot start $target"
    local out=$WORKDIR/client.json ctime=$WORKDIR/client.time
    local m0 s0 t0 m1 s1 t1 status=0
    local w0 w1
    w0=$(group_switches "$SERVER_PID")
    m0=$(machine_ticks) s0=$(group_ticks "$SERVER_PID") t0=$(date +%s.%N)
    local TIMEFORMAT='%3U %3S' device=(--socket "$SOCKET")
    [[ $target == iouring-file ]] && device=(--file "$IMAGE")
    { time taskset -c "$CLIENT_CPU" "$CLIENT" "${device[@]}" --queues "$queues" \
        --timeout 30 bench --rw "$rw" --bs "$bs" --qd "$qd" \
        --seconds "$RUN_SECONDS" --warmup "$WARMUP" --json >"$out" 2>"$WORKDIR/client.err"; } \
        2>"$ctime" || status=$?
    m1=$(machine_ticks) s1=$(group_ticks "$SERVER_PID") t1=$(date +%s.%N)
    w1=$(group_switches "$SERVER_PID")
    stop_server
    ((status == 0)) || { cat "$WORKDIR/client.err" >&2; die "bench failed: $target $name rep $rep"; }
    # CPU% (of one CPU) used by anything but this client and server: other
    # users of the machine, plus kernel threads (e.g. writeback). High values
    # mean a noisy run.
    local other
    other=$(awk -v m="$((m1 - m0))" -v s="$((s1 - s0))" -v hz="$CLK_TCK" \
        -v w="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
        '{ v = ((m - s) / hz - $1 - $2) / w * 100; printf "%.0f", v < 0 ? 0 : v }' "$ctime")
    local iops mbps p50 p99 p999 ops secs
    read -r iops mbps p50 p99 p999 ops secs < <(jq -r \
        '[.iops, .mb_per_s, .lat_p50_us, .lat_p99_us, .lat_p999_us, .ops, .seconds] | @tsv' "$out")
    # The server's CPU and context switches per I/O. Both counters also run
    # through the warm-up, whose I/O the client does not count: scale its
    # ops to the whole run at the measured rate.
    local cpu_us sw
    read -r cpu_us sw < <(awk -v s="$((s1 - s0))" -v hz="$CLK_TCK" -v w="$((w1 - w0))" \
        -v ops="$ops" -v secs="$secs" -v warm="$WARMUP" 'BEGIN {
            all = ops * (secs + warm) / secs
            if (all <= 0) { print "- -"; exit }
            printf "%.2f %.2f\n", s / hz * 1e6 / all, w / all }')
    local dest=$RESULTS noisy=0
    if ((other > NOISY_PCT && ${RETRIES_LEFT:-0} > 0)); then
        dest=$WORKDIR/noisy.tsv noisy=1
    fi
    printf '%s\t%s\t%s\t%.0f\t%.1f\t%.1f\t%.1f\t%.1f\t%s\t%s\t%s\n' \
        "$name" "$target" "$rep" "$iops" "$mbps" "$p50" "$p99" "$p999" "$other" "$cpu_us" "$sw" >>"$dest"
    log "$(printf '  %-18s %-16s rep %s: %9.0f IOPS %8.1f MB/s p50 %7.1f p99 %7.1f p99.9 %7.1f us, server %s CPU-us %s switches per I/O, other CPU %s%%%s' \
        "$name" "$target" "$rep" "$iops" "$mbps" "$p50" "$p99" "$p999" "$cpu_us" "$sw" "$other" \
        "$( ((noisy)) && echo ' (noisy: discarded, retrying)')")"
    return $((noisy ? 3 : 0))
}

# median WORKLOAD TARGET COLUMN (4=iops 5=mbps 6=p50 7=p99 8=p99.9
# 10=server CPU-us per I/O 11=server context switches per I/O)
median() {
    awk -F'\t' -v w="$1" -v t="$2" -v c="$3" '$1 == w && $2 == t { print $c }' "$RESULTS" |
        sort -g | awk '{ v[NR] = $1 } END {
            if (NR == 0) { print "-"; exit }
            if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'
}

print_table() {
    local kind w
    echo
    echo "Medians of $REPS runs, ${RUN_SECONDS}s each (+${WARMUP}s warm-up); latency in us."
    echo "Client CPU $CLIENT_CPU, servers CPU $SERVER_CPU; image $IMAGE_SIZE (page cache)."
    echo
    echo "| workload | backend | qsd IOPS | blkmesh IOPS | ratio | qsd MB/s | blkmesh MB/s | qsd p50 | blkmesh p50 | qsd p99 | blkmesh p99 | p99 ratio | qsd p99.9 | blkmesh p99.9 | qsd CPU-us/IO | blkmesh CPU-us/IO | qsd sw/IO | blkmesh sw/IO |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for w in $WORKLOADS; do
        for kind in file null; do
            local q=qsd-$kind b=blkmesh-$kind
            [[ " $TARGETS " == *" $q "* || " $TARGETS " == *" $b "* ]] || continue
            local qi bi qm bm q50 b50 q99 b99 q999 b999
            qi=$(median "$w" "$q" 4) bi=$(median "$w" "$b" 4)
            qm=$(median "$w" "$q" 5) bm=$(median "$w" "$b" 5)
            q50=$(median "$w" "$q" 6) b50=$(median "$w" "$b" 6)
            q99=$(median "$w" "$q" 7) b99=$(median "$w" "$b" 7)
            q999=$(median "$w" "$q" 8) b999=$(median "$w" "$b" 8)
            echo "| $w | $kind | $qi | $bi | $(ratio "$bi" "$qi") | $qm | $bm | $q50 | $b50 | $q99 | $b99 | $(ratio "$b99" "$q99") | $q999 | $b999 | $(median "$w" "$q" 10) | $(median "$w" "$b" 10) | $(median "$w" "$q" 11) | $(median "$w" "$b" 11) |"
        done
    done
    if [[ -n $BLKMESH_BIN_OLD ]]; then
        echo
        echo "This build against BLKMESH_BIN_OLD ($BLKMESH_BIN_OLD), same runs:"
        echo
        echo "| workload | backend | old IOPS | new IOPS | new/old | old p99 | new p99 | old CPU-us/IO | new CPU-us/IO | old sw/IO | new sw/IO |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for w in $WORKLOADS; do
            for kind in file null; do
                local o=blkmesh-old-$kind n=blkmesh-$kind
                [[ " $TARGETS " == *" $n "* ]] || continue
                local oi ni
                oi=$(median "$w" "$o" 4) ni=$(median "$w" "$n" 4)
                echo "| $w | $kind | $oi | $ni | $(ratio "$ni" "$oi") | $(median "$w" "$o" 7) | $(median "$w" "$n" 7) | $(median "$w" "$o" 10) | $(median "$w" "$n" 10) | $(median "$w" "$o" 11) | $(median "$w" "$n" 11) |"
            done
        done
    fi
    if [[ " $TARGETS " == *" blkmesh-raw "* ]]; then
        echo
        echo "blkmesh's qcow2 node against its raw path on the same data, same runs:"
        echo
        echo "| workload | raw IOPS | qcow2 IOPS | qcow2/raw | raw p99 | qcow2 p99 | raw CPU-us/IO | qcow2 CPU-us/IO |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|"
        for w in $WORKLOADS; do
            [[ $w == *-alloc-* ]] && continue
            local ri qc
            ri=$(median "$w" blkmesh-raw 4) qc=$(median "$w" blkmesh-file 4)
            echo "| $w | $ri | $qc | $(ratio "$qc" "$ri") | $(median "$w" blkmesh-raw 7) | $(median "$w" blkmesh-file 7) | $(median "$w" blkmesh-raw 10) | $(median "$w" blkmesh-file 10) |"
        done
    fi
    if [[ " $TARGETS " == *" iouring-file "* ]]; then
        echo
        echo "Against the ceiling: libblkio io_uring straight on the image, in the client (no server), same runs:"
        echo
        echo "| workload | io_uring IOPS | blkmesh IOPS | blkmesh/io_uring | qsd IOPS | qsd/io_uring | io_uring p99 | blkmesh p99 |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|"
        for w in $WORKLOADS; do
            local ci bi qi
            ci=$(median "$w" iouring-file 4) bi=$(median "$w" blkmesh-file 4) qi=$(median "$w" qsd-file 4)
            echo "| $w | $ci | $bi | $(ratio "$bi" "$ci") | $qi | $(ratio "$qi" "$ci") | $(median "$w" iouring-file 7) | $(median "$w" blkmesh-file 7) |"
        done
    fi
    echo
    echo "ratio = blkmesh/qsd (IOPS: higher is better; p99: lower is better)."
    echo "CPU-us/IO and sw/IO: the server's CPU time and context switches (all its processes and threads) per I/O."
    echo "Raw runs: $RESULTS (columns: workload target rep iops MB/s p50 p99 p99.9 other-CPU% CPU-us/IO sw/IO)."
    awk -F'\t' '{ if ($9 > m) m = $9 } END { printf "Highest other-CPU%% in any run: %d%% (>10%%: rerun on a quiet machine).\n", m }' "$RESULTS"
}

print_conditions() {
    echo "## Conditions"
    echo "date:      $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine:   $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo)"
    echo "kernel:    $(uname -sr)"
    echo "qsd:       $("$QSD" --version | head -1)"
    echo "blkmesh:   $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty tree)')"
    echo "client:    blkmesh-io bench (libblkio virtio-blk-vhost-user, eventfd completions), taskset -c $CLIENT_CPU"
    echo "servers:   taskset -c $SERVER_CPU (all threads/children); export num-queues=$EXPORT_QUEUES"
    echo "image:     $IMAGE_SIZE raw file pre-filled with dd and read once (page cache); qsd file: cache.direct=off,aio=io_uring"
    [[ $FORMAT == qcow2 ]] && echo "format:    qcow2 (64k clusters), fully allocated by qemu-img convert -S 0 from that file; *-alloc-* runs: a fresh thin $ALLOC_SIZE image each"
    echo "null:      qsd null-co read-zeroes=on size=$SIZE_BYTES"
    echo "runs:      REPS=$REPS, RUN_SECONDS=$RUN_SECONDS, WARMUP=$WARMUP, targets alternate within each rep;"
    echo "           each run waits up to ${QUIET_WAIT}s for the machine to be <= ${QUIET_PCT}% busy"
}

# --------------------------------------------------------------------------
# Main

command -v "$QSD" >/dev/null || die "$QSD not found"
command -v jq >/dev/null || die "jq not found"
command -v taskset >/dev/null || die "taskset not found"
CPUS=$(nproc)
((CLIENT_CPU < CPUS && SERVER_CPU < CPUS)) || die "CLIENT_CPU/SERVER_CPU beyond $CPUS CPUs"

if [[ -z ${NO_BUILD:-} ]]; then
    log "building blkmesh-io (release)…"
    (cd "$ROOT" && cargo build --release -p blkmesh-io) >&2
fi
[[ -x $CLIENT ]] || die "$CLIENT missing"

ACTIVE=()
for t in $TARGETS; do
    case $t in
        qsd-file | qsd-null | iouring-file) ACTIVE+=("$t") ;;
        blkmesh-raw)
            [[ $FORMAT == qcow2 ]] || die "blkmesh-raw needs FORMAT=qcow2"
            ACTIVE+=("$t")
            ;;
        blkmesh-file | blkmesh-null)
            # A custom start template counts as "blkmesh available".
            if [[ -x $BLKMESH_BIN || -n $BLKMESH_OVERRIDE ]]; then
                ACTIVE+=("$t")
            else
                log "skipping $t: $BLKMESH_BIN not built (and no BLKMESH_START_* override)"
            fi
            ;;
        *) die "unknown target $t" ;;
    esac
done
# The old build runs right after the new one, in every rep.
if [[ -n $BLKMESH_BIN_OLD ]]; then
    [[ -x $BLKMESH_BIN_OLD ]] || die "BLKMESH_BIN_OLD=$BLKMESH_BIN_OLD is not executable"
    [[ -z $BLKMESH_OVERRIDE ]] || die "BLKMESH_BIN_OLD and BLKMESH_START_* overrides do not mix"
    WITH_OLD=()
    for t in "${ACTIVE[@]}"; do
        WITH_OLD+=("$t")
        case $t in blkmesh-file | blkmesh-null) WITH_OLD+=("blkmesh-old-${t#blkmesh-}") ;; esac
    done
    ACTIVE=("${WITH_OLD[@]}")
fi
((${#ACTIVE[@]} > 0)) || die "no targets to run"

if [[ " ${ACTIVE[*]} " == *-file* || " ${ACTIVE[*]} " == *-raw* ]]; then
    if [[ ! -f $RAW_IMAGE || $(stat -c %s "$RAW_IMAGE") -ne $SIZE_BYTES ]]; then
        log "pre-filling $RAW_IMAGE ($IMAGE_SIZE) with dd…"
        dd if=/dev/zero of="$RAW_IMAGE" bs=1M count=$((SIZE_BYTES >> 20)) conv=fsync status=none
    fi
    cat "$RAW_IMAGE" >/dev/null # pull it into the page cache
fi
# A fully allocated qcow2 image of the same data (-S 0: zeroes are data).
make_qcow2() {
    rm -f "$IMAGE"
    qemu-img convert -q -S 0 -f raw -O qcow2 "$RAW_IMAGE" "$IMAGE"
    cat "$IMAGE" >/dev/null
    QCOW2_FULL=1
}
QCOW2_FULL=0
if [[ $FORMAT == qcow2 ]]; then make_qcow2; fi

: >"$RESULTS"
: >"$WORKDIR/noisy.tsv"
print_conditions
echo
for w in $WORKLOADS; do
    spec=
    for s in "${WORKLOAD_LIST[@]}"; do
        [[ ${s%%|*} == "$w" ]] && spec=$s
    done
    [[ -n $spec ]] || die "unknown workload $w"
    log "workload $w"
    # After an allocating workload's thin images, the full one again.
    if [[ $FORMAT == qcow2 && $w != *-alloc-* && $QCOW2_FULL == 0 ]]; then
        make_qcow2
    fi
    for ((rep = 1; rep <= REPS; rep++)); do
        for t in "${ACTIVE[@]}"; do
            [[ -f $IMAGE ]] && cat "$IMAGE" >/dev/null # keep it cached
            RETRIES_LEFT=$NOISY_RETRIES
            until run_point "$t" "$spec" "$rep"; do
                RETRIES_LEFT=$((RETRIES_LEFT - 1))
            done
        done
    done
done
print_table
