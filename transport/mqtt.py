"""MQTT connection set-up shared by the fleet server and the agent: the paho adapter.

One place decides how an edgefleet party connects to the broker, so the server and every
device agree: mutual TLS with the fleet CA, client id = certificate CN, and a persistent
session (QoS 1 messages published while a client is away wait for it on the broker). The
topic tree is :mod:`protocol.topics`; the payloads :mod:`protocol.messages`;
docs/transport.md describes both. This is the only module of the project's shared
packages that imports paho-mqtt (the agent and server extras install it).
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from paho.mqtt.client import Client, MQTTMessageInfo
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.defaults import MQTTS_PORT

from .x509 import certificate_common_name

__all__ = [
    "BrokerAddress",
    "ClientSettings",
    "TLSIdentity",
    "close_client",
    "create_client",
    "tls_context",
    "wait_published",
]

@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens for TLS connections."""

    host: str
    port: int = MQTTS_PORT

    @classmethod
    def from_url(cls, url: str) -> BrokerAddress:
        """Parse ``mqtts://host[:port]`` (port 8883 by default; IPv6 as ``[::1]``).

        Raises ValueError for anything else, plain ``mqtt://`` included: devices prove who
        they are with their TLS client certificate, so there is no useful plain-text port.
        """
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"broker URL {url!r} has an invalid port ({exc}); use "
                             "mqtts://host:port with a port from 1 to 65535") from exc
        if parts.scheme != "mqtts" or not parts.hostname:
            raise ValueError(f"broker URL {url!r} is not mqtts://host[:port]; edgefleet "
                             "needs TLS with client certificates, so use mqtts://")
        if parts.username or parts.password or parts.path.strip("/") or parts.query:
            raise ValueError(f"broker URL {url!r} has a user, path or query; clients "
                             "authenticate with certificates: use only mqtts://host[:port]")
        return cls(parts.hostname, port or MQTTS_PORT)

    @property
    def url(self) -> str:
        """The ``mqtts://`` URL of this address (parses back to an equal address)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtts://{host}:{self.port}"


@dataclass(frozen=True)
class TLSIdentity:
    """The files of one mutual-TLS party: the CA it trusts, its certificate and its key.

    ``ca_file`` is the CA that signed the *other* side's certificate: for a client, the CA
    of the broker's server certificate (the fleet CA for the embedded broker).
    """

    ca_file: Path
    cert_file: Path
    key_file: Path

    def common_name(self) -> str:
        """The CN of ``cert_file``: the broker uses it as user name and client id.

        Raises OSError if the file cannot be read, ValueError if it is not a certificate.
        """
        return certificate_common_name(self.cert_file.read_bytes())


@dataclass(frozen=True)
class ClientSettings:
    """How one client connects: where, as whom, and how long its session outlives it."""

    broker: BrokerAddress
    identity: TLSIdentity
    #: MQTT 5 by default; MQTTv311 for brokers without MQTT 5.
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5
    #: Seconds the broker keeps the session (subscriptions, queued QoS 1 messages) after a
    #: disconnect (MQTT 5 only; a 3.1.1 session lasts as long as the broker's configuration
    #: allows). A week covers a weekend outage without keeping dead devices' queues forever.
    session_expiry: int = 7 * 24 * 3600
    keepalive: int = 60
    #: Largest MQTT packet this client accepts, announced in its CONNECT (MQTT 5 only): the
    #: broker drops a message bigger than that instead of sending it (MQTT 5, 3.1.2.11.4),
    #: so a peer's oversized publish never reaches this process's memory. None: no limit.
    max_packet_size: int | None = None


def tls_context(identity: TLSIdentity) -> ssl.SSLContext:
    """A client TLS context: TLS 1.2 or later, the broker verified against
    ``identity.ca_file`` (certificate and host name), ``identity``'s certificate presented.

    Raises OSError (ssl.SSLError included) if a file cannot be read or the key does not
    match the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=identity.ca_file)
    context.load_cert_chain(identity.cert_file, identity.key_file)
    return context


def create_client(settings: ClientSettings) -> Client:
    """A paho-mqtt client for ``settings``, configured but not connected.

    The client id is the certificate's CN; the session is persistent (MQTT 5:
    clean_start=False with a session expiry; 3.1.1: clean_session=False). Host, port and
    those session options are stored in the client (``connect_async``), so every connection
    it makes, reconnects included, resumes the same session: call ``client.reconnect()`` to
    connect now (blocking) or ``client.loop_start()`` to connect and reconnect in the
    background. Do not call ``client.connect(...)``, whose defaults start a clean session.

    Raises OSError if a file of the identity cannot be read or the key does not match the
    certificate, ValueError if the certificate is not a PEM certificate with one CN.
    """
    client_id = settings.identity.common_name()
    context = tls_context(settings.identity)
    address = settings.broker
    if settings.protocol == MQTTProtocolVersion.MQTTv5:
        client = Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=MQTTProtocolVersion.MQTTv5)
        client.tls_set_context(context)
        # paho's Properties has no annotations on __init__.
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = settings.session_expiry
        if settings.max_packet_size is not None:
            properties.MaximumPacketSize = settings.max_packet_size
        client.connect_async(address.host, address.port, settings.keepalive,
                             clean_start=False, properties=properties)
    else:
        client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                        protocol=settings.protocol)
        client.tls_set_context(context)
        client.connect_async(address.host, address.port, settings.keepalive)
    return client


def close_client(client: Client, timeout: float = 5.0) -> None:
    """Disconnect ``client`` cleanly, stop its network thread and drop its callbacks.

    Waits (at most ``timeout`` seconds) until the DISCONNECT is on the wire: paho sends what
    is queued (acknowledgements included) only from its network thread, and stopping that
    thread at once would drop them, so the broker would deliver acknowledged messages
    again and treat the clean stop as a lost connection. Do not call it from a callback.

    paho keeps the socket pair that wakes its network loop open until the client object is
    freed. A client whose callbacks are bound methods of the object that holds it sits in a
    reference cycle, freed only whenever the cycle collector runs (a ResourceWarning then).
    Dropping the callbacks breaks that cycle, so the client's sockets close as soon as its
    owner lets go of it; paho 2.x has no public call that closes them directly.
    """
    sent = threading.Event()
    if client.is_connected():
        previous = client.on_disconnect

        def on_disconnect(*args: Any) -> None:
            sent.set()
            if previous is not None:
                previous(*args)

        client.on_disconnect = on_disconnect
        client.disconnect()
        sent.wait(timeout)
    else:
        client.disconnect()
    client.loop_stop()
    for callback in _CALLBACKS:
        setattr(client, callback, None)


def wait_published(info: MQTTMessageInfo, timeout: float = 10.0) -> bool:
    """Wait (at most ``timeout`` seconds) for the broker to acknowledge a QoS 1 publish;
    False if it did not, or if the message was never queued (no connection)."""
    try:
        info.wait_for_publish(timeout=timeout)
    except (RuntimeError, ValueError):
        return False
    return info.is_published()


#: Every paho 2.x callback property an owner may have set.
_CALLBACKS = ("on_connect", "on_connect_fail", "on_disconnect", "on_message", "on_publish",
              "on_subscribe", "on_unsubscribe", "on_log", "on_pre_connect")
