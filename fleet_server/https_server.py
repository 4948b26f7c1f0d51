"""HTTPS serving shared by the operator API and the bundle endpoint: a threading HTTP server
whose TLS handshakes happen in each connection's own thread, with a bound on connections.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from transport.mqtt import TLSIdentity

from .errors import ApiError

__all__ = ["BoundedHTTPSServer", "server_context"]

log = logging.getLogger(__name__)

#: A TLS handshake takes milliseconds; a client that has not finished one by then is idle.
_HANDSHAKE_TIMEOUT_S = 5.0
#: How long a new connection waits for the slot of an idle one closed for it.
_EVICTION_WAIT_S = 1.0
#: What a client going away mid-request raises (ssl.SSLError after the handshake is a
#: TLS stream the client broke: SSLEOFError, SSLZeroReturnError, a bad record).
_CLIENT_GONE = (ConnectionError, TimeoutError, ssl.SSLError)
#: Refused connections are logged at most this often, with their count.
_REFUSAL_LOG_INTERVAL_S = 10.0


def server_context(identity: TLSIdentity) -> ssl.SSLContext:
    """A server's TLS settings: its certificate and key, TLS 1.2 or later."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(identity.cert_file, identity.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ApiError(f"cannot load the certificate {identity.cert_file} and key "
                       f"{identity.key_file} ({exc}); delete them to have them issued "
                       "again") from exc
    return context


class BoundedHTTPSServer(ThreadingHTTPServer):
    """HTTPS with a thread per connection, at most ``max_connections`` of them at once.

    The TLS handshake happens in the connection's own thread, under a short timeout of its
    own, so a client that never finishes one holds only its own slot, not the accepting
    loop. When every slot is taken, the connection idle the longest (mid-handshake, or
    between requests: handlers call :meth:`mark`) is closed to make room, so a flood of
    silent connections cannot lock the operator out; only when every connection is busy
    with a request is the new one refused. ``name`` says which server in log lines."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 max_connections: int, context: ssl.SSLContext, *, timeout: float,
                 name: str) -> None:
        super().__init__(address, handler)
        self.socket = context.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)
        self._max = max_connections
        self._timeout = timeout
        self._name = name
        self._slots = threading.BoundedSemaphore(max_connections)
        self._serving: threading.Thread | None = None
        self._lock = threading.Lock()
        #: Open connections: socket -> (busy with a request, since when: monotonic).
        self._open: dict[Any, tuple[bool, float]] = {}
        self._refused = 0
        self._refusal_logged = 0.0

    def serve_in_background(self) -> None:
        """Serve on a daemon thread named after this server until :meth:`stop`."""
        # A short poll interval: stop() waits up to one for the serving loop to notice.
        self._serving = threading.Thread(target=self.serve_forever, args=(0.05,),
                                         name=self._name, daemon=True)
        self._serving.start()

    def stop(self) -> None:
        """Stop serving, close the socket and wait for the serving thread."""
        self.shutdown()
        self.server_close()
        if self._serving is not None:
            self._serving.join()

    def mark(self, request: Any, busy: bool) -> None:
        """Record whether ``request``'s connection is serving a request or idle."""
        with self._lock:
            if request in self._open:
                self._open[request] = (busy, time.monotonic())

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._evict_idlest()
            if not self._slots.acquire(timeout=_EVICTION_WAIT_S):
                # Answering would need a TLS handshake, i.e. the very thread there is no
                # room for: the client sees the connection closed and retries later.
                self._log_refusal(client_address)
                self.shutdown_request(request)
                return
        with self._lock:
            self._open[request] = (False, time.monotonic())
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            try:
                request.settimeout(min(self._timeout, _HANDSHAKE_TIMEOUT_S))
                request.do_handshake()
                request.settimeout(self._timeout)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                log.debug("%s: TLS handshake with %s failed: %s", self._name, client_address,
                          exc)
                self.shutdown_request(request)
                return
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open.pop(request, None)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A request that raised: a client that went away (reset, broken pipe, TLS cut
        short, timed out: a slow or dropped download, a slowloris) is one debug line; only
        a real error gets a traceback, logged (socketserver would print it to stderr)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, _CLIENT_GONE):
            log.debug("%s: connection from %s ended: %s", self._name, client_address,
                      exc.__class__.__name__ + (f" ({exc})" if str(exc) else ""))
            return
        log.error("%s: request from %s failed", self._name, client_address, exc_info=exc)

    def _evict_idlest(self) -> None:
        with self._lock:
            idle = [(since, sock) for sock, (busy, since) in self._open.items() if not busy]
        if not idle:
            return
        _, sock = min(idle, key=lambda pair: pair[0])
        # Wakes its thread (a read returns), which closes it and frees the slot.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _log_refusal(self, client_address: Any) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= _REFUSAL_LOG_INTERVAL_S:
            log.warning("%s: %d connections busy with requests; refused %d connection(s) "
                        "since the last warning (latest from %s)", self._name, self._max,
                        self._refused, client_address)
            self._refused = 0
            self._refusal_logged = now
