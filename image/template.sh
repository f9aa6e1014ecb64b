# Sourced by build-guest.sh for --template NAME (not run on its own): builds a
# template image in $out from the base image in $base_dir, with the inputs in
# image/${TEMPLATE_INPUTS[NAME]}/:
#
#   requirements.txt  what goes into the venv /opt/wrenn/jupyter
#   constraints.txt   every version pinned, dependencies included
#   *.service         wrenn-init service files for /etc/wrenn/services
#   warm-kernel.py    the warm-up the node runs before it snapshots the
#                     template (/opt/wrenn/warm-kernel.py; manifest `warm`)
#
# vmlinuz, vmlinux and initramfs.cpio.gz are hard links to base's (copies
# across file systems). rootfs.ext4 is the base debootstrap tree, customized
# as for base, plus the venv (made by the guest's own python3 in a chroot,
# filled from wheels downloaded on the build machine: the chroot needs no
# network), the `wrenn` kernelspec and the service files.

inputs="$here/${TEMPLATE_INPUTS[$template]}"
requirements="$inputs/requirements.txt"
constraints="$inputs/constraints.txt"
venv=/opt/wrenn/jupyter
for f in "$requirements" "$constraints"; do
    [ -f "$f" ] || die "$f is missing"
done
services=("$inputs"/*.service)
[ -f "${services[0]}" ] || die "no service files in $inputs"
warm_script="$inputs/warm-kernel.py"
[ -f "$warm_script" ] || die "$warm_script is missing"

wheels_key=$(cat "$requirements" "$constraints" | sha256sum | cut -d' ' -f1)
template_key=$(
    {
        echo "$RECIPE_VERSION $template $rootfs_key $wheels_key $(sha "$here/template.sh")"
        for f in "${services[@]}"; do echo "$(basename "$f") $(sha "$f")"; done
        echo "warm-kernel.py $(sha "$warm_script")"
    } | sha256sum | cut -d' ' -f1
)
echo "==> template $template in $out (from $base_dir)"

mkdir -p "$out"
if stamp_ok vmlinuz "$kernel_key" && stamp_ok vmlinux "$kernel_key" \
    && stamp_ok initramfs.cpio.gz "$initramfs_key" \
    && stamp_ok rootfs.ext4 "$template_key" && [ -f "$out/manifest.json" ]; then
    echo "==> image in $out is up to date (inputs unchanged); nothing to do"
    return 0
fi

# The base image must be current: its kernel, initramfs and tree are reused.
base_stamp_ok() { [ -f "$base_dir/$1" ] && [ "$(cat "$base_dir/.$1.inputs" 2>/dev/null)" = "$2" ]; }
base_stamp_ok vmlinuz "$kernel_key" && base_stamp_ok vmlinux "$kernel_key" \
    && base_stamp_ok initramfs.cpio.gz "$initramfs_key" \
    && [ "$(cat "$cache/rootfs-$SUITE.inputs" 2>/dev/null)" = "$base_key" ] \
    || die "the base image in $base_dir is missing or older than these inputs: build it first (image/build-guest.sh without --template, or 'make image')"

step "kernel and initramfs from $base_dir"
for f in vmlinuz vmlinux initramfs.cpio.gz; do
    key=$kernel_key
    [ "$f" = initramfs.cpio.gz ] && key=$initramfs_key
    if stamp_ok "$f" "$key" && [ "$out/$f" -ef "$base_dir/$f" ]; then continue; fi
    # Already a link to base's file: only the stamp was stale (mv refuses
    # to rename a file onto another name of itself).
    if ! [ "$out/$f" -ef "$base_dir/$f" ]; then
        rm -f "$out/$f.tmp"
        ln "$base_dir/$f" "$out/$f.tmp" 2>/dev/null || cp "$base_dir/$f" "$out/$f.tmp"
        commit_file "$out/$f.tmp" "$out/$f"
    fi
    stamp_set "$f" "$key"
done
step_done "linked"

# Wheels for CPython 3.11 on x86_64 glibc 2.36 (bookworm), whatever Python
# the build machine runs. Binary only, so nothing is compiled.
wheels="$cache/wheels/$wheels_key"
step "wheels for $venv ($(grep -cv '^#' "$constraints") pins)"
if [ -f "$wheels/.complete" ]; then
    step_done "cached in $wheels"
else
    command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1 \
        || die "python3 -m pip is missing on this machine: apt-get install python3-pip"
    rm -rf "$wheels" && mkdir -p "$wheels"
    platforms=()
    for p in manylinux_2_36 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_26 \
        manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
        platforms+=(--platform "${p}_x86_64")
    done
    python3 -m pip download -q --disable-pip-version-check --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}" \
        -r "$requirements" -c "$constraints" -d "$wheels" \
        || die "pip download failed (network, or a pin in $constraints without a cp311 x86_64 wheel)"
    touch "$wheels/.complete"
    step_done "$(find "$wheels" -name '*.whl' | wc -l) wheels, $(du -sh "$wheels" | cut -f1)"
fi

if stamp_ok rootfs.ext4 "$template_key"; then
    # Only the kernel or initramfs links changed: keep the versions on record.
    server_version=$(sed -n 's/.*"jupyter_server": "\([^"]*\)".*/\1/p' "$out/manifest.json" 2>/dev/null)
    ipykernel_version=$(sed -n 's/.*"ipykernel": "\([^"]*\)".*/\1/p' "$out/manifest.json" 2>/dev/null)
    echo "    rootfs.ext4 up to date"
else
    step "root file system tree: base + $venv"
    staging=$(mktemp -d "$cache/$template.XXXXXX")
    trap 'rm -rf "$staging"' EXIT
    root="$staging/root"
    cp -a --reflink=auto "$cache/rootfs-$SUITE" "$root"
    customize_tree "$root"
    mkdir -p "$root/tmp/wrenn-wheels"
    cp "$wheels"/*.whl "$requirements" "$constraints" "$root/tmp/wrenn-wheels/"
    in_guest() {
        chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            HOME=/root LANG=C.UTF-8 "$@"
    }
    # The guest's python3 (no python3-venv package, so no ensurepip): the venv
    # starts without pip, the guest's pip fills it (pip itself included).
    in_guest /usr/bin/python3 -m venv --without-pip "$venv"
    in_guest /usr/bin/python3 -m pip --isolated --disable-pip-version-check --python "$venv/bin/python" \
        install -q --no-index --find-links /tmp/wrenn-wheels \
        -r /tmp/wrenn-wheels/requirements.txt -c /tmp/wrenn-wheels/constraints.txt \
        || die "pip install into $venv failed"
    in_guest "$venv/bin/python" -m ipykernel install --sys-prefix --name wrenn \
        --display-name "Python 3 (wrenn)" >/dev/null
    rm -rf "$root/tmp/wrenn-wheels" "$root/root/.cache"
    server_version=$(in_guest "$venv/bin/jupyter" server --version) \
        || die "jupyter server --version failed in the new tree"
    in_guest "$venv/bin/jupyter" kernelspec list | grep -qw wrenn \
        || die "kernelspec 'wrenn' is not listed by jupyter kernelspec list"
    ipykernel_version=$(in_guest "$venv/bin/python" -c 'import ipykernel; print(ipykernel.__version__)')
    mkdir -p "$root/etc/wrenn/services" "$root/var/log/wrenn"
    for f in "${services[@]}"; do install -m 0644 "$f" "$root/etc/wrenn/services/"; done
    install -m 0755 "$warm_script" "$root/opt/wrenn/warm-kernel.py"
    in_guest "$venv/bin/python" -m py_compile /opt/wrenn/warm-kernel.py \
        || die "warm-kernel.py does not compile with the guest's Python"
    rm -rf "$root/opt/wrenn/__pycache__"
    "$init_bin" check-services "$root/etc/wrenn/services" >/dev/null \
        || die "wrenn-init rejects a service file of $inputs"
    step_done "jupyter-server $server_version, ipykernel $ipykernel_version, $(du -sh "$root$venv" | cut -f1) venv"

    step "assembling rootfs.ext4 ($rootfs_size, sparse)"
    rm -f "$out/rootfs.ext4.tmp"
    mkfs.ext4 -q -F -L wrenn-root -E root_owner=0:0 -d "$root" "$out/rootfs.ext4.tmp" "$rootfs_size" \
        || die "mkfs.ext4 failed: is WRENN_ROOTFS_SIZE ($rootfs_size) big enough for $(du -sh "$root" | cut -f1)?"
    commit_file "$out/rootfs.ext4.tmp" "$out/rootfs.ext4"
    stamp_set rootfs.ext4 "$template_key"
    step_done "$(du -h "$out/rootfs.ext4" | cut -f1) used of $rootfs_size"
    rm -rf "$staging"
    trap - EXIT
fi

step "manifest.json"
service_names=$(for f in "${services[@]}"; do printf '"%s",' "$(basename "$f" .service)"; done)
write_manifest "$template" ",
  \"template\": {\"base\": \"$(basename "$base_dir")\", \"venv\": \"$venv\", \"jupyter_server\": \"$server_version\", \"ipykernel\": \"$ipykernel_version\", \"kernelspec\": \"wrenn\", \"constraints_sha256\": \"$(sha "$constraints")\", \"services\": [${service_names%,}]},
  \"warm\": {\"prepare\": [\"$venv/bin/python\", \"/opt/wrenn/warm-kernel.py\"], \"timeout_s\": 1200, \"vcpus\": 2, \"memory_mb\": 1024}"
step_done
echo "==> template $template ready in $out ($(elapsed "$total_start")s)"
