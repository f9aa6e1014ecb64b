#!/usr/bin/env bash
# Installs the Debian packages that building Wrenn, its guest image and its
# tests need (Debian 12), then checks that every command and file those
# packages promise is really there. The check runs every time, even when
# nothing had to be installed, so `make run` and `make test` stop at once,
# naming what is missing, instead of failing later.
#
# Usage:
#   scripts/install-deps.sh           install what is missing (as root), then check
#   scripts/install-deps.sh --check   only check; exit 1 naming each missing command or file
#   scripts/install-deps.sh --list    print each checked command and its package
#
# QEMU's packages must come from one Debian suite at one version: the
# bookworm-backports qemu-utils that some machines ship breaks bookworm's
# qemu-system-common, so installing qemu-system-x86 alone makes apt remove
# qemu-img. Both are installed together, pinned to the same version, and
# apt is never allowed to remove a package (docs/decisions.md, "QEMU packages").
set -euo pipefail

# "command package": each command and the Debian package that provides it.
COMMANDS=(
    "qemu-system-x86_64 qemu-system-x86"
    "qemu-img qemu-utils"
    "debootstrap debootstrap"
    "mkfs.ext4 e2fsprogs"
    "cpio cpio"
    "depmod kmod"
    "xz xz-utils"
    "zstd zstd"
    "lz4 lz4"
    "ip iproute2"
    "nft nftables"
    "nsenter util-linux"
    "curl curl"
    "pkill procps"
    "useradd passwd"
    "gzip gzip"
    "sha256sum coreutils"
    "dpkg-deb dpkg"
    "apt-get apt"
    "python3 python3"
    "cc gcc"
    "as binutils"
    "ld binutils"
)
# "glob package": files the build needs. Static wrenn-init links against
# glibc's static archive; the userfaultfd crate generates its kernel bindings
# with bindgen, which needs libclang and the kernel's uapi headers. The SDK
# tests make a Python virtual environment (scripts/sdk-venv.sh).
FILES=(
    "/usr/lib/x86_64-linux-gnu/libc.a libc6-dev"
    "/usr/lib/llvm-*/lib/libclang.so* libclang-dev"
    "/usr/include/linux/userfaultfd.h linux-libc-dev"
    "/usr/lib/python3*/ensurepip/__init__.py python3-venv"
)
# Installed together, at one version (see the header).
QEMU_PACKAGES=(qemu-system-x86 qemu-utils)

say() { echo "install-deps: $*"; }
fail() { echo "install-deps: $*" >&2; exit 1; }

# The one message for a missing command; wrenn-agent says the same words.
missing_command() { echo "\`$1\` is not on PATH: the Debian package $2 provides it"; }
missing_file() { echo "no file matches $1: the Debian package $2 provides it"; }

# Prints one line per missing thing: "package<TAB>message". Builtins only,
# so that it works with any PATH.
find_missing() {
    local entry name package
    for entry in "${COMMANDS[@]}"; do
        read -r name package <<<"$entry"
        command -v "$name" >/dev/null 2>&1 \
            || printf '%s\t%s\n' "$package" "$(missing_command "$name" "$package")"
    done
    for entry in "${FILES[@]}"; do
        read -r name package <<<"$entry"
        # shellcheck disable=SC2086 # the glob must expand
        compgen -G "$name" >/dev/null || printf '%s\t%s\n' "$package" "$(missing_file "$name" "$package")"
    done
}

# Exits 1 naming every missing thing, with $1 saying what to do about it.
check() {
    local remedy=$1 lines line
    lines=$(find_missing)
    if [ -n "$lines" ]; then
        while IFS=$'\t' read -r _ line; do
            echo "install-deps: $line" >&2
        done <<<"$lines"
        fail "$remedy"
    fi
    command -v cargo >/dev/null 2>&1 \
        || fail "\`cargo\` is not on PATH: install the Rust toolchain (rustup), then run this again"
}

