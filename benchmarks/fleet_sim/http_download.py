"""A simulated device's bundle download over HTTP(S), as agent/http_fetch.py does it on the
wire: one GET with the device's client certificate, resumed with ``Range`` from the first
missing byte after a broken connection, bounded by the bundle's size."""

from __future__ import annotations

import hashlib
import http.client
import ssl
from typing import Any
from urllib.parse import urlsplit

#: Tries of one URL while the connection breaks (agent/http_fetch.py: 5).
ATTEMPTS = 5


def http_download(url: str, context: ssl.SSLContext, size: int) -> tuple[Any, int, int]:
    """GET ``url`` whole, resuming with Range after a broken connection: (sha256 hasher,
    body bytes received, bytes received again). Bounded by ``size``; raises OSError or
    HTTPException when it cannot finish."""
    parts = urlsplit(url)
    hasher = hashlib.sha256()
    have = received = 0
    for attempt in range(ATTEMPTS):
        # A mirror may be plain HTTP, as agent/http_fetch.py allows: the hash is checked.
        connection = (http.client.HTTPSConnection(parts.hostname or "", parts.port,
                                                  context=context, timeout=60)
                      if parts.scheme == "https" else
                      http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60))
        try:
            connection.request("GET", parts.path,
                               headers={"Range": f"bytes={have}-"} if have else {})
            response = connection.getresponse()
            if response.status not in (200, 206):
                raise http.client.HTTPException(f"answered {response.status}")
            while have < size:
                data = response.read1(min(1 << 18, size - have))
                if not data:
                    break
                hasher.update(data)
                have += len(data)
                received += len(data)
            if have >= size:
                return hasher, received, received - size
        except (OSError, http.client.HTTPException):
            if attempt == ATTEMPTS - 1:
                raise
        finally:
            connection.close()
    raise http.client.HTTPException(f"stopped at byte {have} of {size}")
