#!/usr/bin/env bash
# Builds blkmesh (release) and starts the whole system: manager, two workers
# and the frontend, with a sparse 1 GiB image exported as a vhost-user-blk
# socket. Prints how to connect. Ctrl-C stops everything.
# Extra arguments go to `blkmesh up` (see `blkmesh up --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/deps.sh
cargo build --release --bins
exec target/release/blkmesh up --dir ./run "$@"
