#!/usr/bin/env bash
# Checks that keep the code in small rooms (docs/ARCHITECTURE.md, "Rules of
# the house"):
#   - no source file with more than 800 lines before its tests (a
#     `#[cfg(test)]` at the start of a line; files under tests/ and
#     `tests.rs` modules are tests);
#   - no import cycle between the modules of any crate (from the `use`
#     edges `cargo modules dependencies` prints);
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
# Every package's library and binaries. cargo-modules reads the code with
# rust-analyzer (no build) and prints the modules' `use` edges; its own
# `--acyclic` also counts items (a type and its methods), so the cycles
# between modules are found here.
cycles() {
    python3 -c '
import re, sys
edges = {}
for line in sys.stdin:
    m = re.match(r"\s*\"([^\"]+)\" -> \"([^\"]+)\" \[label=\"uses\"", line)
    if m and m.group(1) != m.group(2):
        edges.setdefault(m.group(1), set()).add(m.group(2))
# Tarjan: every strongly connected part of more than one module is a circle.
index, low, stack, on, found, n = {}, {}, [], set(), [], [0]
def visit(v):
    index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        part = []
        while True:
            w = stack.pop(); on.discard(w); part.append(w)
            if w == v: break
        if len(part) > 1: found.append(sorted(part))
sys.setrecursionlimit(10000)
for v in list(edges):
    if v not in index: visit(v)
for part in found: print("    circle: " + " <-> ".join(part))
sys.exit(1 if found else 0)
'
}
if ! cargo modules --version >/dev/null 2>&1; then
    echo "  cargo-modules is missing: bash scripts/deps.sh installs it"
    fail=1
else
    while read -r pkg kind name; do
        target=(--lib)
        [ "$kind" = bin ] && target=(--bin "$name")
        if ! cargo modules dependencies --package "$pkg" "${target[@]}" \
            --no-externs --no-sysroot --no-fns --no-traits --no-types 2>/dev/null |
            cycles; then
            echo "  in $pkg ($kind $name)"
            fail=1
        fi
    done < <(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        kind = t["kind"][0]
        if kind in ("lib", "bin"):
            print(p["name"], kind, t["name"])
')
fi

if [ "$fail" != 0 ]; then
    echo "structure: FAILED (see above)"
    exit 1
fi
echo "structure: ok"
