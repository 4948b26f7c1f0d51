"""RabbitMQ's MQTT plugin, for tests of the external-broker mode: the machine's RabbitMQ
(not one the tests start: it is a system service) with the MQTT TLS listener that
``scripts/rabbitmq_mqtt.sh`` configures on 127.0.0.1:8884, client certificates as identity
(``mqtt.ssl_cert_login``, the user name is the certificate's CN).

A test takes the broker with :func:`rabbitmq_mqtt`: it writes its fleet CA and a broker
certificate into the listener's TLS files, clears RabbitMQ's PEM cache so the next handshake
reads them, and holds a lock on that directory meanwhile (two test runs on one machine take
turns). Users and permissions are set with ``rabbitmqctl import_definitions``: every user
may use the vhost's queues; what it may publish and subscribe to is its topic permissions on
``amq.topic``, where MQTT topics are routing keys with ``/`` as ``.``, and ``{username}``
is filled in by RabbitMQ: one rule for every device, as with Mosquitto's patterns.

Skipped, saying why, where RabbitMQ or its MQTT listener is absent.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fleet_server.ca import FleetCA
from protocol.topics import DEVICE_READS, DEVICE_WRITES

__all__ = ["RabbitMqtt", "rabbitmq_mqtt"]

HOST = "127.0.0.1"
PORT = int(os.environ.get("EDGEFLEET_TEST_RABBITMQ_MQTTS_PORT", "8884"))
TLS_DIR = Path(os.environ.get("EDGEFLEET_RABBITMQ_TLS_DIR", "/var/lib/rabbitmq/edgefleet-tls"))
VHOST = "/"


def _routing_key(topic: str) -> str:
    """The regular expression of an MQTT topic filter as an AMQP routing key."""
    escaped = topic.replace(".", "/").replace("/", r"\.")
    return escaped.replace("#", ".*").replace("+", "[^.]+")


def _leaves(fleet: str, leaves: tuple[str, ...]) -> str:
    base = rf"^edgefleet\.{fleet}\.devices\.{{username}}\."
    return base + "(" + "|".join(_routing_key(leaf) for leaf in leaves) + ")$"


class RabbitMqtt:
    """The machine's RabbitMQ MQTT listener, for one fleet."""

    def __init__(self, fleet: str) -> None:
        self.fleet = fleet
        self.url = f"mqtts://{HOST}:{PORT}"
        self.users: list[str] = []

    def allow(self, *names: str, server: bool = False) -> None:
        """Create users ``names`` (the CNs of certificates) with the device ACL, or with
        ``server`` the whole fleet's tree."""
        tree = rf"^edgefleet\.{self.fleet}\..*"
        topics = ([{"user": n, "vhost": VHOST, "exchange": "amq.topic",
                    "write": tree if server else _leaves(self.fleet, DEVICE_WRITES),
                    "read": tree if server else _leaves(self.fleet, DEVICE_READS)}
                   for n in names])
        definitions = {
            "users": [{"name": n, "password": secrets.token_hex(16), "tags": ""}
                      for n in names],
            "permissions": [{"user": n, "vhost": VHOST, "configure": ".*", "write": ".*",
                             "read": ".*"} for n in names],
            "topic_permissions": topics}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(definitions, f)
        try:
            os.chmod(f.name, 0o644)
            _ctl("import_definitions", f.name)
        finally:
            os.unlink(f.name)
        self.users += names

    def remove(self, name: str) -> None:
        """Delete user ``name``: RabbitMQ closes its connections."""
        _ctl("delete_user", name)
        self.users.remove(name)

    def remove_users(self) -> None:
        """Delete every user this made."""
        for name in self.users:
            _ctl("delete_user", name, check=False)
        self.users = []


def _ctl(*args: str, check: bool = True) -> str:
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=120, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
    return done.stdout


def _listening() -> bool:
    try:
        with socket.create_connection((HOST, PORT), timeout=2):
            return True
    except OSError:
        return False


@contextmanager
def rabbitmq_mqtt(ca: FleetCA, fleet: str) -> Iterator[RabbitMqtt]:
    """The machine's RabbitMQ MQTT listener, trusting ``ca`` and presenting a broker
    certificate from it; skips the test where it is not set up."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("RabbitMQ is not installed (apt-get install rabbitmq-server, then "
                    "scripts/rabbitmq_mqtt.sh as root)")
    if not _listening() or not os.access(TLS_DIR, os.W_OK):
        pytest.skip(f"RabbitMQ's MQTT TLS listener is not on {HOST}:{PORT} with its files in "
                    f"a writable {TLS_DIR} (scripts/rabbitmq_mqtt.sh sets it up, as root)")
    with (TLS_DIR / ".edgefleet-test.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tls = ca.write_identity(ca.issue_server_cert(), Path(tempfile.mkdtemp()), "server")
        for source, name in ((tls.ca_file, "ca.crt"), (tls.cert_file, "server.crt"),
                             (tls.key_file, "server.key")):
            shutil.copyfile(source, TLS_DIR / name)
            # RabbitMQ runs as its own user; the key is a throwaway test key.
            shutil.chown(TLS_DIR / name, "rabbitmq", "rabbitmq")
            os.chmod(TLS_DIR / name, 0o600 if name.endswith(".key") else 0o644)
        shutil.rmtree(tls.ca_file.parent)
        _ctl("eval", "ssl:clear_pem_cache().")
        broker = RabbitMqtt(fleet)
        try:
            yield broker
        finally:
            broker.remove_users()
