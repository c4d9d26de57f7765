#!/usr/bin/env bash
# Builds blkmesh (release) and starts the whole system: manager, two workers
# and the frontend, with a sparse 1 GiB image exported as a vhost-user-blk
# socket. Prints how to connect. Ctrl-C stops everything.
# Extra arguments go to `blkmesh up` (see `blkmesh up --help`).
#
# State, logs, sockets and the image live in ./run. As root, the workers
# run as their own user (uid 64055, see `blkmesh up --help`), which must
# reach the image: a checkout under root's home (mode 0700) would hide it.
# So as root ./run is a link to /var/lib/blkmesh/up unless it already
# exists.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/deps.sh
cargo build --release --bins
if [ "$(id -u)" -eq 0 ] && [ ! -e run ] && [ ! -L run ]; then
    mkdir -p /var/lib/blkmesh/up
    ln -s /var/lib/blkmesh/up run
    echo "up: ./run -> /var/lib/blkmesh/up (where the workers' user can reach the image)" >&2
fi
exec target/release/blkmesh up --dir ./run "$@"
