"""The TCP proxy the fault tests cut to take a server away from one stack (tests/e2e/proxy.py)."""
from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.e2e.harness import wait_for
from tests.e2e.proxy import Proxy


class Echo:
    """A server on a free port that sends every byte back and counts the connections reset on it."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.resets = 0

    def serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except ConnectionResetError:
                self.resets += 1


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo()
    server.server.settimeout(0.2)
    stopping = threading.Event()

    def accept() -> None:
        while not stopping.is_set():
            try:
                conn, _ = server.server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=server.serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server
    stopping.set()
    thread.join()
    server.server.close()


@pytest.fixture
def proxy(echo: Echo) -> Iterator[Proxy]:
    proxy = Proxy("127.0.0.1", echo.port).start()
    yield proxy
    proxy.stop()


def roundtrip(port: int, payload: bytes = b"ping") -> tuple[socket.socket, bytes]:
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn.sendall(payload)
    return conn, recv_exactly(conn, len(payload))


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := conn.recv(size - len(data))):
        data += chunk
    return data


def lost(conn: socket.socket) -> bool:
    """The connection was reset or closed by the other end (what a client sees of a dead server)."""
    try:
        conn.sendall(b"x")
        return conn.recv(1) == b""
    except ConnectionError:
        return True


def refused(port: int) -> bool:
    """A new connection is reset, during the handshake or right after it."""
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionError:
        return True
    with conn:
        return lost(conn)


def test_forwards_both_ways_and_large_payloads(proxy: Proxy) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, more than one read
    conn, answer = roundtrip(proxy.port, payload)
    conn.close()
    assert answer == payload
    assert proxy.accepted == 1


def test_cut_resets_open_connections_and_refuses_new_ones_until_restored(proxy: Proxy, echo: Echo) -> None:
    before, answer = roundtrip(proxy.port)
    assert answer == b"ping"

    proxy.cut()
    assert lost(before), "an open connection survived the cut"
    wait_for(lambda: echo.resets == 1, 5, "the server's side of the connection to be reset")
    assert refused(proxy.port), "a new connection got through while cut"
    before.close()

    proxy.restore()
    after, answer = roundtrip(proxy.port, b"back")
    after.close()
    assert answer == b"back"


def test_outage_restores_even_when_the_block_fails(proxy: Proxy) -> None:
    with pytest.raises(RuntimeError):
        with proxy.outage():
            raise RuntimeError("the test failed during the outage")
    conn, answer = roundtrip(proxy.port)
    conn.close()
    assert answer == b"ping"


@pytest.mark.parametrize("url, expected", [
    ("postgres://postgres@127.0.0.1:5432/sisy_e2e_1", "postgres://postgres@127.0.0.1:{port}/sisy_e2e_1"),
    ("amqp://guest:guest@127.0.0.1:5672/vhost", "amqp://guest:guest@127.0.0.1:{port}/vhost"),
    ("redis://127.0.0.1:6379/15", "redis://127.0.0.1:{port}/15"),
])
def test_url_points_at_the_proxy_and_keeps_the_rest(proxy: Proxy, url: str, expected: str) -> None:
    assert proxy.url(url) == expected.format(port=proxy.port)
