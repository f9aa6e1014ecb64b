#!/usr/bin/env bash
# Boots a template under QEMU (TCG unless WRENN_ACCEL=kvm) the way the e2e
# tests do (tests/src/guest.rs: microvm, qcow2 overlay, tap in a network
# namespace of its own) and waits for Jupyter to list the `wrenn` kernelspec.
#
# Usage: image/boot-check.sh [IMAGE_DIR]   [/var/lib/wrenn/images/code-runner-beta]
#
# Prints the seconds from QEMU's start to the first answer of
# http://169.254.0.21:8888/api/kernelspecs; the console log is kept in the
# temporary folder it names. Exit status 0 when `wrenn` is listed (and, with
# WRENN_START_KERNEL=1, when a `wrenn` kernel started through the REST API
# reaches execution_state "idle").
set -euo pipefail

dir=${1:-/var/lib/wrenn/images/code-runner-beta}
accel=${WRENN_ACCEL:-tcg}
limit=${WRENN_BOOT_LIMIT:-300}
guest=169.254.0.21
ns="wrenn-bootcheck-$$"
work=$(mktemp -d /tmp/wrenn-bootcheck.XXXXXX)
qemu_pid=""

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

cleanup() {
    [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null
    ip netns delete "$ns" 2>/dev/null || true
    rm -f "$work/rootfs.qcow2"
}
trap cleanup EXIT

for f in vmlinuz initramfs.cpio.gz rootfs.ext4; do
    [ -f "$dir/$f" ] || { echo "boot-check: $dir/$f is missing" >&2; exit 1; }
done
qemu-img create -q -f qcow2 -F raw -b "$dir/rootfs.ext4" "$work/rootfs.qcow2"
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" tuntap add dev tap0 mode tap
ip -n "$ns" addr add 169.254.0.22/30 dev tap0
ip -n "$ns" link set tap0 up

if [ "$accel" = kvm ]; then cpu=host; else cpu=qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt; fi
start=$(date +%s.%N)
ip netns exec "$ns" qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,acpi=on \
    -accel "$accel" -cpu "$cpu" -smp "${WRENN_VCPUS:-2}" -m "${WRENN_MEMORY_MB:-1024}M" \
    -nodefaults -no-user-config -nographic -no-reboot \
    -chardev "file,id=con0,path=$work/console.log" -serial chardev:con0 \
    -kernel "$dir/vmlinuz" -initrd "$dir/initramfs.cpio.gz" \
    -append "console=ttyS0 reboot=k panic=-1 tsc_early_khz=2000000 lpj=8000000 root=/dev/vda rw wrenn.ip=$guest/30 wrenn.gw=169.254.0.22" \
    -drive "id=root,file=$work/rootfs.qcow2,format=qcow2,if=none" -device virtio-blk-device,drive=root \
    -netdev tap,id=net0,ifname=tap0,script=no,downscript=no -device virtio-net-device,netdev=net0 \
    </dev/null >/dev/null 2>"$work/qemu.stderr" &
qemu_pid=$!

echo "boot-check: $dir under $accel, console in $work/console.log"
body=""
while :; do
    now=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if body=$(ip netns exec "$ns" curl -fsS --max-time 2 "http://$guest:8888/api/kernelspecs" 2>/dev/null); then
        break
    fi
    kill -0 "$qemu_pid" 2>/dev/null || { echo "boot-check: QEMU exited" >&2; tail -n 30 "$work/console.log" >&2; exit 1; }
    if awk -v n="$now" -v l="$limit" 'BEGIN { exit !(n > l) }'; then
        echo "boot-check: no answer from Jupyter after ${limit}s" >&2
        tail -n 30 "$work/console.log" >&2
        exit 1
    fi
    sleep 0.5
done
echo "boot-check: Jupyter answered ${now}s after QEMU started"
grep -E 'envd started|service started|services found' "$work/console.log" || true
echo "$body"
echo "$body" | grep -q '"wrenn"' || { echo "boot-check: kernelspec wrenn not listed" >&2; exit 1; }
echo "boot-check: kernelspec wrenn listed"

if [ "${WRENN_START_KERNEL:-0}" = 1 ]; then
    kstart=$(date +%s.%N)
    id=$(ip netns exec "$ns" curl -fsS -X POST -H 'Content-Type: application/json' \
        -d '{"name": "wrenn"}' "http://$guest:8888/api/kernels" | sed -n 's/.*"id": "\([^"]*\)".*/\1/p')
    [ -n "$id" ] || { echo "boot-check: POST /api/kernels failed" >&2; exit 1; }
    for _ in $(seq 1 240); do
        state=$(ip netns exec "$ns" curl -fsS "http://$guest:8888/api/kernels/$id" \
            | sed -n 's/.*"execution_state": "\([^"]*\)".*/\1/p')
        [ "$state" = idle ] && break
        sleep 0.5
    done
    [ "$state" = idle ] || { echo "boot-check: kernel $id is '$state', not idle" >&2; exit 1; }
    echo "boot-check: kernel wrenn $id idle $(elapsed "$kstart")s after POST /api/kernels"
fi
