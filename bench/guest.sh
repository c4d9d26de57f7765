#!/usr/bin/env bash
# bench/guest.sh — what a guest sees: blkmesh against qemu-storage-daemon,
# measured inside real Linux guests (QEMU TCG, 2 vCPUs), alternately, in
# one run. Builds the release binaries, then runs blkmesh-guest-bench;
# its options pass through (see `--help`), for example:
#
#   bench/guest.sh --reps 5 --queues 1
#   bench/guest.sh --blkmesh-old /tmp/old/blkmesh     # against an older build
#
# Needs what the real-guest tests need (scripts/deps.sh installs it).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ -z ${NO_BUILD:-} ]]; then
    cargo build --release --bins -p blkmesh -p blkmesh-manager -p blkmesh-frontend \
        -p blkmesh-worker -p blkmesh-guest-bench >&2
fi
exec "$ROOT/target/release/blkmesh-guest-bench" --blkmesh "$ROOT/target/release/blkmesh" "$@"
