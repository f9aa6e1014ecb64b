#!/usr/bin/env bash
# Builds the `base` guest image of a Wrenn sandbox from Debian packages:
#
#   vmlinuz            the Debian bookworm cloud kernel
#   vmlinux            the same kernel as an ELF file, decompressed (what wrenn-vmm boots)
#   initramfs.cpio.gz  wrenn-init as /init plus the kernel modules it loads
#   rootfs.ext4        debootstrap bookworm minbase + python3, pip, git, curl, envd, wrenn-init
#   manifest.json      versions, sizes and sha256 of the files above
#
# or, with --template code-runner-beta, a template built on top of it (see
# docs/image.md): the base kernel and initramfs (hard links), and the base
# rootfs plus a Jupyter Server venv in /opt/wrenn/jupyter (pins in
# image/code-runner/) that wrenn-init starts at boot. Build base first.
#
# Usage: image/build-guest.sh --envd PATH --init PATH [--template NAME]
#                             [--out DIR] [--base DIR] [--cache DIR]
#
# Environment (flags win):
#   WRENN_IMAGE_DIR      base image folder         [/var/lib/wrenn/images/base]
#                        (a template goes to its sibling folder NAME)
#   WRENN_IMAGE_CACHE    downloads and debootstrap [/var/lib/wrenn/cache/image]
#   WRENN_DEBIAN_MIRROR  Debian mirror URL         [the bookworm URI from apt's sources]
#   WRENN_ROOTFS_SIZE    size of rootfs.ext4       [2G]; the file is sparse
#
# Idempotent: every output is stamped with a hash of its inputs; when nothing
# changed the script says so and touches nothing. Outputs are written under a
# temporary name, fsynced and renamed, so an interrupted run leaves the old
# image intact.
set -euo pipefail

SUITE=bookworm
KERNEL_META=linux-image-cloud-amd64
# Modules the initramfs carries; their dependencies come along from modules.dep.
INITRAMFS_MODULES=(virtio_mmio virtio_blk virtio_net)
ROOTFS_PACKAGES=python3,python3-pip,ca-certificates,curl,git,procps,iproute2
# Bump when this script changes what it produces for the same inputs.
RECIPE_VERSION=1
# Templates built on top of base, and the folder of image/ holding their inputs.
declare -A TEMPLATE_INPUTS=([code-runner-beta]=code-runner)
here=$(cd "$(dirname "$0")" && pwd)

out=${WRENN_IMAGE_DIR:-/var/lib/wrenn/images/base}
cache=${WRENN_IMAGE_CACHE:-/var/lib/wrenn/cache/image}
rootfs_size=${WRENN_ROOTFS_SIZE:-2G}
envd_bin=""
init_bin=""
template=base
out_flag=""
base_dir=""

usage() {
    sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --envd) envd_bin=$2; shift 2 ;;
        --init) init_bin=$2; shift 2 ;;
        --out) out_flag=$2; shift 2 ;;
        --template) template=$2; shift 2 ;;
        --base) base_dir=$2; shift 2 ;;
        --cache) cache=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "build-guest: unknown argument '$1'" >&2; usage ;;
    esac
done

die() { echo "build-guest: error: $*" >&2; exit 1; }

# base: --out or WRENN_IMAGE_DIR. A template: --out, or the sibling of the
# base folder (--base or WRENN_IMAGE_DIR) named after it.
if [ "$template" = base ]; then
    out=${out_flag:-$out}
else
    [ -n "${TEMPLATE_INPUTS[$template]:-}" ] \
        || die "unknown template '$template' (known: base ${!TEMPLATE_INPUTS[*]})"
    base_dir=${base_dir:-$out}
    out=${out_flag:-$(dirname "$base_dir")/$template}
fi

[ -n "$envd_bin" ] && [ -x "$envd_bin" ] || die "--envd must name the built envd binary (run 'make build')"
[ -n "$init_bin" ] && [ -x "$init_bin" ] || die "--init must name the static wrenn-init binary (run 'make build')"
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and file ownership in the root file system need it)"
for tool in debootstrap mkfs.ext4 cpio gzip apt-get dpkg-deb depmod sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' is missing: run 'make deps' (or apt-get install debootstrap e2fsprogs cpio kmod)"
done

