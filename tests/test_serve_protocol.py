"""The header deadline: a client that never finishes its request headers is disconnected."""

from __future__ import annotations

import socket
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")

from adapterkit.serve.protocol import with_header_timeout  # noqa: E402

from .serving import running_server  # noqa: E402


async def hello(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def server():
    with running_server(hello, http=with_header_timeout(0.5), lifespan="off", timeout_keep_alive=30) as address:
        yield address


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    start, data = time.monotonic(), b""
    sock.settimeout(limit_s)
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        pass
    return data, time.monotonic() - start


def test_a_request_whose_headers_never_end_is_cut_off(server):
    with socket.create_connection(server, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        data, waited = _read_until_closed(sock, 5)
    assert data == b"" and waited < 3


def test_complete_requests_are_served_and_a_slow_second_one_is_cut_off(server):
    with socket.create_connection(server, timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"ok")
        time.sleep(0.8)  # idle between requests is the keep-alive timeout's business (30 s here)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET / HTTP/1.1\r\n")  # a third request that stalls
        data, waited = _read_until_closed(sock, 5)
    assert data == b"" and waited < 3
