#!/usr/bin/env bash
# Installs the Debian packages that building the guest image and running the
# tests need, on Debian 12. Does nothing (and says so) when all are present.
set -euo pipefail

# command -> package that provides it
declare -A NEED=(
    [qemu-system-x86_64]=qemu-system-x86
    [qemu-img]=qemu-utils
    [debootstrap]=debootstrap
    [mkfs.ext4]=e2fsprogs
    [cpio]=cpio
    [depmod]=kmod
    [xz]=xz-utils
    [zstd]=zstd
    [lz4]=lz4
    [ip]=iproute2
    [nft]=nftables
    [curl]=curl
    [pkill]=procps
    [useradd]=passwd
    [gzip]=gzip
    [cc]=gcc
    [as]=binutils
    [ld]=binutils
)

missing=()
for cmd in "${!NEED[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
# Static wrenn-init links against glibc's static archive.
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
# The userfaultfd crate generates its kernel bindings with bindgen, which
# needs libclang and the kernel's uapi headers.
compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null || missing+=(libclang-dev)
[ -f /usr/include/linux/userfaultfd.h ] || missing+=(linux-libc-dev)

if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo is missing: install the Rust toolchain (rustup) first" >&2
    exit 1
fi
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all build and test dependencies are present"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
fi
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "install-deps: installing ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${packages[@]}"
