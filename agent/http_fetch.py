"""Downloading a bundle over HTTP(S) with range requests, into a :class:`BundleFetch`.

The desired state may list URLs for a bundle (the fleet server's bundle endpoint, a mirror,
a CDN; :attr:`protocol.messages.DesiredModel.urls`). :func:`download` tries them in order,
asking each for the bytes the partial file lacks (``Range: bytes=N-``), so a download cut
off resumes where it broke, on the same URL while it makes progress and its deadline
allows, else on the next.
When every URL fails the caller asks for chunks over MQTT, from the same partial file.

None of the URLs is trusted: the bytes must hash to the desired sha256 (checked by
:class:`BundleFetch` once complete; a mismatch discards them) and the bundle then passes
its TUF checks. What a hostile or broken server can do is bounded:

- a ``Content-Length`` or ``Content-Range`` that does not fit the bytes asked for is
  refused before any body is read;
- no more than the bundle's missing bytes are ever read, however long the body runs;
- every read has a timeout, and each URL a deadline covering all its attempts
  (``deadline_s``, plus one second per ``min_rate`` bytes missing when it was first
  tried), so a trickling server is left for the next source once the deadline passes,
  however many bytes each attempt brought;
- at most ``max_redirects`` redirects, to http(s) URLs only.

TLS is verified against the system's CAs and the fleet CA, and the device's certificate is
offered to servers that ask for one (the fleet server's endpoint does, to know the device).
"""

from __future__ import annotations

import http.client
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from common.byte_range import parse_content_range
from transport.mqtt import TLSIdentity

from .bundle_fetch import BundleFetch, CorruptFetchError, FetchError

__all__ = ["HttpFetchError", "HttpSettings", "device_context", "download", "download_as_device"]

log = logging.getLogger(__name__)
_BLOCK = 256 * 1024


class HttpFetchError(FetchError):
    """A URL did not deliver the bundle: unreachable, refused, or answering wrongly."""

    transient = True


@dataclass(frozen=True)
class HttpSettings:
    """Bounds on one download."""

    #: Seconds any one connect or read may take.
    timeout_s: float = 20.0
    #: Seconds one URL may take, all its attempts together, plus one per ``min_rate``
    #: bytes missing when it is first tried.
    deadline_s: float = 60.0
    min_rate: float = 32 * 1024
    #: Attempts on one URL while each makes progress (a cut connection resumes) and the
    #: URL's deadline has not passed.
    attempts: int = 5
    max_redirects: int = 3


def device_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS for downloads: the system's CAs and the fleet CA trusted, this device's
    certificate offered."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(ca_file)
    context.load_cert_chain(cert_file, key_file)
    return context


def download(fetch: BundleFetch, urls: Sequence[str], context: ssl.SSLContext | None, *,
             settings: HttpSettings = HttpSettings(),
             stop: threading.Event | None = None,
             clock: Callable[[], float] = time.monotonic) -> bool:
    """Fetch the rest of ``fetch``'s bundle from ``urls``; True once it is complete and
    verified, False when every URL failed (each failure is logged; the partial file stays
    for the next source). ``stop`` set ends the download between blocks."""
    for url in urls:
        deadline = clock() + settings.deadline_s + (fetch.size - fetch.have) / settings.min_rate
        for attempt in range(settings.attempts):
            if stop is not None and stop.is_set():
                return False
            if attempt and clock() > deadline:
                log.warning("bundle from %s: too slow, %d of %d bytes by its deadline; "
                            "trying the next source", _show(url), fetch.have, fetch.size)
                break
            before = fetch.have
            try:
                if _download_once(fetch, url, context, settings=settings, stop=stop,
                                  clock=clock, deadline=deadline):
                    return True
            except CorruptFetchError as exc:
                log.warning("bundle from %s: %s; trying the next source", _show(url), exc)
                break
            except FetchError as exc:
                log.warning("bundle from %s: %s", _show(url), exc)
            if fetch.have <= before:
                break  # no progress: this source is not going to deliver
            log.info("bundle from %s: resuming at byte %d", _show(url), fetch.have)
    return fetch.done


