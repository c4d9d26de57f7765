#!/usr/bin/env bash
# bench/migration.sh — live migration's switch-over, blkmesh vs
# qemu-storage-daemon, inside a real guest (docs/RELIABILITY.md).
#
# The same guest (QEMU TCG, 256 MiB, the write-and-verify loop of
# blkmesh-guest-check on two queues) migrates five times between QEMUs on
# this machine (MIGRATIONS of them, 5 by default), once with its disk on
# qemu-storage-daemon's vhost-user-blk export and once on blkmesh's. Prints, per server, QEMU's downtime of each
# migration (sorted, p50, max) and the guest loop's longest request and
# requests of 50 ms or more: what the switch-over cost the guest's I/O.
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
