#!/usr/bin/env bash
# The main job: start a Wrenn node on this machine with the embedded default
# configuration (API on 127.0.0.1:8080, state in /var/lib/wrenn), create a
# sandbox from the `base` template, run Python in it, and print the curl
# lines to do the same by hand. The node keeps running afterwards.
#
# Usage: scripts/run-node.sh [path/to/wrenn-agent]
set -euo pipefail

agent_bin=${1:-target/release/wrenn-agent}
api=http://127.0.0.1:8080
state=/var/lib/wrenn
log=$state/agent.log

[ -x "$agent_bin" ] || { echo "run-node: $agent_bin is missing: run 'make build'" >&2; exit 1; }
mkdir -p "$state"

if curl -fsS "$api/v1/health" >/dev/null 2>&1; then
    echo "==> a node already answers on $api; using it"
else
    echo "==> starting wrenn-agent (log: $log)"
    setsid "$agent_bin" >>"$log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$state/agent.pid"
    for _ in $(seq 1 300); do
        curl -fsS "$api/v1/health" >/dev/null 2>&1 && break
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$log" >&2; echo "run-node: wrenn-agent exited" >&2; exit 1; }
        sleep 0.1
    done
fi

echo "==> node:"
curl -fsS "$api/v1/node"; echo

echo "==> creating a sandbox from the base template"
start=$(date +%s.%N)
sandbox=$(curl -sS -X POST "$api/v1/sandboxes" -H 'Content-Type: application/json' \
    -d '{"template":"base","timeout_s":600}')
id=$(printf '%s' "$sandbox" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
[ -n "$id" ] || { echo "run-node: create failed: $sandbox" >&2; exit 1; }
echo "    $id ready in $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')s"

echo "==> running Python in it"
code='import platform; print(f"Hello from Python {platform.python_version()} in a Wrenn sandbox: 6*7 =", 6*7)'
curl -sS -X POST "$api/v1/sandboxes/$id/exec" -H 'Content-Type: application/json' \
    -d "{\"cmd\":\"python3\",\"args\":[\"-c\",$(printf '%s' "$code" | sed 's/\\/\\\\/g; s/"/\\"/g; s/^/"/; s/$/"/')]}"
echo

cat <<TXT

==> the node keeps running ($api). Try it yourself:

  curl -s -X POST $api/v1/sandboxes/$id/exec -d '{"cmd":"python3","args":["-c","print(2**100)"]}'
  curl -s -X PUT --data-binary @README.md "$api/v1/sandboxes/$id/files?path=/root/README.md"
  curl -s "$api/v1/sandboxes/$id/fs/list?path=/root"
  curl -s -X POST $api/v1/sandboxes -d '{"template":"base","memory_mb":1024}'
  curl -s $api/v1/sandboxes
  curl -s -X DELETE $api/v1/sandboxes/$id

  Stop the node:  kill \$(cat $state/agent.pid)   (sandboxes keep running; a restart finds them)
TXT
