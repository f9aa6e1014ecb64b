#!/usr/bin/env bash
# A Python virtual environment with the published `wrenn` SDK (0.3.0) and
# the test tools, for the SDK tests (tests/sdk) and benchmarks. Idempotent:
# a second run with the same pins only checks the result. Prints the path
# of the environment's python on its last line.
#
# The SDK declares Python >= 3.13 but works on Debian 12's 3.11 when pip is
# told to ignore that (docs/sdk.md).
#
# Usage: scripts/sdk-venv.sh [VENV_DIR]   (default $WRENN_SDK_VENV or
#        /var/lib/wrenn/cache/sdk-venv)
set -euo pipefail

venv=${1:-${WRENN_SDK_VENV:-/var/lib/wrenn/cache/sdk-venv}}
here=$(cd "$(dirname "$0")" && pwd)
requirements=$here/../tests/sdk/requirements.txt
die() { echo "sdk-venv: error: $*" >&2; exit 1; }

[ -f "$requirements" ] || die "$requirements is missing"
# Debian's python3 (with python3-venv, from make deps) unless told otherwise.
python=${WRENN_PYTHON:-/usr/bin/python3}
[ -x "$python" ] || python=$(command -v python3) || die "python3 is missing: run 'make deps'"
stamp=$venv/.wrenn-requirements
want=$( { sha256sum "$requirements" | cut -d' ' -f1; "$python" --version; } | sha256sum | cut -d' ' -f1)

check() {
    "$venv/bin/python" - <<'PY'
import importlib.metadata as md
import wrenn, httpx_ws, pytest, schemathesis  # noqa: F401
assert md.version("wrenn") == "0.3.0", md.version("wrenn")
PY
}

if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && check 2>/dev/null; then
    echo "$venv/bin/python"
    exit 0
fi

echo "sdk-venv: building $venv" >&2
rm -rf "$venv.tmp"
"$python" -m venv "$venv.tmp" \
    || die "$python -m venv failed: install python3-venv (make deps does)"
"$venv.tmp/bin/pip" install -q --disable-pip-version-check --upgrade pip >&2
# wrenn 0.3.0 says Python >= 3.13; its code runs on 3.11.
"$venv.tmp/bin/pip" install -q --disable-pip-version-check --ignore-requires-python \
    -r "$requirements" >&2 || die "pip install failed (see above)"
rm -rf "$venv"
mv "$venv.tmp" "$venv"
# The venv's scripts name their interpreter by path: make it the final one.
sed -i "s|$venv.tmp|$venv|g" "$venv"/bin/* 2>/dev/null || true
check || die "the environment in $venv does not import the SDK and test tools"
echo "$want" >"$stamp"
echo "$venv/bin/python"
