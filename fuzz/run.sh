#!/usr/bin/env bash
# Builds the fuzz targets and runs each one for SECONDS_PER_TARGET seconds
# (default 20). Corpora live in fuzz/corpus/<target> (the committed seeds are
# the seed-* files; what libFuzzer adds there is ignored by git), crashes in
# fuzz/artifacts/<target>. Exits non-zero if any target crashed.
#
#   bash fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# cargo-fuzz passes -Z flags (sanitizer, coverage) to rustc; RUSTC_BOOTSTRAP=1
# lets the stable toolchain accept them. The build goes to target/fuzz.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

secs=${1:-20}
shift || true
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=(descriptor_chain ring_entry control_message mem_table image_open)
fi

export RUSTC_BOOTSTRAP=1
common=(--fuzz-dir fuzz --target-dir target/fuzz)

echo "== fuzz: build"
# cargo fuzz build takes one target or none (= all).
if [ ${#targets[@]} -eq 1 ]; then
    cargo fuzz build "${common[@]}" "${targets[0]}"
else
    cargo fuzz build "${common[@]}"
fi

failed=()
for t in "${targets[@]}"; do
    echo "== fuzz: $t for ${secs}s"
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    max_len=4096
    [ "$t" = control_message ] && max_len=16384
    # Whole qcow2 images (the seeds are 1.5-12 KiB).
    [ "$t" = image_open ] && max_len=16384
    log=$(mktemp)
    if cargo fuzz run "${common[@]}" "$t" -- \
        -max_total_time="$secs" -max_len="$max_len" -timeout=10 \
        -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1; then
        grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added)|^#[0-9]+ *DONE' "$log" || true
    else
        failed+=("$t")
        tail -n 60 "$log"
        echo "== fuzz: $t crashed; reproduce with:"
        echo "   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz --target-dir target/fuzz $t fuzz/artifacts/$t/<crash-file>"
    fi
    rm -f "$log"
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "== fuzz: crashes in ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
echo "== fuzz: no crash in ${targets[*]}"