total_start=$(date +%s.%N)
step_no=0
step_start=0
step() {
    step_no=$((step_no + 1))
    step_start=$(date +%s.%N)
    echo "==> [$step_no] $*"
}
step_done() {
    printf '    %s (%ss)\n' "${1:-done}" "$(elapsed "$step_start")"
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
# Writes stdin to $1 through a temporary file that is fsynced and renamed.
write_atomic() {
    local target=$1 tmp
    tmp="$target.tmp.$$"
    cat >"$tmp"
    sync "$tmp"
    mv -f "$tmp" "$target"
}
# Moves a finished temporary file into place durably.
commit_file() {
    sync "$1"
    mv -f "$1" "$2"
    sync "$(dirname "$2")"
}

# The Debian mirror that apt on this machine uses for $SUITE, unless given.
debian_mirror() {
    if [ -n "${WRENN_DEBIAN_MIRROR:-}" ]; then echo "$WRENN_DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(awk -v suite="$SUITE" '
        /^URIs:/ { uris = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) print uris }
        /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { u = $i; if ($(i + 1) == suite) print u } }
    ' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n1)
    [ -n "$uri" ] || die "no '$SUITE' source in apt's sources: set WRENN_DEBIAN_MIRROR to a Debian mirror URL"
    echo "$uri"
}

mkdir -p "$out" "$cache"
mirror=$(debian_mirror)

# --- inputs -----------------------------------------------------------------
step "resolving inputs"
kernel_package() {
    apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }'
}
kernel_pkg=$(kernel_package)
if [ -z "$kernel_pkg" ]; then
    echo "    apt knows no $KERNEL_META yet: running apt-get update"
    apt-get update -q >/dev/null || die "apt-get update failed: check the network and apt's sources"
    kernel_pkg=$(kernel_package)
