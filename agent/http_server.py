"""A small HTTP/1.1 server for the local API: keep-alive, limits, one thread per connection.

Why not ``http.server``: its header parsing (the ``email`` package) and per-request object
churn cost more than a small model's whole inference, and the API's latency target is a
fraction of a millisecond over the in-process call. Why not h11: measured, it would add
about 65 us per request at p50, six times this server's own parsing and framing
(docs/benchmarks.md, "HTTP parsing"). This server reads the request head with one
``recv`` in the common case, parses it strictly (:mod:`.http_parse`), checks the request
with the app (:meth:`App.admit`: authentication and the body's length) *before* reading any
body, and answers with one ``sendall``. It implements what local clients use:
Content-Length bodies, keep-alive, pipelining, ``Expect: 100-continue``; chunked request
bodies are refused (411). With a :class:`~.cors.CorsPolicy` it answers CORS preflights
before :meth:`App.admit` (they carry no token) and adds the CORS headers to answers to a
listed origin.

Connections are bounded: at ``max_connections`` (or when the process runs out of file
descriptors) the least recently active connection that is not being answered (it waits for
its client, between requests or within one) is closed to make room, and if the app is busy
answering every connection the new one is answered 503. Either way the server keeps
accepting, and says so in the log (at most one warning per 10 s).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from typing import Protocol

from .cors import CorsPolicy
from .http_parse import HttpError, RequestHead, parse_head, split_head

__all__ = ["App", "HttpError", "HttpServer", "Request", "Response"]

log = logging.getLogger(__name__)
_RECV = 256 * 1024
#: Bodies up to this size get their whole buffer at once; larger ones grow as bytes arrive.
_PREALLOCATE = 8 * 1024 * 1024
# accept() errors that mean "no file descriptor or memory for one more connection now".
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_WARN_INTERVAL_S = 10.0
_REFUSAL_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Request:
    """One parsed request; header names are lower-case."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    # A large body is read into one bytearray (no copy); small ones come as bytes.
    body: bytes | bytearray


@dataclass(frozen=True)
class Response:
    """What to send back."""

    status: HTTPStatus
    body: bytes = b""
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


