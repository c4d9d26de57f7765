#!/usr/bin/env bash
# bench/migration.sh — live migration's switch-over, blkmesh vs
# qemu-storage-daemon, inside a real guest (docs/RELIABILITY.md).
#
# The same guest (QEMU TCG, 256 MiB, the write-and-verify loop of
# blkmesh-guest-check on two queues) migrates between QEMUs on this
# machine, MIGRATIONS times (5 by default) with its disk on
# qemu-storage-daemon's vhost-user-blk export, then as often on
# blkmesh's; ROUNDS=n (1) repeats that pair of legs n times, alternating,
# since the machine drifts. Prints, per server over all legs, QEMU's
# downtime (p50, p90, max, and each leg's p50), the guest loop's longest
# request and its requests of 50 ms or more; for blkmesh also how long
# each queue took to stop (its own share of the downtime) and what each
# dirty log marked.
# Needs scripts/deps.sh (QEMU, the guest kernel). blkmesh runs from
# release binaries (PROFILE=debug for the ones the tests use).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then
    cargo build --release --workspace --bins
else
    cargo build --workspace --bins
fi
export BLKMESH_BIN_DIR="$ROOT/target/$PROFILE"
exec cargo nextest run -p blkmesh-testkit --test real_guest_migration \
    --run-ignored only --no-capture downtime_against_qemu_storage_daemon
