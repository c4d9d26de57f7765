#!/usr/bin/env bash
# The whole test suite: formatting, clippy (warnings are errors), then every
# unit and end-to-end test (the end-to-end ones start the real processes),
# then a short fuzz run of every fuzz target (fuzz/run.sh; skipped with
# BLKMESH_SKIP_FUZZ=1). One build, shared target directory, bounded
# per-test timeouts (see .config/nextest.toml).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/deps.sh

# The suite writes images under TMPDIR and builds about 4 GB into target/;
# a full disk shows up as EIO far from its cause, so say up front.
echo "== free space"
df -h "${TMPDIR:-/tmp}" "${CARGO_TARGET_DIR:-target}" 2>/dev/null || df -h .

echo "== rustfmt"
cargo fmt --all -- --check

echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

# Small rooms, no module circles, no unsafe where there is none
# (docs/ARCHITECTURE.md, "Rules of the house").
bash scripts/check-structure.sh

echo "== build"
# The end-to-end tests run the real binaries from target/debug.
cargo build --workspace --bins --locked

# The docker compose deployment test (crates/testkit/tests/deploy.rs, part
# of the nextest run below) needs a docker engine and compose; without them
# it passes with a message saying it was skipped (BLKMESH_SKIP_DEPLOY_TEST=1
# skips it on purpose). With them, build its image here (static release
# binaries in target/deploy, then FROM scratch; about 11 minutes the first
# time on 2 cores, seconds when cached) so a build failure shows as such and
# the test finds the image cached.
if [ "${BLKMESH_SKIP_DEPLOY_TEST:-0}" = 1 ]; then
    echo "== deployment test: SKIPPED (BLKMESH_SKIP_DEPLOY_TEST=1)"
elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    if docker compose version >/dev/null 2>&1 || docker-compose version >/dev/null 2>&1; then
        echo "== deployment image (docker engine and compose present; deploy/build-images.sh)"
        bash deploy/build-images.sh
    else
        echo "== docker engine present but no compose: the deployment test will be SKIPPED"
    fi
else
    echo "== docker engine absent: the deployment test will be SKIPPED"
fi

echo "== tests"
cargo nextest run --workspace --locked --profile ci --no-fail-fast

if [ "${BLKMESH_SKIP_FUZZ:-0}" = 1 ]; then
    echo "== fuzz: skipped (BLKMESH_SKIP_FUZZ=1)"
else
    echo "== fuzz"
    # 15 s per target (about a minute) plus the sanitizer build in target/fuzz.
    bash fuzz/run.sh 15
fi
