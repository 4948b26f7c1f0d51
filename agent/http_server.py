"""A small HTTP/1.1 server for the local API: keep-alive, limits, one thread per connection.

Why not ``http.server``: its header parsing (the ``email`` package) and per-request object
churn cost more than a small model's whole inference, and the API's latency target is a
fraction of a millisecond over the in-process call. This server reads the request head with
one ``recv`` in the common case, splits it by hand, checks the request with the app
(:meth:`App.admit`: authentication and the body limit) *before* reading any body, and
answers with one ``sendall``. It implements what local clients use: Content-Length bodies,
keep-alive, pipelining, ``Expect: 100-continue``; chunked request bodies are refused (411).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Protocol

__all__ = ["App", "HttpError", "HttpServer", "Request", "Response"]

log = logging.getLogger(__name__)
_RECV = 256 * 1024


@dataclass(frozen=True)
class Request:
    """One parsed request; header names are lower-case."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class Response:
    """What to send back."""

    status: HTTPStatus
    body: bytes = b""
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


class HttpError(Exception):
    """Raised by an app to answer with ``status`` and a message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class App(Protocol):
    """What the server serves."""

    def admit(self, method: str, path: str, headers: Mapping[str, str]) -> int:
        """Check a request before its body is read; the largest body to accept.

        Raise HttpError to refuse it (401 for a missing token, say) unread.
        """
        ...

    def handle(self, request: Request) -> Response:
        """Answer an admitted request."""
        ...

    def error(self, status: HTTPStatus, message: str) -> Response:
        """The response for a request refused with ``status``."""
        ...


class HttpServer:
    """Serves ``app`` on a TCP address and/or a Unix socket until :meth:`stop`."""

    def __init__(self, app: App, *, tcp: tuple[str, int] | None = None,
                 unix: Path | None = None, server_name: str = "edgefleet",
                 max_head_bytes: int = 32 * 1024, idle_timeout_s: float = 300.0) -> None:
        self.app = app
        self.server_name = server_name
        self.max_head_bytes = max_head_bytes
        self.idle_timeout_s = idle_timeout_s
        self._listeners: list[socket.socket] = []
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._unix = unix
        if tcp is not None:
            listener = socket.create_server(tcp, reuse_port=False)
            self._listeners.append(listener)
        if unix is not None:
            unix.unlink(missing_ok=True)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(unix))
            unix.chmod(0o660)
            listener.listen()
            self._listeners.append(listener)

    @property
    def port(self) -> int | None:
        """The bound TCP port (useful with port 0)."""
        for listener in self._listeners:
            if listener.family != socket.AF_UNIX:
                return int(listener.getsockname()[1])
        return None

    def start(self) -> None:
        """Accept connections in background threads."""
        for listener in self._listeners:
            thread = threading.Thread(target=self._accept, args=(listener,), daemon=True,
                                      name="edgefleet-http-accept")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop accepting, close every connection, remove the Unix socket."""
        for listener in self._listeners:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for thread in self._threads:
            thread.join()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        if self._unix is not None:
            self._unix.unlink(missing_ok=True)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # stopped
            if connection.family != socket.AF_UNIX:
                # Responses are small and latency-bound: no Nagle delay.
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.settimeout(self.idle_timeout_s)
            with self._lock:
                self._connections.add(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True,
                             name="edgefleet-http").start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            _Connection(self, connection).run()
        except OSError as exc:  # the peer went away or timed out
            log.debug("connection closed: %s", exc)
        except Exception:  # a bug here must not take the agent down
            log.exception("HTTP connection failed")
        finally:
            with self._lock:
                self._connections.discard(connection)
            connection.close()


class _Connection:
    """One client connection: requests in order until close."""

    def __init__(self, server: HttpServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.buffer = b""

    def run(self) -> None:
        while True:
            head = self._read_head()
            if head is None:
                return
            if not self._one(head):
                return

    def _read_head(self) -> bytes | None:
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
                return head
            if len(self.buffer) > self.server.max_head_bytes:
                self._send(self.server.app.error(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                    f"request head over {self.server.max_head_bytes} bytes"), close=True)
                return None
            chunk = self.sock.recv(_RECV)
            if not chunk:
                return None
            self.buffer += chunk

    def _one(self, head: bytes) -> bool:
        """Handle one request; False when the connection must close."""
        app = self.server.app
        try:
            method, path, query, headers, keep_alive, length = _parse_head(head)
        except HttpError as exc:
            self._send(app.error(exc.status, str(exc)), close=True)
            return False
        try:
            limit = app.admit(method, path, headers)
            if length > limit:
                raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes "
                                f"is over the limit of {limit}; it was not read")
        except HttpError as exc:
            # Refused unread: an unread body leaves the connection unusable.
            reusable = keep_alive and length == 0
            self._send(app.error(exc.status, str(exc)), close=not reusable)
            return reusable
        if length and headers.get("expect", "").lower() == "100-continue":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self._read_body(length)
        if body is None:
            return False
        try:
            response = app.handle(Request(method, path, query, headers, body))
        except HttpError as exc:
            response = app.error(exc.status, str(exc))
        self._send(response, close=not keep_alive)
        return keep_alive

    def _read_body(self, length: int) -> bytes | None:
        if len(self.buffer) >= length:
            body, self.buffer = self.buffer[:length], self.buffer[length:]
            return body
        parts = [self.buffer]
        have = len(self.buffer)
        self.buffer = b""
        while have < length:
            chunk = self.sock.recv(min(_RECV, length - have))
            if not chunk:
                return None
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)

    def _send(self, response: Response, *, close: bool) -> None:
        lines = [f"HTTP/1.1 {response.status.value} {response.status.phrase}",
                 f"Server: {self.server.server_name}",
                 f"Content-Type: {response.content_type}",
                 f"Content-Length: {len(response.body)}",
                 *(f"{key}: {value}" for key, value in response.headers.items())]
        if close:
            lines.append("Connection: close")
        # One write: a response split over two small writes would wait on a delayed ACK.
        self.sock.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + response.body)


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str], bool, int]:
    """Method, path, query, headers, keep-alive and body length; HttpError if malformed."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed request line {lines[0]!r}")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed header line {line!r}")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(HTTPStatus.LENGTH_REQUIRED, "chunked request bodies are not accepted; "
                        "send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        length = -1
    if length < 0:
        raise HttpError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number")
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    path, _, query = target.partition("?")
    return method, path, query, headers, keep_alive, length