fi
[ -n "$kernel_pkg" ] || die "apt knows no '$KERNEL_META': is bookworm main in apt's sources?"
kernel_ver=$(apt-cache policy "$kernel_pkg" | awk '/Candidate:/ { print $2 }')
kver=${kernel_pkg#linux-image-}
envd_sha=$(sha "$envd_bin")
init_sha=$(sha "$init_bin")
script_sha=$(sha "$0")
kernel_key="$kernel_pkg=$kernel_ver"
initramfs_key=$(echo "$RECIPE_VERSION $kernel_key ${INITRAMFS_MODULES[*]} $init_sha" | sha256sum | cut -d' ' -f1)
base_key=$(echo "$RECIPE_VERSION $SUITE $ROOTFS_PACKAGES" | sha256sum | cut -d' ' -f1)
rootfs_key=$(echo "$base_key $envd_sha $init_sha $rootfs_size $script_sha" | sha256sum | cut -d' ' -f1)
echo "    kernel $kernel_key, envd ${envd_sha:0:12}, wrenn-init ${init_sha:0:12}"
step_done

# sha256 of an output, remembered beside it: hashing a 2 GiB image takes a while.
output_sha() {
    local file="$out/$1" memo="$out/.$1.sha256"
    if [ ! -f "$memo" ] || [ "$memo" -ot "$file" ]; then
        sha "$file" | write_atomic "$memo"
    fi
    cat "$memo"
}
stamp_ok() { [ -f "$out/$1" ] && [ "$(cat "$out/.$1.inputs" 2>/dev/null)" = "$2" ]; }
stamp_set() { echo "$2" | write_atomic "$out/.$1.inputs"; }

# What base adds to the debootstrap tree $1 (also run on a template's copy).
customize_tree() {
    local root=$1
    install -m 0755 "$envd_bin" "$root/usr/local/bin/envd"
    install -m 0755 "$init_bin" "$root/usr/sbin/wrenn-init"
    # An unprivileged user for code that should not run as root.
    chroot "$root" sh -c 'id -u user >/dev/null 2>&1 || useradd --create-home --shell /bin/bash --uid 1000 user'
    # A sandbox is the user's own machine: let pip install into the system Python.
    printf '[global]\nbreak-system-packages = true\n' >"$root/etc/pip.conf"
    echo wrenn >"$root/etc/hostname"
    : >"$root/etc/fstab"
}

# manifest.json of $out; $1 is the image's name, $2 extra JSON members.
write_manifest() {
    cat <<EOF | write_atomic "$out/manifest.json"
{
  "name": "$1",
  "suite": "$SUITE",
  "kernel": {"package": "$kernel_pkg", "version": "$kernel_ver", "release": "$kver"},
  "files": {
    "vmlinuz": {"size": $(stat -c %s "$out/vmlinuz"), "sha256": "$(output_sha vmlinuz)"},
    "vmlinux": {"size": $(stat -c %s "$out/vmlinux"), "sha256": "$(output_sha vmlinux)"},
    "initramfs.cpio.gz": {"size": $(stat -c %s "$out/initramfs.cpio.gz"), "sha256": "$(output_sha initramfs.cpio.gz)"},
    "rootfs.ext4": {"size": $(stat -c %s "$out/rootfs.ext4"), "sha256": "$(output_sha rootfs.ext4)"}
  },
  "envd_sha256": "$envd_sha",
  "wrenn_init_sha256": "$init_sha",
  "packages": "$ROOTFS_PACKAGES"$2
}
EOF
}

if [ "$template" != base ]; then
    # Template steps, sharing this script's inputs and helpers.
    # shellcheck source=image/template.sh
    . "$here/template.sh"
    exit 0
fi

if stamp_ok vmlinuz "$kernel_key" && stamp_ok vmlinux "$kernel_key" \
    && stamp_ok initramfs.cpio.gz "$initramfs_key" \
    && stamp_ok rootfs.ext4 "$rootfs_key" && [ -f "$out/manifest.json" ]; then
    echo "==> image in $out is up to date (inputs unchanged); nothing to do"
    exit 0
fi

# --- kernel -----------------------------------------------------------------
kdir="$cache/kernel/$kernel_pkg-$kernel_ver"
step "kernel $kernel_pkg $kernel_ver"
if [ ! -f "$kdir/.complete" ]; then
    rm -rf "$kdir" && mkdir -p "$kdir/deb"
    (cd "$kdir/deb" && apt-get -q -o APT::Sandbox::User=root download "$kernel_pkg=$kernel_ver" >/dev/null) \
        || die "could not download $kernel_pkg=$kernel_ver: check 'apt-get update' and the network"
    dpkg-deb -x "$kdir"/deb/*.deb "$kdir/root"
    # The package ships no modules.dep: the installer's depmod makes it.
    depmod -b "$kdir/root" "$kver"
    touch "$kdir/.complete"
    step_done "downloaded and unpacked"
else
    step_done "cached"
fi
if stamp_ok vmlinuz "$kernel_key"; then
    echo "    vmlinuz up to date"
else
    cp "$kdir/root/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
    commit_file "$out/vmlinuz.tmp" "$out/vmlinuz"
    stamp_set vmlinuz "$kernel_key"
fi

# The kernel as an ELF file: wrenn-vmm boots it without running the
# bzImage's decompressor. Where the compressed payload sits is in the
# bzImage header (boot protocol 2.08+): after the setup sectors, at
# payload_offset (0x248), payload_length (0x24c) bytes long.
extract_vmlinux() {
    local image="$1" dest="$2" setup_sects payload_offset payload_length start magic tool
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$image" | tr -d ' ')
    [ "$setup_sects" -eq 0 ] && setup_sects=4
    payload_offset=$(od -An -tu4 -j $((0x248)) -N4 "$image" | tr -d ' ')
    payload_length=$(od -An -tu4 -j $((0x24c)) -N4 "$image" | tr -d ' ')
    start=$(( (setup_sects + 1) * 512 + payload_offset ))
    magic=$(od -An -tx1 -j "$start" -N4 "$image" | tr -d ' \n')
    case "$magic" in
        02214c18) tool=(lz4 -d -c) ;;
        28b52ffd) tool=(zstd -d -c) ;;
        fd377a58) tool=(xz -d -c) ;;
        1f8b08*) tool=(gzip -d -c) ;;
        *) die "$image: unknown kernel payload compression (magic $magic)" ;;
    esac
    # The payload ends with the decompressed size (4 bytes), which is not
    # part of the compressed stream.
    dd if="$image" bs=64K iflag=skip_bytes,count_bytes skip="$start" \
        count=$((payload_length - 4)) status=none | "${tool[@]}" > "$dest" \
        || die "could not decompress the kernel payload of $image with ${tool[*]}"
    [ "$(od -An -tx1 -N4 "$dest" | tr -d ' \n')" = 7f454c46 ] \
        || die "the kernel payload of $image is not an ELF file"
}
if stamp_ok vmlinux "$kernel_key"; then
    echo "    vmlinux up to date"
else
    extract_vmlinux "$out/vmlinuz" "$out/vmlinux.tmp"
    commit_file "$out/vmlinux.tmp" "$out/vmlinux"
    stamp_set vmlinux "$kernel_key"
    echo "    vmlinux extracted ($(du -h "$out/vmlinux" | cut -f1))"
fi

# --- initramfs --------------------------------------------------------------
step "initramfs (wrenn-init + ${INITRAMFS_MODULES[*]} and their dependencies)"
if stamp_ok initramfs.cpio.gz "$initramfs_key"; then
    step_done "up to date"
else
    moddir="$kdir/root/lib/modules/$kver"
    [ -f "$moddir/modules.dep" ] || die "$moddir/modules.dep is missing: remove $kdir and run again"
    staging=$(mktemp -d "$cache/initramfs.XXXXXX")
    trap 'rm -rf "$staging"' EXIT
    # Close the wanted set over modules.dep.
    declare -A want=()
    queue=()
    for name in "${INITRAMFS_MODULES[@]}"; do
        path=$(awk -F: -v n="$name" '{ f = $1; sub(/.*\//, "", f); sub(/\.ko(\.[a-z]+)?$/, "", f); gsub(/-/, "_", f); if (f == n) { print $1; exit } }' "$moddir/modules.dep")
        [ -n "$path" ] || die "module '$name' is not in $kernel_pkg"
        queue+=("$path")
    done
    while [ ${#queue[@]} -gt 0 ]; do
        path=${queue[0]}; queue=("${queue[@]:1}")
        [ -n "${want[$path]:-}" ] && continue
        want[$path]=1
        for dep in $(awk -F': *' -v p="$path" '$1 == p { print $2; exit }' "$moddir/modules.dep"); do
            queue+=("$dep")
        done
    done
    mkdir -p "$staging/lib/modules/$kver" "$staging/dev" "$staging/proc" "$staging/sys" "$staging/newroot"
    : >"$staging/lib/modules/$kver/modules.dep"
    for path in $(printf '%s\n' "${!want[@]}" | sort); do
        plain=${path%.xz}; plain=${plain%.zst}
        mkdir -p "$staging/lib/modules/$kver/$(dirname "$plain")"
        case "$path" in
            *.xz) xz -dc "$moddir/$path" >"$staging/lib/modules/$kver/$plain" ;;
            *.zst) zstd -qdc "$moddir/$path" >"$staging/lib/modules/$kver/$plain" ;;
            *) cp "$moddir/$path" "$staging/lib/modules/$kver/$plain" ;;
        esac
        deps=$(awk -F': *' -v p="$path" '$1 == p { print $2; exit }' "$moddir/modules.dep" | sed 's/\.\(xz\|zst\)\b//g')
        echo "$plain: $deps" | sed 's/ *$//' >>"$staging/lib/modules/$kver/modules.dep"
    done
    install -m 0755 "$init_bin" "$staging/init"
    (cd "$staging" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
        | cpio --null --create --format=newc --reproducible --quiet --owner=0:0) \
        | gzip -n -9 >"$out/initramfs.cpio.gz.tmp"
    commit_file "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
    stamp_set initramfs.cpio.gz "$initramfs_key"
    rm -rf "$staging"; trap - EXIT
    step_done "$(printf '%s\n' "${!want[@]}" | wc -l) modules, $(du -h "$out/initramfs.cpio.gz" | cut -f1)"
fi

# --- root file system -------------------------------------------------------
base="$cache/rootfs-$SUITE"
step "debootstrap $SUITE minbase + $ROOTFS_PACKAGES"
if [ "$(cat "$base.inputs" 2>/dev/null)" = "$base_key" ]; then
    step_done "cached in $base"
else
    rm -rf "$base" "$base.inputs"
    debootstrap --variant=minbase --include="$ROOTFS_PACKAGES" "$SUITE" "$base" "$mirror" \
        >"$cache/debootstrap.log" 2>&1 \
        || { tail -n 30 "$cache/debootstrap.log" >&2; die "debootstrap failed; full log in $cache/debootstrap.log"; }
    # Trim what a sandbox never needs: package caches and indexes.
    rm -rf "$base"/var/cache/apt/archives/*.deb "$base"/var/lib/apt/lists/*
    echo "$base_key" | write_atomic "$base.inputs"
    step_done "$(du -sh "$base" | cut -f1)"
fi

step "assembling rootfs.ext4 ($rootfs_size, sparse)"
if stamp_ok rootfs.ext4 "$rootfs_key"; then
    step_done "up to date"
else
    customize_tree "$base"
    rm -f "$out/rootfs.ext4.tmp"
    mkfs.ext4 -q -F -L wrenn-root -E root_owner=0:0 -d "$base" "$out/rootfs.ext4.tmp" "$rootfs_size" \
        || die "mkfs.ext4 failed: is WRENN_ROOTFS_SIZE ($rootfs_size) big enough for $(du -sh "$base" | cut -f1)?"
    commit_file "$out/rootfs.ext4.tmp" "$out/rootfs.ext4"
    stamp_set rootfs.ext4 "$rootfs_key"
    step_done "$(du -h "$out/rootfs.ext4" | cut -f1) used of $rootfs_size"
fi

step "manifest.json"
write_manifest base ""
step_done
echo "==> guest image ready in $out ($(elapsed "$total_start")s)"
