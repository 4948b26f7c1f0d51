"""NATS server with MQTT enabled, for tests of the external-broker mode: TLS with client
certificates mapped to users (``verify_and_map``), JetStream (NATS needs it for MQTT
sessions, QoS 1 and retained messages) and the edgefleet ACL as per-user permissions.

NATS subjects are MQTT topics with ``/`` as ``.``, ``+`` as ``*`` and ``#`` as ``>``. A
device needs subscribe permission on ``$MQTT.sub.>`` too: NATS delivers QoS 1 messages
through a JetStream consumer on such a subject. Users are the certificates' subjects (RFC
2253, e.g. ``CN=gw-1,O=edgefleet fleet f``); :meth:`NatsBroker.allow` adds one and
reloads the server, as an operator's tooling would at each enrollment.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509

from protocol.topics import DEVICE_READS, DEVICE_WRITES, device_topic
from transport.mqtt import TLSIdentity

__all__ = ["NatsBroker", "require_nats", "subject", "subjects"]


def require_nats() -> str:
    """The nats-server executable, or the test fails saying how to install it."""
    found = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin")
    if found is None:
        pytest.fail("nats-server is not installed: apt-get install nats-server")
    return found


def subject(topic: str) -> str:
    """The NATS subject of an MQTT topic filter."""
    return topic.replace("/", ".").replace("+", "*").replace("#", ">")


def subjects(topic: str) -> list[str]:
    """The subjects a permission for ``topic`` needs: for ``a/#`` also ``a`` itself, which
    the MQTT filter matches and NATS subscribes to separately."""
    return [subject(topic)] + ([subject(topic[:-2])] if topic.endswith("/#") else [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsBroker:
    """A nats-server in ``directory`` with an MQTT TLS listener using ``tls`` (server
    certificate, key, and the CA client certificates must chain to)."""

    def __init__(self, directory: Path, fleet: str, tls: TLSIdentity) -> None:
        self.directory, self.fleet, self.tls = directory, fleet, tls
        self.port = _free_port()
        self._client_port = _free_port()  # NATS's own protocol, unused by the tests
        self.users: dict[str, dict[str, object]] = {}
        self._process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self.directory / "nats.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def allow(self, cert_pem: bytes, *, device: str | None = None) -> None:
        """Let the certificate's subject in (:meth:`allow_user`)."""
        self.allow_user(x509.load_pem_x509_certificate(cert_pem).subject.rfc4514_string(),
                        device=device)

    def allow_user(self, user: str, *, device: str | None = None) -> None:
        """Let ``user`` (a certificate subject) in: as ``device`` (its own topics), or with
        ``device`` None as a fleet server (the fleet's tree). A running server reloads
        its configuration, which NATS 2.9.10 applies badly to connected certificate-mapped
        MQTT clients (docs/scale.md): add users before their peers connect."""
        if device is None:
            tree = subject(f"edgefleet/{self.fleet}/>")
            permissions = {"publish": [tree], "subscribe": [tree, "$MQTT.sub.>"]}
        else:
            permissions = {
                "publish": [s for leaf in DEVICE_WRITES
                            for s in subjects(device_topic(self.fleet, device, leaf))],
                "subscribe": ["$MQTT.sub.>", *(s for leaf in DEVICE_READS
                                               for s in subjects(device_topic(self.fleet,
                                                                              device, leaf)))]}
        self.users[user] = {"user": user, "permissions": permissions}
        self._write()
        if self._process is not None:
            before = self.log.count("Reloaded")
            self._process.send_signal(signal.SIGHUP)
            self._wait(lambda: self.log.count("Reloaded") > before, "the reload")

    def start(self) -> None:
        self._write()
        with (self.directory / "nats.log").open("ab") as log:
            self._process = subprocess.Popen([require_nats(), "-c",
                                              str(self.directory / "nats.conf")],
                                             stdout=log, stderr=subprocess.STDOUT)
        self._wait(lambda: "Server is ready" in self.log, "nats-server to start")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _write(self) -> None:
        users = list(self.users.values())
        config = {
            "listen": f"127.0.0.1:{self._client_port}",
            "server_name": "edgefleet-test",
            "jetstream": {"store_dir": str(self.directory / "js")},
            "authorization": {"users": users},
            "mqtt": {"listen": f"127.0.0.1:{self.port}", "tls": {
                "cert_file": str(self.tls.cert_file), "key_file": str(self.tls.key_file),
                "ca_file": str(self.tls.ca_file), "verify_and_map": True}},
        }
        # NATS reads JSON as its configuration format too.
        (self.directory / "nats.conf").write_text(json.dumps(config, indent=1))

    def _wait(self, condition: object, what: str, timeout: float = 15.0) -> None:
        assert callable(condition)
        deadline = time.monotonic() + timeout
        while not condition():
            if self._process is not None and self._process.poll() is not None:
                raise AssertionError(f"nats-server exited: {self.log[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.log[-2000:]}")
            time.sleep(0.05)