class App(Protocol):
    """What the server serves."""

    def admit(self, method: str, path: str, headers: Mapping[str, str], length: int) -> None:
        """Check a request and its body's ``length`` before the body is read.

        Raise HttpError to refuse it unread (401 for a missing token, 413 for a body over
        its limit, say).
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
                 max_head_bytes: int = 32 * 1024, max_headers: int = 100,
                 idle_timeout_s: float = 300.0, max_connections: int = 64,
                 cors: CorsPolicy | None = None) -> None:
        self.app = app
        #: Web origins allowed to call (None: cross-origin requests get no CORS headers).
        self.cors = cors
        self.server_name = server_name
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self._listeners: list[socket.socket] = []
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._unix = unix
        self._warned_at = -_WARN_INTERVAL_S
        self._unsaid = 0
        try:
            if tcp is not None:
                self._listeners.append(_listen_tcp(tcp))
            if unix is not None:
                self._listeners.append(_listen_unix(unix))
        except OSError:
            for listener in self._listeners:
                listener.close()
            raise

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
        self._stopping.set()
        for listener in self._listeners:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for thread in self._threads:
            thread.join()
        with self._lock:
            for connection in self._connections:
                connection.shut()
        if self._unix is not None:
            self._unix.unlink(missing_ok=True)

    def _accept(self, listener: socket.socket) -> None:
        """Accept until stopped; nothing a client or the OS does ends this loop."""
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                self._accept_failed(exc)
                continue
            try:
                self._admit(sock)
            except Exception:  # a bug here must not stop the API from accepting
                log.exception("HTTP connection set-up failed")
                sock.close()

    def _accept_failed(self, exc: OSError) -> None:
        if exc.errno not in _OUT_OF_RESOURCES:
            log.debug("accept failed: %s", exc)  # e.g. the client gave up (ECONNABORTED)
            self._stopping.wait(0.01)  # never a busy loop, whatever the error
            return
        victim = self._evict()
        done = ("closed the least recently active idle one" if victim is not None
                else "every connection is busy, retrying")
        self._warn(f"cannot accept a connection ({exc.strerror}; {len(self._connections)} "
                   f"open): {done}; raise the file limit (ulimit -n) or lower "
                   "api.limits.max_connections")
        if victim is not None:
            victim.closed.wait(1.0)  # its descriptor is free once its thread closes it
        else:
            self._stopping.wait(0.1)

    def _admit(self, sock: socket.socket) -> None:
        """Serve ``sock`` on a thread of its own, making room or refusing it at the limit."""
        try:
            if sock.family != socket.AF_UNIX:
                # Responses are small and latency-bound: no Nagle delay.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.idle_timeout_s)
        except OSError:  # the client is already gone
            sock.close()
            return
        with self._lock:
            full = len(self._connections) >= self.max_connections
        if full:
            if self._evict() is None:
                self._refuse(sock)
                return
            self._warn(f"{self.max_connections} HTTP connections open (api.limits."
                       "max_connections): closed the least recently active idle one")
        connection = _Connection(self, sock)
        with self._lock:
            self._connections.add(connection)
        try:
            threading.Thread(target=self._serve, args=(connection,), daemon=True,
                             name="edgefleet-http").start()
        except RuntimeError as exc:  # no thread for it: the system is out of resources
            self._forget(connection)
            self._warn(f"cannot start a thread for an HTTP connection ({exc}); closed it")

    def _evict(self) -> _Connection | None:
        """Close the least recently active connection the app is not answering; it or None."""
        with self._lock:
            idle = [c for c in self._connections if not c.busy and not c.evicted]
            if not idle:
                return None
            victim = min(idle, key=lambda c: c.last_active)
            victim.evicted = True
        victim.shut()
        return victim

    def _refuse(self, sock: socket.socket) -> None:
        self._warn(f"{self.max_connections} HTTP connections open (api.limits."
                   "max_connections), all busy: answered a new one 503")
        response = self.app.error(HTTPStatus.SERVICE_UNAVAILABLE,
                                  f"the agent is serving {self.max_connections} connections, "
                                  "its limit; retry shortly")
        with contextlib.suppress(OSError):
            sock.settimeout(_REFUSAL_TIMEOUT_S)
            sock.sendall(_encode(response, self.server_name, close=True))
            sock.shutdown(socket.SHUT_WR)
        sock.close()

    def _warn(self, message: str) -> None:
        """Log ``message`` as a warning, at most once per interval (counting the rest)."""
        with self._lock:
            now = time.monotonic()
            if now - self._warned_at < _WARN_INTERVAL_S:
                self._unsaid += 1
                return
            unsaid, self._unsaid, self._warned_at = self._unsaid, 0, now
        log.warning("%s%s", message, f" ({unsaid} more since the last warning)" if unsaid
                    else "")

    def _serve(self, connection: _Connection) -> None:
        try:
            connection.run()
        except OSError as exc:  # the peer went away, timed out, or was closed to make room
            log.debug("connection closed: %s", exc)
        except Exception:  # a bug here must not take the agent down
            log.exception("HTTP connection failed")
        finally:
            self._forget(connection)

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)
        connection.sock.close()
        connection.closed.set()


class _Connection:
    """One client connection: requests in order until close."""

    def __init__(self, server: HttpServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.buffer = b""
        #: The app is answering a request: not to be closed to make room for another.
        self.busy = False
        #: When the client last sent something or was last answered.
        self.last_active = time.monotonic()
        self.evicted = False
        self.closed = threading.Event()

    def shut(self) -> None:
        """Wake this connection's thread (its next read ends) so it closes."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        while self._one():
            pass

    def _read_head(self) -> bytes | None:
        while True:
            try:
                found = split_head(self.buffer, self.server.max_head_bytes)
            except HttpError as exc:
                self._send(self.server.app.error(exc.status, str(exc)), close=True)
                return None
            if found is not None:
                head, self.buffer = found
                return head
            chunk = self.sock.recv(_RECV)
            self.last_active = time.monotonic()
            if not chunk:
                return None
            self.buffer += chunk

    def _one(self) -> bool:
        """Handle one request; False when the connection must close."""
        raw = self._read_head()
        if raw is None:
            return False
        app = self.server.app
        try:
            head = parse_head(raw, self.server.max_headers)
        except HttpError as exc:
            self._send(app.error(exc.status, str(exc)), close=True)
            return False
        cors = self.server.cors
        extra: Mapping[str, str] = {}
        if cors is not None:
            if cors.is_preflight(head.method, head.headers):
                return self._preflight(cors, head)
            extra = cors.response_headers(head.headers.get("origin"))
        try:
            app.admit(head.method, head.path, head.headers, head.length)
        except HttpError as exc:
            # Refused unread: an unread body leaves the connection unusable.
            reusable = head.keep_alive and head.length == 0
            self._send(app.error(exc.status, str(exc)), close=not reusable, extra=extra)
            return reusable
        if head.length and head.expect_continue:
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self._read_body(head.length)
        if body is None:
            return False
        self.busy = True
        try:
            response = app.handle(Request(head.method, head.path, head.query, head.headers,
                                          body))
        except HttpError as exc:
            response = app.error(exc.status, str(exc))
        finally:
            self.busy = False
            self.last_active = time.monotonic()
        self._send(response, close=not head.keep_alive, extra=extra)
        return head.keep_alive

    def _preflight(self, cors: CorsPolicy, head: RequestHead) -> bool:
        """Answer a CORS preflight (it carries no token, so before authentication)."""
        answer = cors.preflight(head.headers)
        response = (Response(answer.status) if answer.refused is None
                    else self.server.app.error(answer.status, answer.refused))
        reusable = head.keep_alive and head.length == 0  # a preflight has no body to read
        self._send(response, close=not reusable, extra=answer.headers)
        return reusable

    def _read_body(self, length: int) -> bytes | bytearray | None:
        if len(self.buffer) >= length:
            small, self.buffer = self.buffer[:length], self.buffer[length:]
            return small
        # Memory is committed as bytes arrive, never on the strength of the Content-Length
        # alone: a client announcing 500 MB and sending 1 KB holds 1 KB. Up to
        # _PREALLOCATE one buffer of the body's size is filled in place (no copy).
        body = bytearray(min(length, _PREALLOCATE))
        have = len(self.buffer)
        body[:have] = self.buffer
        self.buffer = b""
        while have < length:
            if have == len(body):
                body.extend(bytes(min(len(body), length - have)))  # doubles, amortised
            with memoryview(body) as view:
                received = self.sock.recv_into(view[have:min(len(body), have + _RECV)])
            self.last_active = time.monotonic()
            if not received:
                return None
            have += received
        return body

    def _send(self, response: Response, *, close: bool,
              extra: Mapping[str, str] | None = None) -> None:
        if extra:
            response = replace(response, headers={**response.headers, **extra})
        # One write: a response split over two small writes would wait on a delayed ACK.
        self.sock.sendall(_encode(response, self.server.server_name, close=close))


