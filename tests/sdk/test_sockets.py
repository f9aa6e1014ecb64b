"""The SDK's WebSockets and the port proxy against a real node:
commands.stream / connect, pty / pty_connect, get_url over HTTP and
WebSocket."""

import base64
import hashlib
import os
import time

import httpx
import httpx_ws

# A WebSocket echo server on the standard library only (the guest has no
# WebSocket package): one connection at a time, text and binary frames of
# up to 64 KiB, echoed unmasked.
ECHO_SERVER = r'''
import base64, hashlib, socket, struct
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8765)); srv.listen(8)
def exact(c, n):
    b = b""
    while len(b) < n:
        part = c.recv(n - len(b))
        if not part: raise EOFError
        b += part
    return b
while True:
    c, _ = srv.accept()
    try:
        head = b""
        while b"\r\n\r\n" not in head: head += c.recv(1024)
        key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
        accept = base64.b64encode(hashlib.sha1(key + GUID.encode()).digest())
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        while True:
            b1, b2 = exact(c, 2)
            op, n = b1 & 15, b2 & 127
            if n == 126: n = struct.unpack(">H", exact(c, 2))[0]
            elif n == 127: n = struct.unpack(">Q", exact(c, 8))[0]
            mask = exact(c, 4) if b2 & 128 else b"\0\0\0\0"
            data = bytes(x ^ mask[i % 4] for i, x in enumerate(exact(c, n)))
            if op == 8: c.sendall(b"\x88\x00"); break
            if op == 9: c.sendall(bytes([0x8A, len(data)]) + data); continue
            if op in (1, 2):
                head = bytes([0x80 | op]) + (bytes([len(data)]) if len(data) < 126 else b"\x7e" + struct.pack(">H", len(data)))
                c.sendall(head + data)
    except Exception:
        pass
    c.close()
'''


def events_of(iterator):
    return [(e.type, getattr(e, "data", None), getattr(e, "exit_code", None), getattr(e, "pid", None)) for e in iterator]


def test_commands_stream(capsule):
    events = list(capsule.commands.stream("echo hello; echo oops >&2; exit 4"))
    kinds = [e.type for e in events]
    assert kinds[0] == "start" and events[0].pid > 0
    assert kinds[-1] == "exit" and events[-1].exit_code == 4
    stdout = "".join(e.data for e in events if e.type == "stdout")
    stderr = "".join(e.data for e in events if e.type == "stderr")
    assert stdout == "hello\n"
    assert stderr == "oops\n"
    # args given: no shell.
    events = list(capsule.commands.stream("/bin/echo", ["a", "b c"]))
    assert "".join(e.data for e in events if e.type == "stdout") == "a b c\n"


def test_background_then_connect(capsule):
    handle = capsule.commands.run(
        "for i in 1 2 3; do echo tick $i; sleep 1; done", background=True
    )
    events = list(capsule.commands.connect(handle.pid))
    assert events[0].type == "start"
    out = "".join(e.data for e in events if e.type == "stdout")
    assert out == "tick 1\ntick 2\ntick 3\n"
    assert events[-1].type == "exit" and events[-1].exit_code == 0
    # A process that already ended still reports its exit.
    again = list(capsule.commands.connect(handle.pid))
    assert again[-1].type == "exit"
    errors = list(capsule.commands.connect(999999))
    assert errors[-1].type == "error"


def read_until(term, needle, seconds=60):
    seen = b""
    deadline = time.time() + seconds
    for event in term:
        if event.type == "output":
            seen += event.data
            if needle in seen:
                return seen
        if event.type in ("exit",) or time.time() > deadline:
            break
    raise AssertionError(f"{needle!r} not in terminal output {seen!r}")


def test_pty_and_reconnect(capsule):
    with capsule.pty(cols=100, rows=30, envs={"MARK": "pty-env"}, cwd="/tmp") as term:
        started = next(iter(term))
        assert started.type == "started"
        tag = term.tag
        assert tag.startswith("pty-")
        term.write(b"tty; stty size; echo $MARK; pwd\n")
        seen = read_until(term, b"/tmp\r\n")
        assert b"/dev/pts/" in seen
        assert b"30 100" in seen
        assert b"pty-env" in seen
        term.resize(120, 40)
        term.write(b"stty size\n")
        read_until(term, b"40 120")
    # Leaving the context manager only closes the socket: reattach by tag.
    with capsule.pty_connect(tag) as term:
        term.write(b"echo again-$((6*7))\n")
        read_until(term, b"again-42")
        term.kill()
        kinds = [e.type for e in term]
        assert kinds[-1] == "exit"


def test_get_url_http_and_websocket(capsule):
    capsule.files.write("/srv/www/hello.txt", "hello through the proxy\n")
    capsule.files.write("/srv/echo.py", ECHO_SERVER)
    capsule.commands.run("cd /srv/www && exec python3 -m http.server 8000", background=True)
    capsule.commands.run("exec python3 /srv/echo.py", background=True)
    url = capsule.get_url(8000)
    assert url.startswith("http://8000-" + capsule.capsule_id + ".localhost:")
    deadline = time.time() + 60
    while True:
        try:
            reply = httpx.get(url + "/hello.txt", timeout=10)
            if reply.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the guest's HTTP server never answered"
        time.sleep(0.5)
    assert reply.text == "hello through the proxy\n"
    # A body streamed through, several requests on one connection.
    big = os.urandom(3 << 20)
    capsule.files.write("/srv/www/big.bin", big)
    with httpx.Client(timeout=60) as client:
        for _ in range(3):
            got = client.get(url + "/big.bin")
            assert hashlib.sha256(got.content).digest() == hashlib.sha256(big).digest()
    # The path-style proxy.
    base = os.environ["WRENN_BASE_URL"]
    path_style = httpx.get(f"{base}/proxy/{capsule.capsule_id}/8000/hello.txt", timeout=10)
    assert path_style.text == "hello through the proxy\n"
    # A WebSocket upgrade passes through to the guest's echo server.
    ws_url = capsule.get_url(8765)
    deadline = time.time() + 60
    while True:
        try:
            with httpx.Client(timeout=10) as client:
                with httpx_ws.connect_ws(ws_url, client) as ws:
                    ws.send_text("ping through the proxy")
                    assert ws.receive_text() == "ping through the proxy"
                    ws.send_bytes(b"\x00\x01binary")
                    assert ws.receive_bytes() == b"\x00\x01binary"
            break
        except (httpx.HTTPError, httpx_ws.WebSocketUpgradeError, httpx_ws.HTTPXWSException):
            assert time.time() < deadline, "the guest's WebSocket server never answered"
            time.sleep(0.5)
    # No server on a port: a 5xx the SDK's code runner retries.
    assert httpx.get(capsule.get_url(9), timeout=10).status_code >= 500
    # An unknown sandbox: 404.
    missing = url.replace(capsule.capsule_id, "sb-nosuchsandbox")
    assert httpx.get(missing, timeout=10).status_code == 404
