#!/usr/bin/env bash
# Installs what blkmesh needs on a fresh Debian 12 machine with a Rust
# toolchain: qemu-storage-daemon (the benchmark peer and a test target),
# qemu-system-x86, busybox-static and the Debian cloud kernel package (the
# real-guest tests), cargo-nextest (the test runner), cargo-fuzz
# (fuzz/run.sh) and cargo-modules (scripts/check-structure.sh). Idempotent;
# quiet when all is there.
set -euo pipefail

# The real-guest tests (crates/testkit/tests/real_guest.rs) boot a Debian
# cloud kernel under qemu-system-x86_64 with a busybox initramfs; see
# crates/testkit/src/guest/. QEMU comes from bookworm-backports (10.x,
# vhost-user-blk with reconnect-ms); qemu-utils must come from the same
# place, or apt pairs qemu-system with an older qemu-storage-daemon.
GUEST_CACHE="${BLKMESH_GUEST_CACHE:-/var/cache/blkmesh-guest}"
BACKPORTS=/etc/apt/sources.list.d/blkmesh-backports.sources

pkg_version() {
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true
}

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "deps: need root to $*" >&2
        exit 1
    fi
}

apt_updated=0
apt_update() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
}

# The mirror of the machine's own Debian sources (never a literal host name
# here: machines use their own mirrors or snapshots).
debian_mirror() {
    local uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
    elif [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $3 ~ /^bookworm$/ { print $2; exit }' /etc/apt/sources.list)
    fi
    if [ -z "$uri" ]; then
        echo "deps: cannot find the Debian mirror in /etc/apt/sources.list.d/debian.sources" \
            "or /etc/apt/sources.list" >&2
        exit 1
    fi
    echo "$uri"
}

add_backports() {
    [ -f "$BACKPORTS" ] && return 0
    local uri
    uri=$(debian_mirror)
    echo "deps: adding bookworm-backports ($uri) as $BACKPORTS" >&2
    cat >"$BACKPORTS" <<EOS
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
    apt_updated=0
}

export DEBIAN_FRONTEND=noninteractive

need_qemu=0
if ! command -v qemu-system-x86_64 >/dev/null 2>&1 ||
    ! command -v qemu-storage-daemon >/dev/null 2>&1 ||
    [ "$(pkg_version qemu-system-x86)" != "$(pkg_version qemu-utils)" ]; then
    need_qemu=1
fi
if [ "$need_qemu" = 1 ]; then
    need_root "install qemu-system-x86 and qemu-utils from bookworm-backports"
    add_backports
    apt_update
    echo "deps: installing qemu-system-x86 qemu-utils (bookworm-backports)" >&2
    apt-get install -y -qq --no-remove --no-install-recommends -t bookworm-backports \
        qemu-system-x86 qemu-utils >/dev/null
    sys_v=$(pkg_version qemu-system-x86)
    utils_v=$(pkg_version qemu-utils)
    if [ "$sys_v" != "$utils_v" ]; then
        echo "deps: qemu-system-x86 $sys_v and qemu-utils $utils_v differ;" \
            "qemu-storage-daemon would not match qemu-system" >&2
        exit 1
    fi
fi

need_apt=()
command -v taskset >/dev/null 2>&1 || need_apt+=(util-linux)
# Static: it runs in the guest's initramfs, which has no libc.
[ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" = "install ok installed" ] ||
    need_apt+=(busybox-static)
if [ ${#need_apt[@]} -gt 0 ]; then
    need_root "apt-get install ${need_apt[*]}"
    echo "deps: installing ${need_apt[*]}" >&2
    apt_update
    apt-get install -y -qq --no-remove --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# The guest kernel: Debian's 6.1 cloud kernel (virtio as modules, small),
# downloaded as a package into a cache outside the repository. The ABI
# (linux-image-6.1.0-NN-cloud-amd64) follows bookworm/bookworm-security,
# not the 6.12 of backports.
kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    grep -o 'linux-image-6\.1\.0-[0-9]*-cloud-amd64' | head -n 1 || true)
if [ -z "$kernel_pkg" ]; then
    echo "deps: cannot resolve the 6.1 cloud kernel from" \
        "'apt-cache depends linux-image-cloud-amd64' (apt-get update?)" >&2
    exit 1
fi
if ! compgen -G "$GUEST_CACHE/${kernel_pkg}_*.deb" >/dev/null; then
    mkdir -p "$GUEST_CACHE" 2>/dev/null || need_root "create $GUEST_CACHE"
    echo "deps: downloading $kernel_pkg into $GUEST_CACHE" >&2
    # apt-get download drops its privileges to _apt where it can: give it
    # a directory of its own, then move the package into the cache.
    tmp=$(mktemp -d)
    chmod 755 "$tmp"
    if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then
        chown _apt "$tmp"
    fi
    (cd "$tmp" && apt-get download -qq "$kernel_pkg")
    mv "$tmp"/"${kernel_pkg}"_*.deb "$GUEST_CACHE"/
    rmdir "$tmp"
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
# cargo-modules (scripts/check-structure.sh: the modules' use edges). 0.27 is
# the last release that builds with Rust 1.95.
if ! cargo modules --version >/dev/null 2>&1; then
    echo "deps: installing cargo-modules" >&2
    cargo install --locked cargo-modules --version 0.27.0
fi
for c in clippy rustfmt; do
    if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$c"
    fi
done
