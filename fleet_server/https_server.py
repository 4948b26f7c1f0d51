"""HTTPS serving shared by the operator API and the bundle endpoint: a threading HTTP server
whose TLS handshakes happen in each connection's own thread, with a bound on connections.
"""

from __future__ import annotations

import logging
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from transport.mqtt import TLSIdentity

from .errors import ApiError

__all__ = ["BoundedHTTPSServer", "server_context"]

log = logging.getLogger(__name__)


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

    The TLS handshake happens in the connection's own thread, under its timeout, so a
    client that never finishes one holds only its own slot, not the accepting loop.
    ``name`` says which server in log lines."""

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

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # Answering would need a TLS handshake, i.e. the very thread there is no room
            # for: the client sees the connection closed and retries later.
            log.warning("%s: %d connections open, refusing one from %s", self._name,
                        self._max, client_address)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            try:
                request.settimeout(self._timeout)
                request.do_handshake()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                log.debug("%s: TLS handshake with %s failed: %s", self._name, client_address,
                          exc)
                self.shutdown_request(request)
                return
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
