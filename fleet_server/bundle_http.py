"""Bundle bytes over HTTPS: ``GET /bundles/{sha256}.efb``, with range requests.

Devices download the bundles of their desired state here rather than in chunks over MQTT
(docs/scale.md): the broker then carries only control messages, and a download resumes
with ``Range: bytes=N-`` where it broke. The endpoint is authenticated like the broker:
TLS 1.2+ with a **client certificate from the fleet CA**, whose CN is the device id, and
which must be the certificate the registry holds for that device (a replaced or reset
device's old certificate is refused, without waiting for a CRL). A device may download the
bundles that are or were in its desired state (as over MQTT,
:mod:`fleet_server.chunk_server`); any other hash, known or not, gets the same 404, so a
device cannot probe the store.

Answers: 200 with the whole bundle, 206 with ``Content-Range`` for a single range, 416 for
a range past the end, 404, 403 for an unknown certificate; ``HEAD`` too. Bytes are read
from the blob in 256 KiB blocks as the socket takes them: memory does not grow with the
number of downloads, and at most :data:`MAX_CONNECTIONS` run at once (the rest are closed
and retried by the device).

Because devices check every bundle against the sha256 in their desired state and then its
TUF signatures, any plain HTTP mirror, CDN or S3-compatible bucket holding the same files
(``DATA/bundles/<sha256>.efb``) serves them as well: the service puts such URL prefixes
before this endpoint's in each desired model's ``urls`` (:func:`bundle_urls`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler
from typing import Any

from common.byte_range import RangeNotSatisfiableError, content_range, parse_range
from transport.mqtt import TLSIdentity

from . import __version__
from .errors import ApiError
from .https_server import BoundedHTTPSServer, server_context
from .registry import BundleRecord, Registry

__all__ = ["MAX_CONNECTIONS", "BundleHttpServer", "bundle_path", "bundle_urls"]

log = logging.getLogger(__name__)

#: Downloads served at once; more connections are closed (the device retries, or asks over
#: MQTT). Each holds one thread and one 256 KiB buffer.
MAX_CONNECTIONS = 256
_BLOCK = 256 * 1024
#: Bundle records kept in memory (a few hundred bytes each).
_MAX_CACHED_BUNDLES = 1024
_TIMEOUT_S = 30.0
_PATH = re.compile(r"/bundles/([0-9a-f]{64})\.efb")


def bundle_path(sha256: str) -> str:
    """The path of a bundle under a URL prefix: the blob's own file name."""
    return f"{sha256}.efb"


def bundle_urls(prefixes: Sequence[str], sha256: str) -> tuple[str, ...]:
    """Each prefix (ending in ``/``) joined with the bundle's file name, in order."""
    return tuple(prefix + bundle_path(sha256) for prefix in prefixes)


class BundleHttpServer:
    """The bundle endpoint on ``https://host:port/bundles/`` (port 0 picks a free one).

    ``tls`` is the server's certificate and key and the CA (``tls.ca_file``) that client
    certificates must chain to. ``start()`` / ``stop()`` or a context manager.
    """

    def __init__(self, registry: Registry, tls: TLSIdentity, *, host: str = "",
                 port: int = 0, max_connections: int = MAX_CONNECTIONS,
                 timeout_s: float = _TIMEOUT_S) -> None:
        self.registry = registry
        self._context = server_context(tls)
        self._context.load_verify_locations(tls.ca_file)
        self._context.verify_mode = ssl.CERT_REQUIRED
        # One TLS 1.3 session ticket per full handshake, not OpenSSL's two: a device resumes
        # with one, and each costs the server some tenths of a millisecond (the session,
        # client certificate included, serialized and encrypted; docs/benchmarks.md
        # "Bundle bytes").
        self._context.num_tickets = 1
        self._host, self._port = host, port
        self._max, self._timeout = max_connections, timeout_s
        self._httpd: BoundedHTTPSServer | None = None
        # Bundle records by content hash: a stored bundle's record never changes and is
        # never deleted, so one registry read per bundle serves every device.
        self._bundles: dict[str, BundleRecord] = {}
        #: Bytes of bundle bodies sent, for benchmarks and logs.
        self.bytes_sent = 0

    @property
    def port(self) -> int:
        """The port it listens on (once started)."""
        if self._httpd is None:
            raise RuntimeError("the bundle endpoint is not started")
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        """Bind and serve in a background thread. ApiError if the address is unusable."""
        handler = type("_BoundHandler", (_Handler,), {"endpoint": self,
                                                      "timeout": self._timeout})
        try:
            httpd = BoundedHTTPSServer((self._host, self._port), handler, self._max,
                                       self._context, timeout=self._timeout,
                                       name="bundle endpoint")
        except OSError as exc:
            raise ApiError(f"cannot listen on {self._host or '*'}:{self._port} for bundle "
                           f"downloads ({exc.strerror}); choose another --bundle-port") from exc
        self._httpd = httpd
        httpd.serve_in_background()
        log.info("bundle downloads on port %d (client certificates of the fleet CA)",
                 self.port)

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.stop()

    def __enter__(self) -> BundleHttpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def authorize(self, device: str, cert_der: bytes, sha256: str) -> BundleRecord | None:
        """The bundle ``device`` (presenting ``cert_der``) may download; None when it may
        not or it does not exist (the same answer). PermissionError when the certificate
        is not the one the registry holds for that device."""
        # One registry read per request, not cached: the certificate must be refused the
        # moment the device is enrolled again, whichever server process enrolled it, and a
        # rollout asks once per device, so a per-device cache would seldom be hit anyway.
        access = self.registry.bundle_access(device, sha256)
        if access is None or access[0] != hashlib.sha256(cert_der).hexdigest():
            raise PermissionError(f"certificate of {device!r} is not the one enrolled; "
                                  "enroll the device again")
        if not access[1]:
            return None
        record = self._bundles.get(sha256)
        if record is None:
            record = self.registry.get_bundle(sha256)
            if record is not None:
                if len(self._bundles) >= _MAX_CACHED_BUNDLES:
                    self._bundles.clear()  # rare (that many bundles in use): start over
                self._bundles[sha256] = record
        return record


