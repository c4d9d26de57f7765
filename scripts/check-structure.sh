#!/usr/bin/env bash
# Checks that keep the code in small rooms (docs/ARCHITECTURE.md, "Rules of
# the house"):
#   - no source file with more than 800 lines before its tests (a
#     `#[cfg(test)]` at the start of a line; files under tests/ and
#     `tests.rs` modules are tests);
#   - no import cycle between the modules of any crate
#     (`cargo modules dependencies --acyclic`);
#   - `#![forbid(unsafe_code)]` in every crate root of a package whose
#     sources hold no `unsafe`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MAX_LINES=800
fail=0

echo "== structure: files over $MAX_LINES lines before their tests"
while read -r f; do
    n=$(awk '/^#\[cfg\(test\)\]/ { exit } { n++ } END { print n + 0 }' "$f")
    if [ "$n" -gt "$MAX_LINES" ]; then
        echo "  $f: $n lines (split it into rooms of one job each)"
        fail=1
    fi
done < <(git ls-files '*.rs' | grep -v -e '/tests/' -e '^tests/' -e '/tests\.rs$' -e '/benches/')

echo "== structure: crates without unsafe code forbid it"
while read -r toml; do
    dir=$(dirname "$toml")
    [ -d "$dir/src" ] || continue
    if grep -rqE '(^|[^_[:alnum:]])unsafe[[:space:]]*(\{|fn|impl|extern)' "$dir/src"; then
        continue
    fi
    for root in "$dir/src/lib.rs" "$dir/src/main.rs"; do
        if [ -f "$root" ] && ! grep -q '^#!\[forbid(unsafe_code)\]' "$root"; then
            echo "  $root: no unsafe in $dir, so add #![forbid(unsafe_code)]"
            fail=1
        fi
    done
done < <(git ls-files '*Cargo.toml' | grep -v -e '^Cargo.toml$' -e '^fuzz/')

echo "== structure: no import cycles between modules"
# Every package's library and binaries (cargo-modules reads the code with
# rust-analyzer; no build needed).
while read -r pkg kind name; do
    target=(--lib)
    [ "$kind" = bin ] && target=(--bin "$name")
    out=$(cargo modules dependencies --package "$pkg" "${target[@]}" --acyclic \
        --no-externs --no-sysroot --no-fns --no-traits --no-types 2>&1) || {
        echo "  $pkg ($kind $name):"
        echo "$out" | grep -v '^\s*$' | sed 's/^/    /' | head -40
        fail=1
    }
done < <(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        kind = t["kind"][0]
        if kind in ("lib", "bin"):
            print(p["name"], kind, t["name"])
')

if [ "$fail" != 0 ]; then
    echo "structure: FAILED (see above)"
    exit 1
fi
echo "structure: ok"
