#!/usr/bin/env bash
# Installs what blkmesh needs on a fresh Debian 12 machine with a Rust
# toolchain: qemu-storage-daemon (the benchmark peer and a test target),
# cargo-nextest (the test runner) and cargo-fuzz (fuzz/run.sh). Idempotent;
# quiet when all is there.
set -euo pipefail

need_apt=()
command -v qemu-storage-daemon >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v taskset >/dev/null 2>&1 || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "deps: need root to apt-get install ${need_apt[*]}" >&2
        exit 1
    fi
    echo "deps: installing ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-remove "${need_apt[@]}" >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "deps: installing cargo-nextest" >&2
    cargo install --locked cargo-nextest
fi
# cargo-fuzz (fuzz/run.sh); libFuzzer itself is built by the libfuzzer-sys crate.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "deps: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi
for c in clippy rustfmt; do
    if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$c"
    fi
done
