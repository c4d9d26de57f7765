#!/usr/bin/env bash
# Builds the blkmesh container image offline, from this workspace only:
#
#   bash deploy/build-images.sh
#
# 1. static release binaries (glibc, crt-static) of the daemons and tools,
#    in their own target directory (target/deploy) so the debug build in
#    target/debug is left alone;
# 2. a check that each of them really is static (no ELF interpreter, no
#    NEEDED library);
# 3. `docker build` of deploy/Dockerfile (FROM scratch: nothing is pulled),
#    tagged blkmesh/blkmesh:$BLKMESH_IMAGE_TAG (default dev);
# 4. a smoke run of every binary in the image (`--version`) with no network.
#
# Environment:
#   BLKMESH_IMAGE             image name (default blkmesh/blkmesh:${BLKMESH_IMAGE_TAG:-dev})
#   BLKMESH_DEPLOY_TARGET_DIR cargo target dir (default <workspace>/target/deploy)
#   BLKMESH_DEPLOY_JOBS       cargo -j (default: cargo's)
#
# Cargo and docker reuse what they have: a second run with no source change
# takes seconds.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TARGET=x86_64-unknown-linux-gnu
TARGET_DIR=${BLKMESH_DEPLOY_TARGET_DIR:-$ROOT/target/deploy}
IMAGE=${BLKMESH_IMAGE:-blkmesh/blkmesh:${BLKMESH_IMAGE_TAG:-dev}}
PACKAGES=(blkmesh-manager blkmesh-worker blkmesh-frontend blkmeshctl blkmesh-io blkmesh-health)
BINS=(blkmesh-manager blkmesh-worker blkmesh-frontend blkmeshctl blkmesh-io blkmesh-health blkmesh-pause)

start=$(date +%s)
stamp() { echo "   ($(($(date +%s) - start)) s)"; }

for tool in cargo docker readelf; do
    command -v "$tool" >/dev/null || { echo "build-images: $tool not found" >&2; exit 1; }
done

# Run from a test (cargo test, nextest), the environment holds what cargo
# sets for the test's own crate (CARGO_PKG_NAME, CARGO_MANIFEST_DIR,
# OUT_DIR...). Some build scripts (ring's) ask to rerun when those change,
# which would rebuild half the tree each time the script is called from
# somewhere else: drop them.
while IFS= read -r var; do
    unset "$var"
done < <(compgen -e | grep -E '^(CARGO_(PKG_|MANIFEST_|CRATE_NAME|BIN_NAME|BIN_EXE_|PRIMARY_PACKAGE|TARGET_TMPDIR|CFG_|FEATURE_|ENCODED_RUSTFLAGS|RUSTC_CURRENT_DIR)|OUT_DIR$|RUSTFLAGS$)' || true)

echo "== static release binaries -> $TARGET_DIR/$TARGET/release"
pkg_args=()
for p in "${PACKAGES[@]}"; do pkg_args+=(-p "$p"); done
jobs=()
[ -n "${BLKMESH_DEPLOY_JOBS:-}" ] && jobs=(-j "$BLKMESH_DEPLOY_JOBS")
# --target makes RUSTFLAGS apply to the binaries only, not to build scripts
# and proc macros (which must stay dynamic to be loaded by rustc). No debug
# info (the workspace's release profile has some): smaller images, faster
# builds; symbols stay, so backtraces keep function names.
RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    cargo build --release --locked --target "$TARGET" --target-dir "$TARGET_DIR" \
    "${jobs[@]}" "${pkg_args[@]}" --bins
stamp

OUT=$TARGET_DIR/$TARGET/release
CONTEXT=$TARGET_DIR/image-context
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT/bin"

echo "== checking that the binaries are static"
for b in "${BINS[@]}"; do
    f=$OUT/$b
    [ -x "$f" ] || { echo "build-images: $f missing" >&2; exit 1; }
    # A static(-pie) executable has no PT_INTERP and no DT_NEEDED.
    if readelf -lW "$f" | grep -q 'Requesting program interpreter' \
        || readelf -dW "$f" | grep -q '(NEEDED)'; then
        echo "build-images: $b is dynamically linked:" >&2
        readelf -dW "$f" | grep '(NEEDED)' >&2 || true
        exit 1
    fi
    cp "$f" "$CONTEXT/bin/"
    printf '   %-18s static, %s\n' "$b" "$(du -h "$f" | cut -f1)"
done
cp "$ROOT/deploy/Dockerfile" "$CONTEXT/Dockerfile"
# A user database, so that --user/--socket-owner/--socket-group can name
# users (static glibc reads /etc/passwd and /etc/group itself; no NSS module
# can be loaded, so names resolve from these files only).
mkdir -p "$CONTEXT/etc"
cat >"$CONTEXT/etc/passwd" <<'PASSWD'
root:x:0:0:root:/:/nonexistent
blkmesh:x:900:900:blkmesh:/nonexistent:/nonexistent
nobody:x:65534:65534:nobody:/nonexistent:/nonexistent
PASSWD
cat >"$CONTEXT/etc/group" <<'GROUP'
root:x:0:
blkmesh:x:900:
nogroup:x:65534:
GROUP

echo "== docker build $IMAGE (FROM scratch)"
# The legacy builder needs no buildx plugin; it prints a deprecation note.
docker build --quiet --tag "$IMAGE" \
    --label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    "$CONTEXT" 2> >(grep -v -e 'DEPRECATED: The legacy builder' -e 'Install the buildx' \
        -e 'https://docs.docker.com/go/buildx' -e '^ *$' >&2)
# The image this tag named before, if any, is now dangling: drop it (only
# blkmesh images, and only untagged ones).
docker image prune --force --filter "label=org.opencontainers.image.title=blkmesh" >/dev/null
stamp

echo "== smoke test: every binary runs in the empty image (no network)"
for b in "${BINS[@]}"; do
    [ "$b" = blkmesh-pause ] && continue # takes no arguments; runs until signalled
    docker run --rm --network none --entrypoint "/usr/local/bin/$b" "$IMAGE" --version >/dev/null \
        || { echo "build-images: $b does not run in $IMAGE" >&2; exit 1; }
done
echo "== built $IMAGE in $(($(date +%s) - start)) s"
docker image ls --format '   {{.Repository}}:{{.Tag}} {{.Size}}' "$IMAGE"