def _listen_tcp(address: tuple[str, int]) -> socket.socket:
    """A TCP listener on ``address``; OSError names the address (as its ``filename``)."""
    try:
        return socket.create_server(address, reuse_port=False)
    except OSError as exc:
        host, port = address
        # create_server's strerror repeats the address; the system's own reason is enough.
        # A negative errno is getaddrinfo's: the host is no address of this machine.
        reason = (os.strerror(exc.errno) if exc.errno and exc.errno > 0
                  else "not an address of this host")
        raise OSError(exc.errno, reason, f"{host}:{port}") from exc


def _listen_unix(path: Path) -> socket.socket:
    """A Unix socket listener at ``path`` (mode 0660); OSError names the path."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)
        listener.bind(str(path))
        path.chmod(0o660)
        listener.listen()
    except OSError as exc:
        listener.close()
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    return listener


def _encode(response: Response, server_name: str, *, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {response.status.value} {response.status.phrase}",
             f"Server: {server_name}",
             # A 204 has no content, so neither a type nor a length (RFC 9110 8.6, 15.3.5).
             *(() if response.status == HTTPStatus.NO_CONTENT else (
                 f"Content-Type: {response.content_type}",
                 f"Content-Length: {len(response.body)}")),
             *(f"{key}: {value}" for key, value in response.headers.items())]
    if close:
        lines.append("Connection: close")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + response.body
