"""The HTTP server's connection limit, with an app whose answers the test holds back."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator, Mapping
from http import HTTPStatus

import pytest

from agent.http_server import HttpServer, Request, Response

LIMIT = 3


class HeldApp:
    """Answers ``GET /hold`` only once released; everything else at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.holding = threading.Semaphore(0)

    def admit(self, method: str, path: str, headers: Mapping[str, str], length: int) -> None:
        pass

    def handle(self, request: Request) -> Response:
        if request.path == "/hold":
            self.holding.release()
            self.release.wait(30)
        return Response(HTTPStatus.OK, b"{}")

    def error(self, status: HTTPStatus, message: str) -> Response:
        return Response(status, json.dumps({"error": message}).encode())


@pytest.fixture
def app() -> Iterator[HeldApp]:
    app = HeldApp()
    yield app
    app.release.set()


@pytest.fixture
def server(app: HeldApp) -> Iterator[HttpServer]:
    server = HttpServer(app, tcp=("127.0.0.1", 0), max_connections=LIMIT)
    server.start()
    yield server
    server.stop()


def _connect(server: HttpServer) -> socket.socket:
    assert server.port is not None
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _get(sock: socket.socket, path: str) -> None:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def _answer(sock: socket.socket) -> bytes:
    """The next response on ``sock`` (small: one recv), or b"" once the server closed it."""
    return sock.recv(65536)


def test_at_the_limit_the_least_recently_active_idle_connection_makes_room(
        server: HttpServer, caplog: pytest.LogCaptureFixture) -> None:
    idle = [_connect(server) for _ in range(LIMIT)]
    for sock in idle:  # each is served once, so each has a thread that is now idle
        _get(sock, "/ping")
        assert _answer(sock).startswith(b"HTTP/1.1 200")
    _get(idle[0], "/ping")  # the first becomes the most recently active
    assert _answer(idle[0]).startswith(b"HTTP/1.1 200")
    with caplog.at_level(logging.WARNING, "agent.http_server"):
        new = _connect(server)
        _get(new, "/ping")
        assert _answer(new).startswith(b"HTTP/1.1 200")
    assert _answer(idle[1]) == b""  # closed to make room: it had been idle the longest
    _get(idle[0], "/ping")
    assert _answer(idle[0]).startswith(b"HTTP/1.1 200")
    assert "3 HTTP connections open (api.limits.max_connections): closed the least " \
        "recently active idle one" in caplog.text
    for sock in [*idle, new]:
        sock.close()


def test_when_every_connection_is_busy_a_new_one_gets_503(server: HttpServer,
                                                          app: HeldApp) -> None:
    busy = [_connect(server) for _ in range(LIMIT)]
    for sock in busy:
        _get(sock, "/hold")
    for _ in busy:
        assert app.holding.acquire(timeout=10)
    refused = _connect(server)
    _get(refused, "/ping")
    response = _answer(refused)
    assert response.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert b"serving 3 connections, its limit; retry shortly" in response
    assert b"Connection: close" in response
    app.release.set()
    for sock in busy:
        assert _answer(sock).startswith(b"HTTP/1.1 200")
    # Room again, and the server never stopped accepting.
    again = _connect(server)
    _get(again, "/ping")
    assert _answer(again).startswith(b"HTTP/1.1 200")
    for sock in [*busy, refused, again]:
        sock.close()