class _Handler(BaseHTTPRequestHandler):
    """One download: check the path and the client, then send the (partial) blob."""

    endpoint: BundleHttpServer
    server_version = f"edgefleet/{__version__}"
    protocol_version = "HTTP/1.1"  # keep-alive: a device resumes on the same connection
    _buffer: memoryview | None = None

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        match = _PATH.fullmatch(self.path.split("?", 1)[0])
        if match is None:
            self._status(404, "no such bundle; the path is /bundles/<sha256>.efb")
            return
        sha = match.group(1)
        device, cert = self._client()
        try:
            record = self.endpoint.authorize(device, cert, sha)
        except PermissionError as exc:
            self._status(403, str(exc))
            return
        except Exception:
            log.exception("bundle download of %s: the registry cannot tell", device)
            self._status(503, "the registry is unavailable; retry later")
            return
        if record is None:
            self._status(404, f"bundle {sha} is not available to device {device}")
            return
        try:
            byte_range = parse_range(self.headers.get("Range"), record.size)
        except RangeNotSatisfiableError as exc:
            self._status(416, str(exc), {"Content-Range": f"bytes */{record.size}"})
            return
        start, length = (0, record.size) if byte_range is None else (byte_range.start,
                                                                     byte_range.length)
        try:
            blob = record.path.open("rb")
        except OSError as exc:
            log.error("bundle blob %s is unreadable (%s); re-upload the bundle to repair it",
                      record.path, exc)
            self._status(503, "the server cannot read this bundle right now; retry later")
            return
        with blob:
            self.send_response(200 if byte_range is None else 206)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{sha}"')
            if byte_range is not None:
                self.send_header("Content-Range", content_range(byte_range))
            self.end_headers()
            if body:
                self._copy(blob, start, length)

    def _copy(self, blob: Any, start: int, length: int) -> None:
        # One buffer per connection, read into and written from in place: no new bytes
        # object (and its allocation, page faults and copy) per block. sendfile would save
        # the copy too, but it needs a plain socket: Python's ssl (3.11) writes through
        # OpenSSL, and this kernel offers no kernel TLS (docs/scale.md "Bundles").
        if self._buffer is None:
            self._buffer = memoryview(bytearray(_BLOCK))
        blob.seek(start)
        left = length
        while left:
            n = blob.readinto(self._buffer[:min(_BLOCK, left)])
            if not n:  # the blob shrank: close rather than send a short body silently
                log.error("bundle blob %s ended %d bytes early", blob.name, left)
                self.close_connection = True
                return
            self.wfile.write(self._buffer[:n])
            left -= n
            self.endpoint.bytes_sent += n

    def _client(self) -> tuple[str, bytes]:
        """The device id (certificate CN) and DER certificate of the client."""
        sock: Any = self.connection
        cert = sock.getpeercert() or {}
        der = sock.getpeercert(binary_form=True) or b""
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value), der
        return "", der

    def _status(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        data = (message + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)
