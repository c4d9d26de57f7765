#!/usr/bin/env bash
# bench/scaling.sh — multi-queue scaling next to qemu-storage-daemon.
#
# For 1, 2 and 4 queues (QD32 per queue, 4k random reads, page-cached file
# and null), runs bench/compare.sh with the export's num-queues set for
# both servers, once with all of blkmesh's queues on one worker and once
# spread over two workers (qsd is measured in both runs). Prints one table.
# Same environment knobs as compare.sh (REPS, RUN_SECONDS, CPUs...).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUEUES=${QUEUES:-"1 2 4"}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
first=1
for n in $QUEUES; do
    case $n in 1) wl=4k-randread-qd32 ;; *) wl=4k-randread-qd32-q$n ;; esac
    for layout in one-worker spread; do
        if [ "$layout" = spread ]; then
            [ "$n" -gt 1 ] || continue
            extra=(BLKMESH_WORKERS=2 BLKMESH_SPREAD=1)
        else
            extra=(BLKMESH_WORKERS=1)
        fi
        [ $first = 1 ] || export NO_BUILD=1
        first=0
        env "${extra[@]}" EXPORT_QUEUES="$n" WORKLOADS="$wl" bash "$ROOT/bench/compare.sh" >"$out"
        grep "^| $wl " "$out" | sed "s/^| $wl /| $n queue(s), blkmesh $layout /"
    done
done | {
    echo "| queues, layout | backend | qsd IOPS | blkmesh IOPS | ratio | qsd MB/s | blkmesh MB/s | qsd p50 | blkmesh p50 | qsd p99 | blkmesh p99 | p99 ratio | qsd p99.9 | blkmesh p99.9 |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    cat
}
