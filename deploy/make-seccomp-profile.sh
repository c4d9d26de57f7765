#!/usr/bin/env bash
# Makes deploy/seccomp-io_uring.json: docker's default seccomp profile plus
# io_uring_setup, io_uring_enter and io_uring_register, for the worker
# containers (libblkio's io_uring driver). Everything else stays as docker
# has it; the result is not `unconfined`.
#
#   bash deploy/make-seccomp-profile.sh [DEFAULT_JSON [OUT_JSON]]
#
# DEFAULT_JSON defaults to deploy/seccomp-docker-default.json, a verbatim
# copy of docker's default profile:
#   https://github.com/moby/profiles/blob/cd3bed8061c7b7378b61fc6827c7885779417a75/seccomp/default.json
#   (moby/profiles, last changed in 3c28324314729dbade8287e868eef6338c42807a;
#   the profile moby/moby vendors; Copyright Docker, Inc. and the Moby
#   authors, Apache License 2.0: https://www.apache.org/licenses/LICENSE-2.0)
# To follow a newer docker, replace that file with its new default.json
# and run this script again; the output is deterministic.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=${1:-$HERE/seccomp-docker-default.json}
OUT=${2:-$HERE/seccomp-io_uring.json}

python3 - "$SRC" "$OUT" <<'EOF'
import json
import sys

src, out = sys.argv[1], sys.argv[2]
IO_URING = ["io_uring_setup", "io_uring_enter", "io_uring_register"]

with open(src) as f:
    profile = json.load(f)

if profile.get("defaultAction") not in ("SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS"):
    sys.exit(f"{src}: defaultAction {profile.get('defaultAction')!r}: not an allow-list profile")

rules = profile["syscalls"]
# Older defaults (docker 20.10 to 24) allowed io_uring in their main list:
# take the names out wherever they are, then add one unconditional rule.
for rule in rules:
    rule["names"] = [n for n in rule["names"] if n not in IO_URING]
rules[:] = [r for r in rules if r["names"]]
rules.append({
    "names": IO_URING,
    "action": "SCMP_ACT_ALLOW",
    "comment": "blkmesh: io_uring for blkmesh-worker (libblkio io_uring driver); "
               "added by deploy/make-seccomp-profile.sh",
})

with open(out, "w") as f:
    json.dump(profile, f, indent="\t")
    f.write("\n")
print(f"wrote {out}: {len(rules)} rules, +{', '.join(IO_URING)}")
EOF
