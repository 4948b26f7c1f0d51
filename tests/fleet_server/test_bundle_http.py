"""The bundle endpoint of a real fleet service: HTTPS with device certificates, range
requests, only the bundles in a device's desired state, and their URLs in ``desired``."""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fleet_server.ca import FleetCA
from fleet_server.service import FleetService, ServiceConfig
from tests.fleet_server.server_env import desired_messages, enroll, wait_until
from transport.mqtt import TLSIdentity

MIRROR = "https://cdn.example.com/fleet/"


@pytest.fixture
def bundle_service(config: ServiceConfig) -> Iterator[FleetService]:
    with FleetService(replace(config, bundle_port=0, bundle_mirrors=(MIRROR,))) as service:
        yield service


def _get(service: FleetService, identity: TLSIdentity | None, path: str,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    context = ssl.create_default_context(cadata=service.ca.cert_pem.decode())
    if identity is not None:
        context.load_cert_chain(identity.cert_file, identity.key_file)
    assert service._bundle_http is not None
    connection = http.client.HTTPSConnection("127.0.0.1", service._bundle_http.port,
                                             context=context, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_a_device_downloads_its_desired_bundle_whole_or_by_range(
        bundle_service: FleetService, bundles: dict[str, bytes], tmp_path: Path) -> None:
    device = enroll(bundle_service, tmp_path, "gw-1")
    other = enroll(bundle_service, tmp_path, "gw-2", group="elsewhere")
    data = bundles["big"]
    record = bundle_service.add_bundle(data)
    bundle_service.publish(record.sha256, devices=["gw-1"])
    path = f"/bundles/{record.sha256}.efb"

    status, headers, body = _get(bundle_service, device.identity, path)
    assert (status, body) == (200, data)
    assert headers["Accept-Ranges"] == "bytes"
    status, headers, body = _get(bundle_service, device.identity, path,
                                 {"Range": "bytes=1000-"})
    assert (status, body) == (206, data[1000:])
    assert headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    status, headers, _ = _get(bundle_service, device.identity, path,
                              {"Range": f"bytes={len(data)}-"})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(data)}"
    # Not desired for gw-2, and unknown: the same answer.
    assert _get(bundle_service, other.identity, path)[0] == 404
    assert _get(bundle_service, device.identity, f"/bundles/{'0' * 64}.efb")[0] == 404
    assert _get(bundle_service, device.identity, "/bundles/../fleet.db")[0] == 404


def test_the_desired_state_lists_the_mirror_then_the_endpoint(
        bundle_service: FleetService, bundles: dict[str, bytes], tmp_path: Path) -> None:
    device = enroll(bundle_service, tmp_path, "gw-1")
    record = bundle_service.add_bundle(bundles["v1"])
    recorder = device.client()
    recorder.subscribe(device.topic("desired"))
    bundle_service.publish(record.sha256, devices=["gw-1"])
    recorder.wait(lambda: any(d.models for d in desired_messages(recorder, device)),
                  "the desired state")
    urls = desired_messages(recorder, device)[-1].models["digits"].urls
    assert bundle_service._bundle_http is not None
    assert urls == (f"{MIRROR}{record.sha256}.efb",
                    f"https://127.0.0.1:{bundle_service._bundle_http.port}/bundles/"
                    f"{record.sha256}.efb")
    recorder.close()


def test_only_the_enrolled_certificate_of_the_fleet_ca_gets_in(
        bundle_service: FleetService, bundles: dict[str, bytes], tmp_path: Path) -> None:
    device = enroll(bundle_service, tmp_path, "gw-1")
    record = bundle_service.add_bundle(bundles["v1"])
    bundle_service.publish(record.sha256, devices=["gw-1"])
    path = f"/bundles/{record.sha256}.efb"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _get(bundle_service, None, path)  # no client certificate: the handshake fails
    stranger = FleetCA.create(tmp_path / "other-ca", "testfleet")
    foreign = stranger.write_identity(stranger.issue_client_cert("gw-1"), tmp_path / "foreign")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _get(bundle_service, foreign, path)  # another CA's certificate for the same id
    # Reset and enrolled again: the old certificate, signed by the CA, is refused.
    bundle_service.reset_device("gw-1")
    again = enroll(bundle_service, tmp_path / "again", "gw-1")
    assert again.enrollment.certificate_pem != device.enrollment.certificate_pem
    assert _get(bundle_service, device.identity, path)[0] == 403
    assert _get(bundle_service, again.identity, path)[0] == 200


def test_a_reset_device_is_refused_at_once_before_any_re_enrolment(
        bundle_service: FleetService, bundles: dict[str, bytes], tmp_path: Path) -> None:
    """The reset alone refuses the old certificate, not only a later enrolment that
    replaces its fingerprint: the endpoint does not read the CRL, only the registry."""
    device = enroll(bundle_service, tmp_path, "gw-1")
    record = bundle_service.add_bundle(bundles["v1"])
    bundle_service.publish(record.sha256, devices=["gw-1"])
    path = f"/bundles/{record.sha256}.efb"
    assert _get(bundle_service, device.identity, path)[0] == 200
    bundle_service.reset_device("gw-1")
    assert _get(bundle_service, device.identity, path)[0] == 403


def test_each_download_is_authorized_against_the_registry_of_now(
        bundle_service: FleetService, bundles: dict[str, bytes], tmp_path: Path) -> None:
    """Whatever the endpoint keeps between requests, it never serves a bundle before it is
    desired, nor to a certificate that was replaced since the last download."""
    device = enroll(bundle_service, tmp_path, "gw-1")
    first = bundle_service.add_bundle(bundles["v1"])
    second = bundle_service.add_bundle(bundles["v2"])
    bundle_service.publish(first.sha256, devices=["gw-1"])
    path = f"/bundles/{second.sha256}.efb"
    assert _get(bundle_service, device.identity, path)[0] == 404  # stored, not desired
    bundle_service.publish(second.sha256, devices=["gw-1"])
    status, _, body = _get(bundle_service, device.identity, path)
    assert (status, body) == (200, bundles["v2"])
    # v1 is no longer desired but was: it stays fetchable (as over MQTT).
    assert _get(bundle_service, device.identity, f"/bundles/{first.sha256}.efb")[0] == 200
    # Downloads just succeeded; the device is reset and enrolled again: the very next
    # request with the old certificate is refused, the new one gets both bundles.
    bundle_service.reset_device("gw-1")
    again = enroll(bundle_service, tmp_path / "again", "gw-1")
    assert _get(bundle_service, device.identity, path)[0] == 403
    assert _get(bundle_service, again.identity, path)[0] == 200
    assert _get(bundle_service, again.identity, f"/bundles/{first.sha256}.efb")[0] == 200


def _session_get(service: FleetService, context: ssl.SSLContext, path: str,
                 session: ssl.SSLSession | None) -> tuple[int, ssl.SSLSession | None, bool]:
    """GET on a new connection offering ``session`` (made with ``context``): (status, the
    session to resume next time, whether this one was resumed)."""
    assert service._bundle_http is not None
    raw = socket.create_connection(("127.0.0.1", service._bundle_http.port), timeout=10)
    with context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while data := sock.recv(65536):
            answer += data
        return int(answer.split()[1]), sock.session, bool(sock.session_reused)


def test_a_device_resumes_its_tls_session_and_is_still_checked(
        bundle_service: FleetService, bundles: dict[str, bytes], tmp_path: Path) -> None:
    """A device reconnecting after a cut skips the full handshake with its session ticket;
    the registry check still applies to the certificate the session carries."""
    device = enroll(bundle_service, tmp_path, "gw-1")
    record = bundle_service.add_bundle(bundles["v1"])
    bundle_service.publish(record.sha256, devices=["gw-1"])
    path = f"/bundles/{record.sha256}.efb"
    context = ssl.create_default_context(cadata=bundle_service.ca.cert_pem.decode())
    context.load_cert_chain(device.identity.cert_file, device.identity.key_file)
    status, session, resumed = _session_get(bundle_service, context, path, None)
    assert (status, resumed) == (200, False)
    assert session is not None
    status, again, resumed = _session_get(bundle_service, context, path, session)
    assert (status, resumed) == (200, True)
    # Reset and enrolled again: the old certificate's session resumes, and is refused.
    bundle_service.reset_device("gw-1")
    enroll(bundle_service, tmp_path / "again", "gw-1")
    status, _, resumed = _session_get(bundle_service, context, path, again)
    assert (status, resumed) == (403, True)


def test_clients_that_drop_mid_download_cost_no_traceback(
        bundle_service: FleetService, bundles: dict[str, bytes], tmp_path: Path,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    device = enroll(bundle_service, tmp_path, "gw-1")
    record = bundle_service.add_bundle(bundles["big"])
    bundle_service.publish(record.sha256, devices=["gw-1"])
    context = ssl.create_default_context(cadata=bundle_service.ca.cert_pem.decode())
    context.load_cert_chain(device.identity.cert_file, device.identity.key_file)
    assert bundle_service._bundle_http is not None
    port = bundle_service._bundle_http.port
    request = (f"GET /bundles/{record.sha256}.efb HTTP/1.1\r\nHost: x\r\n\r\n").encode()
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG):
        for n in range(8):
            raw = socket.create_connection(("127.0.0.1", port))
            # Closed with a reset, and without TLS's close_notify: the server's next write
            # fails (broken pipe, reset, or a TLS EOF).
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
            tls.sendall(request if n % 2 else request[:20])  # some cut short mid-request
            if n % 2:
                tls.recv(1024)
            tls.close()  # wrap_socket took raw's descriptor
        # Every dropped connection has ended by the time a whole download is served (a
        # thread per connection; wait for them to be gone).
        wait_until(lambda: not bundle_service._bundle_http._httpd._open,  # type: ignore[union-attr]
                   "the dropped connections closed")
        assert _get(bundle_service, device.identity,
                    f"/bundles/{record.sha256}.efb")[::2] == (200, bundles["big"])
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert any("ended" in r.getMessage() for r in caplog.records)  # one debug line each
    # A real error keeps its traceback, in the log.
    caplog.clear()
    httpd = bundle_service._bundle_http._httpd
    assert httpd is not None
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        httpd.handle_error(None, ("127.0.0.1", 1))
    [logged] = caplog.records
    assert logged.levelno == logging.ERROR
    assert logged.exc_info is not None