# Runs each QEMU program: a package can be installed and still not run
# (a library missing or of the wrong version).
check_qemu_runs() {
    local program out
    for program in qemu-system-x86_64 qemu-img; do
        out=$("$program" --version 2>&1) \
            || fail "\`$program --version\` failed: $out (reinstall ${QEMU_PACKAGES[*]} together: run this script as root)"
    done
}

# The version to install both QEMU packages at: the one of an installed QEMU
# package if apt can give the other at that version too (no downgrade),
# else the candidate of qemu-system-x86.
qemu_version() {
    local package installed
    for package in "${QEMU_PACKAGES[@]}"; do
        installed=$(dpkg-query -W -f='${db:Status-Abbrev} ${Version}' "$package" 2>/dev/null \
            | awk '$1 == "ii" { print $2 }')
        [ -n "$installed" ] || continue
        if all_available "$installed"; then
            echo "$installed"
            return
        fi
    done
    apt-cache policy "${QEMU_PACKAGES[0]}" | awk '/Candidate:/ { print $2 }'
}

all_available() {
    local package
    for package in "${QEMU_PACKAGES[@]}"; do
        apt-cache madison "$package" | awk -F' *[|] *' -v v="$1" '$2 == v { found = 1 } END { exit !found }' \
            || return 1
    done
}

case "${1:-}" in
    --list)
        for entry in "${COMMANDS[@]}"; do echo "$entry"; done
        exit 0
        ;;
    --check)
        check "run scripts/install-deps.sh (make deps) as root to install them"
        check_qemu_runs
        say "every command and file is present"
        exit 0
        ;;
    "") ;;
    *) fail "unknown argument '$1' (use --check, --list or nothing)" ;;
esac

missing=$(find_missing | cut -f1 | sort -u)
if [ -n "$missing" ]; then
    [ "$(id -u)" = 0 ] || fail "need root to install: $(echo $missing)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || fail "apt-get update failed: check the network and apt's sources"
    packages=()
    qemu=false
    for package in $missing; do
        case " ${QEMU_PACKAGES[*]} " in
            *" $package "*) qemu=true ;;
            *) packages+=("$package") ;;
        esac
    done
    if $qemu; then
        version=$(qemu_version)
        [ -n "$version" ] || fail "apt has no ${QEMU_PACKAGES[0]}: is bookworm main in apt's sources?"
        for package in "${QEMU_PACKAGES[@]}"; do packages+=("$package=$version"); done
        say "QEMU: ${QEMU_PACKAGES[*]} together at $version"
    fi
    say "installing ${packages[*]}"
    # --no-remove: apt stops rather than remove a package to make room
    # (it once removed qemu-utils to install qemu-system-x86).
    # --allow-downgrades: the QEMU pair may have to come down to the version
    # the suite has, e.g. a backported qemu-utils to bookworm's.
    apt-get install -y -q --no-install-recommends --no-remove --allow-downgrades "${packages[@]}" \
        || fail "apt-get install ${packages[*]} failed (see above)"
    lines=$(find_missing)
    if [ -n "$lines" ]; then
        while IFS=$'\t' read -r package line; do
            echo "install-deps: after apt-get install: $line, but it did not: check 'apt-cache policy $package'" >&2
        done <<<"$lines"
        exit 1
    fi
fi
check "run scripts/install-deps.sh (make deps) as root to install them"
check_qemu_runs
versions=$(dpkg-query -W -f='${Version} ' "${QEMU_PACKAGES[@]}" 2>/dev/null || true)
read -r a b _ <<<"$versions"
if [ -n "${b:-}" ] && [ "$a" != "$b" ]; then
    say "warning: ${QEMU_PACKAGES[0]} is $a but ${QEMU_PACKAGES[1]} is $b: run 'apt-get install ${QEMU_PACKAGES[0]}=$a ${QEMU_PACKAGES[1]}=$a'"
fi
say "every command and file is present (QEMU ${a:-not from a Debian package})"
