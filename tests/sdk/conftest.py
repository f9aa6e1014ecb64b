"""Shared set-up of the SDK tests: the published `wrenn` SDK drives a real
Wrenn node (started by agent/tests/sdk.rs, which sets WRENN_BASE_URL,
WRENN_API_KEY, WRENN_PROXY_DOMAIN and WRENN_TEST_KEYED_URL).

`*.localhost` names (the port proxy's `{port}-{id}.localhost`) do not
resolve on a host whose nsswitch.conf says `hosts: files dns`; the SDK
documentation (docs/sdk.md) gives the resolver line for a real set-up, and
the tests resolve them to loopback in-process instead.
"""

import os
import socket

import pytest

_getaddrinfo = socket.getaddrinfo


def _resolve_localhost(host, *args, **kwargs):
    if isinstance(host, bytes):
        host = host.decode()
    if isinstance(host, str) and host.endswith(".localhost"):
        # A fleet test's nodes are on a bridge, not on loopback.
        host = os.environ.get("WRENN_TEST_PROXY_IP", "127.0.0.1")
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _resolve_localhost


def pytest_configure(config):
    for name in ("WRENN_BASE_URL", "WRENN_API_KEY"):
        if not os.environ.get(name):
            raise pytest.UsageError(
                f"{name} is not set: run these tests through `cargo test -p wrenn-agent --test sdk`"
            )


@pytest.fixture(scope="module")
def capsule():
    """One running capsule shared by a module's tests."""
    from wrenn import Capsule

    c = Capsule(wait=True)
    yield c
    c.destroy()
