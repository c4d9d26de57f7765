#!/usr/bin/env bash
# What failures cost a real guest: runs the real-guest fault scenarios
# (crates/testkit/tests/real_guest.rs) N times (default 3) and prints, per
# scenario, the faults injected, the guest's I/O errors (a failed run
# stops here), and the stalls the guest saw: its reads and writes that took
# 50 ms or more, with their p50 / p99 / max. Figures go to
# docs/RELIABILITY.md with the machine's conditions.
#
#   bash bench/guest-faults.sh [N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs="${1:-3}"
cargo build --workspace --bins --quiet
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for i in $(seq 1 "$runs"); do
    echo "== run $i of $runs" >&2
    cargo nextest run -p blkmesh-testkit --test real_guest --success-output final \
        -E 'test(/rides_out|keep_dying|reboots/)' >"$out/run-$i.log" 2>&1 || {
        cat "$out/run-$i.log" >&2
        echo "run $i failed: see above" >&2
        exit 1
    }
done
python3 - "$out"/run-*.log <<'PY'
import re, sys
from collections import defaultdict

# Faults each scenario injects (fixed by the test), or parsed from its output.
FIXED = {
    "rides_out_killed_workers": "2 worker kills",
    "rides_out_frontend_restarts": "3 frontend kills (QEMU reconnects)",
    "rides_out_a_hung_worker": "1 worker SIGSTOP (fenced after 1.5 s)",
    "rides_out_manager_restarts": "2 manager kills",
    "reboots_while_workers_die": "1 guest reset, 2 worker kills",
}
stalls = defaultdict(list)
kills = defaultdict(int)
runs = defaultdict(int)
current = None
for path in sys.argv[1:]:
    for line in open(path, errors="replace"):
        # A test's captured output starts with this line (once per run).
        m = re.search(r"^\s*test a_real_guest_(\S+) \.\.\. ok", line)
        if m:
            current = m.group(1)
            runs[current] += 1
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) worker kills", line)
        if m:
            kills[current] += int(m.group(1))
        m = re.search(r"stalls_ms \[([0-9, ]*)\]", line)
        if m and m.group(1).strip():
            stalls[current] += [int(x) for x in m.group(1).split(",")]

def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, round((len(v) - 1) * q))]

print("| scenario | runs | faults per run | guest I/O errors | stalls >= 50 ms | p50 | p99 | max |")
print("|---|---|---|---|---|---|---|---|")
for name in sorted(runs):
    if name not in FIXED and name not in kills:
        continue
    n = runs[name]
    faults = FIXED.get(name) or f"{kills[name] / n:.0f} worker kills (from QEMU start)"
    s = stalls[name]
    if s:
        row = f"{len(s)} | {pct(s, .5)} ms | {pct(s, .99)} ms | {max(s)} ms"
    else:
        row = "0 | - | - | -"
    print(f"| {name} | {n} | {faults} | 0 | {row} |")
PY
