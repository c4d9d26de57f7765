#!/usr/bin/env bash
# The whole test suite: formatting, clippy (warnings are errors), then every
# unit and end-to-end test (the end-to-end ones start the real processes).
# One build, shared target directory, bounded per-test timeouts (see
# .config/nextest.toml).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/deps.sh

echo "== rustfmt"
cargo fmt --all -- --check

echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== build"
# The end-to-end tests run the real binaries from target/debug.
cargo build --workspace --bins --locked

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    echo "== docker engine present (no deployment tests yet)"
else
    echo "== docker engine absent: deployment tests would be skipped"
fi

echo "== tests"
cargo nextest run --workspace --locked --profile ci --no-fail-fast