def download_as_device(fetch: BundleFetch, urls: Sequence[str], identity: TLSIdentity,
                       stop: threading.Event) -> bool:
    """The fleet link's download: :func:`download` with the device's TLS ``identity``.

    True once the bundle is complete; False leaves the rest to chunks over MQTT, from where
    the partial file ends, also when the download cannot start or write (unreadable key
    files, a full disk: logged)."""
    try:
        context = device_context(str(identity.ca_file), str(identity.cert_file),
                                 str(identity.key_file))
        done = download(fetch, urls, context, stop=stop)
    except OSError as exc:
        log.error("cannot download bundle %s: %s", fetch.sha256[:12], exc)
        done = False
    if not done and not stop.is_set():
        log.info("bundle %s: %d of %d bytes over HTTP; asking for the rest over MQTT",
                 fetch.sha256[:12], fetch.have, fetch.size)
    return done


def _download_once(fetch: BundleFetch, url: str, context: ssl.SSLContext | None, *,
                   settings: HttpSettings, stop: threading.Event | None,
                   clock: Callable[[], float], deadline: float) -> bool:
    """One GET (following redirects) of the bytes ``fetch`` lacks, until ``deadline``;
    True when complete."""
    for _ in range(settings.max_redirects + 1):
        connection, response = _get(url, fetch, context, settings)
        try:
            location = response.getheader("Location")
            if response.status in (301, 302, 303, 307, 308) and location:
                url = urljoin(url, location)
                if urlsplit(url).scheme not in ("http", "https"):
                    raise HttpFetchError(f"redirected to {_show(url)}, not an http(s) URL")
                continue
            return _read_body(fetch, response, stop, clock, deadline)
        except (OSError, http.client.HTTPException) as exc:
            raise HttpFetchError(f"the download broke off at byte {fetch.have} ({exc})") from exc
        finally:
            connection.close()
    raise HttpFetchError(f"more than {settings.max_redirects} redirects")


def _get(url: str, fetch: BundleFetch, context: ssl.SSLContext | None,
         settings: HttpSettings) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpFetchError(f"{_show(url)} is not an http(s) URL")
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname, parts.port,
                                                 timeout=settings.timeout_s,
                                                 context=context)
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port,
                                                timeout=settings.timeout_s)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"Range": f"bytes={fetch.have}-{fetch.size - 1}"} if fetch.have else {}
    try:
        connection.request("GET", target, headers=headers)
        return connection, connection.getresponse()
    except (OSError, http.client.HTTPException, ssl.CertificateError) as exc:
        connection.close()
        raise HttpFetchError(f"cannot get it ({exc})") from exc


def _read_body(fetch: BundleFetch, response: http.client.HTTPResponse,
               stop: threading.Event | None, clock: Callable[[], float],
               deadline: float) -> bool:
    """Check the answer's status and lengths against what was asked, then append at most
    the missing bytes to ``fetch``."""
    if response.status == 200:
        if fetch.have:
            log.info("the server sent the whole bundle instead of a range; starting over")
            fetch.restart()
    elif response.status == 206:
        byte_range = parse_content_range(response.getheader("Content-Range"))
        if (byte_range is None or byte_range.start != fetch.have
                or byte_range.total != fetch.size):
            raise HttpFetchError(f"asked for bytes {fetch.have}- of {fetch.size}, answered "
                                 f"{response.getheader('Content-Range')!r}")
    else:
        raise HttpFetchError(f"answered {response.status} {response.reason}"[:200])
    missing = fetch.size - fetch.have
    length = response.getheader("Content-Length")
    if length is not None and (not length.isdigit() or int(length) > missing):
        raise HttpFetchError(f"announces {length[:24]} bytes, at most {missing} are missing")
    while missing:
        if stop is not None and stop.is_set():
            return False
        if clock() > deadline:
            raise HttpFetchError(f"too slow: {fetch.have} of {fetch.size} bytes by the "
                                 "deadline")
        try:
            data = response.read1(min(_BLOCK, missing))
        except TimeoutError as exc:
            raise HttpFetchError("no data within the read timeout") from exc
        if not data:
            raise HttpFetchError(f"the body ended at byte {fetch.have} of {fetch.size}")
        missing -= len(data)
        if fetch.append(data):
            return True
    return fetch.done


def _show(url: str) -> str:
    """A URL for a log line: without query (a signed URL's credentials) and bounded."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"[:200]
