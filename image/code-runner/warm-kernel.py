"""Warms the code-runner template: run by the node in a fresh sandbox (the
manifest's `warm.prepare`) before it snapshots that sandbox, so that
sandboxes made from the snapshot find Jupyter answering and a `wrenn`
kernel that has already run code.

Waits for the Jupyter Server on 127.0.0.1:8888, starts (or reuses) a kernel
named `wrenn`, runs `1+1` in it over the kernel's WebSocket (Jupyter message
protocol 5.3, shell channel) and waits for the kernel's `status: idle` for
that request. Exits 0 then, leaving the kernel running; 1 on a failure or
when the deadline passes (WRENN_WARM_TIMEOUT_S, default 1200 s). Progress
goes to stderr. Only the standard library and tornado (installed with
jupyter-server) are used.
"""

import asyncio
import datetime
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid

from tornado.websocket import websocket_connect

BASE = "http://127.0.0.1:8888"
WS_BASE = "ws://127.0.0.1:8888"
KERNEL_NAME = "wrenn"
START = time.monotonic()
DEADLINE = START + float(os.environ.get("WRENN_WARM_TIMEOUT_S", "1200"))


def log(message):
    print(f"warm-kernel [{time.monotonic() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


def left():
    return DEADLINE - time.monotonic()


def http(method, path, body=None, timeout=30.0):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(BASE + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=max(1.0, min(timeout, left()))) as response:
        return json.loads(response.read() or b"null")


def wait_for_server():
    log("waiting for Jupyter Server at " + BASE + "/api/status")
    last = None
    while left() > 0:
        try:
            status = http("GET", "/api/status", timeout=10)
            log(f"Jupyter Server answers: {status}")
            return
        except (OSError, urllib.error.URLError, ValueError) as e:
            why = str(e)
            if why != last:
                log(f"not yet: {why}")
                last = why
        time.sleep(1)
    raise TimeoutError("Jupyter Server did not answer before the deadline")


def kernel_id():
    for kernel in http("GET", "/api/kernels") or []:
        if kernel.get("name") == KERNEL_NAME:
            log(f"reusing kernel {kernel['id']} ({kernel.get('execution_state')})")
            return kernel["id"]
    log(f"starting a kernel named {KERNEL_NAME}")
    kernel = http("POST", "/api/kernels", {"name": KERNEL_NAME}, timeout=left())
    log(f"kernel {kernel['id']} started ({kernel.get('execution_state')})")
    return kernel["id"]


def execute_request(session):
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "username": "wrenn",
            "session": session,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "msg_type": "execute_request",
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": {
            "code": "1+1",
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        "channel": "shell",
        "buffers": [],
    }


async def run_once(kid):
    """One WebSocket connection: sends the request, waits for its idle.
    True when the kernel went idle after running it; False when the
    connection closed first (the caller reconnects)."""
    session = uuid.uuid4().hex
    url = f"{WS_BASE}/api/kernels/{kid}/channels?session_id={session}"
    log(f"connecting to {url}")
    conn = await asyncio.wait_for(websocket_connect(url, max_message_size=64 << 20), timeout=max(1.0, left()))
    try:
        request = execute_request(session)
        msg_id = request["header"]["msg_id"]
        await conn.write_message(json.dumps(request))
        log(f"execute_request {msg_id} sent (code 1+1)")
        while True:
            raw = await asyncio.wait_for(conn.read_message(), timeout=max(1.0, left()))
            if raw is None:
                log("the WebSocket closed before the kernel answered")
                return False
            if isinstance(raw, bytes):
                continue
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg.get("header", {}).get("msg_type") or msg.get("msg_type")
            content = msg.get("content", {})
            if kind == "execute_result":
                log(f"result: {content.get('data', {}).get('text/plain')}")
            elif kind == "execute_reply":
                log(f"execute_reply: {content.get('status')}")
            elif kind == "error":
                raise RuntimeError(f"the kernel failed to run 1+1: {content.get('ename')}: {content.get('evalue')}")
            elif kind == "status":
                state = content.get("execution_state")
                log(f"status: {state}")
                if state == "idle":
                    return True
    finally:
        conn.close()


async def warm():
    wait_for_server()
    kid = kernel_id()
    while left() > 0:
        try:
            if await run_once(kid):
                log(f"kernel {kid} is warm")
                return
        except (OSError, asyncio.TimeoutError) as e:
            log(f"kernel connection failed: {e!r}")
        await asyncio.sleep(2)
    raise TimeoutError("the kernel did not run 1+1 before the deadline")


def main():
    try:
        asyncio.run(warm())
    except Exception as e:  # noqa: BLE001 - any failure ends the warm-up
        log(f"failed: {e!r}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
