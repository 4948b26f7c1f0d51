"""The fleet service's MQTT session: one paho client with the server's identity, subscribed
to what every device sends, publishing what the server sends to devices.

:class:`DeviceLink` hands each device message to the ingest thread (:mod:`fleet_server.ingest`),
which acknowledges it only once it is committed, or, for a chunk request, answers it at once
on paho's network thread (:mod:`fleet_server.chunk_server`). The client keeps a persistent
session (messages sent while the server is down wait on the broker) and reconnects with
back-off by itself; after every connection the service's ``on_connected`` publishes every
device's desired state again, since a broker that crashed may have lost retained messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from protocol.errors import ProtocolError
from protocol.messages import MAX_DEVICE_MESSAGE_BYTES
from protocol.topics import CHUNK_LEAF, CHUNK_REQUEST_LEAF, device_topic
from transport.mqtt import close_client, wait_published

from .chunk_server import ChunkServer
from .errors import RegistryError
from .ingest import Inbound, Ingest

__all__ = ["MAX_INBOUND_PACKET_BYTES", "DeviceLink"]

log = logging.getLogger(__name__)

#: Device -> server leaves the service subscribes to, for every device (``+``). All of
#: ``outbox/#``, not only chunk requests, so a request this server does not know (a newer
#: agent) is recorded as a protocol error instead of vanishing.
_INGEST_LEAVES = ("reported", "events", "telemetry", "outbox/#")
#: The largest MQTT packet the service's client accepts (announced in its CONNECT, MQTT 5):
#: the largest device message plus room for its topic (fleet and device ids are at most 64
#: characters each) and properties. The broker drops a bigger message instead of handing
#: it on, so a device publishing 200 MB costs the broker, not every server process; one
#: that is too big by less than the room reaches the ingest, which records it refused.
MAX_INBOUND_PACKET_BYTES = MAX_DEVICE_MESSAGE_BYTES + 16 * 1024
_RECONNECT_MIN_S = 1
_RECONNECT_MAX_S = 30
#: MQTT 5 DISCONNECT reason "Session taken over": a client with the same id connected.
#: Newer brokers send it (EMQX, Mosquitto after 2.0.11); 2.0.11 only closes the socket,
#: hence also the registry's claim on the identity (fleet_server.instance_claim).
_SESSION_TAKEN_OVER = 0x8E


class DeviceLink:
    """The server's side of the device protocol on one MQTT client (module docstring).

    ``client`` is not connected yet; :meth:`start` starts its network thread. Thread-safe:
    :meth:`publish` is called from any thread, :meth:`ack` from the ingest thread.
    """

    def __init__(self, client: Client, fleet: str, *, name: str, shared_subscriptions: bool,
                 protocol: MQTTProtocolVersion, on_connected: Callable[[], object]) -> None:
        """``name`` is the client's identity (its certificate's CN), for the log;
        ``on_connected`` runs on the network thread after every connection (an exception
        it raises is logged)."""
        self._fleet = fleet
        self._name = name
        self._shared = shared_subscriptions
        self._protocol = protocol
        self._on_connected = on_connected
        self._connected = threading.Event()
        self._connect_failure: str | None = None
        self._ingest: Ingest | None = None
        self._chunks: ChunkServer | None = None
        #: When (time.time()) the connection to the broker was lost; None while connected.
        self.disconnected_since: float | None = None
        # Counts connections, so a message is not acknowledged on a later connection than
        # the one it came on (the broker re-sends unacknowledged ones after a reconnect).
        self._generation = 0
        # Publishes in flight, by message id: their leaf, to name what the broker refused.
        # A PUBACK may be read before publish() returns (the network thread is faster);
        # its refusal then waits in _early_refusals for publish() to report it.
        self._leaves: dict[int, str] = {}
        self._early_refusals: dict[int, ReasonCode] = {}
        self._leaves_lock = threading.Lock()
        #: Kinds of refusal already logged ("publish desired", "subscribe events"): each is
        #: logged once, loudly, not once per message.
        self._refusals_logged: set[str] = set()
        self._unsubscribed = threading.Event()
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_publish = self._on_publish
        client.reconnect_delay_set(_RECONNECT_MIN_S, _RECONNECT_MAX_S)
        # Stored messages are acknowledged by the ingest thread once committed.
        client.manual_ack_set(True)
        self._client: Client | None = client

    def start(self, ingest: Ingest, chunks: ChunkServer, timeout: float) -> bool:
        """Hand device messages to ``ingest`` and ``chunks`` from now on, start the network
        thread and wait up to ``timeout`` seconds for the first connection (False if none:
        :attr:`connect_failure` says why, if known)."""
        if self._client is None:
            raise RuntimeError("the device link is closed")
        self._ingest, self._chunks = ingest, chunks
        self._client.loop_start()
        return self._connected.wait(timeout)

    def detach(self) -> None:
        """Stop handing on device messages: any arriving from now on stay unacknowledged,
        and the broker delivers them again on the next start."""
        self._ingest = self._chunks = None

    def release_share(self, timeout: float = 5.0) -> None:
        """Leave the shared subscription (a clean stop): the broker then gives every device
        message to the other server processes, instead of queueing this one's turn in its
        persistent session until it comes back, which a retired instance never does. Call
        before :meth:`detach`, so what arrived before the broker's answer is still stored.
        Nothing happens without shared subscriptions or while disconnected (a killed
        process keeps its share until it starts again: docs/scale.md)."""
        client = self._client
        if client is None or not self._shared or not client.is_connected():
            return
        self._unsubscribed.clear()
        result, _ = client.unsubscribe(self._topics())
        if result == 0 and not self._unsubscribed.wait(timeout):
            log.warning("the broker did not answer the unsubscription from the shared "
                        "subscription within %.0f s; this instance may keep its share of "
                        "device messages until it starts again", timeout)
        elif result == 0:
            log.info("left the shared subscription: the other server processes take every "
                     "device message now")

    def close(self) -> None:
        """Disconnect and stop the network thread. Idempotent."""
        client, self._client = self._client, None
        if client is not None:
            if client.is_connected():
                # The broker handles a connection's packets in order: once it answered this,
                # it has read every acknowledgement before it. An embedded broker stopped
                # right after could otherwise die first and deliver those messages again.
                wait_published(client.publish(
                    f"edgefleet/{self._fleet}/server/flush", b"", qos=1))
            close_client(client)
        self._connected.clear()

    @property
    def connected(self) -> bool:
        """Whether the client is connected right now."""
        return self._connected.is_set()

    @property
    def connect_failure(self) -> str | None:
        """Why the last connection attempt failed, None if it did not."""
        return self._connect_failure

    def publish(self, device_id: str, leaf: str, payload: bytes, *,
                retain: bool = False) -> None:
        """Queue ``payload`` on the device's ``leaf`` topic, QoS 1."""
        client = self._client
        if client is None:
            raise RuntimeError("the fleet service is not started")
        # While disconnected paho keeps QoS 1 messages and sends them on reconnect; desired
        # states are re-published on every connection anyway.
        info = client.publish(device_topic(self._fleet, device_id, leaf), payload, qos=1,
                              retain=retain)
        with self._leaves_lock:
            refused = self._early_refusals.pop(info.mid, None)
            if refused is None:
                self._leaves[info.mid] = leaf
        if refused is not None:
            self._log_refusal(f"publish {leaf}", refused)

    def ack(self, inbound: Inbound) -> None:
        """Acknowledge a device message to the broker (if it came on this connection)."""
        client = self._client
        if client is not None and inbound.generation == self._generation:
            client.ack(inbound.mid, inbound.qos)

    # --- MQTT callbacks (paho's network thread) ---

    def _on_connect(self, client: Client, _userdata: object, flags: ConnectFlags,
                    reason: ReasonCode, _properties: Properties | None) -> None:
        if reason.is_failure:
            self._connect_failure = f"the broker refused the connection: {reason}"
            log.warning("broker refused the connection: %s", reason)
            return
        self._connect_failure = None
        self._generation += 1
        self.disconnected_since = None
        # No-local: the server's own publishes (clearing a device's retained message) must
        # not come back to it as if a device had sent them. Retain-as-published: a device's
        # retained message arrives marked retained also when the server is subscribed
        # already, so it can be refused (_refuse_retained).
        # A shared subscription may not ask for no-local (MQTT 5, 3.8.3.1); the server's
        # own clearing publishes (empty) are then dropped in _on_message.
        options = SubscribeOptions(qos=1, noLocal=not self._shared, retainAsPublished=True)
        topics = self._topics()
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            client.subscribe([(topic, options) for topic in topics])
        else:  # 3.1.1 has QoS only; a device's retained message then arrives retained only
            # when the server subscribes, and is refused the same way
            client.subscribe([(topic, 1) for topic in topics])
        try:
            self._on_connected()
        except Exception:
            # A database outage must not kill the network thread; the next connection
            # (or publish) sends the states again.
            log.exception("could not re-publish desired states after connecting")
        log.info("connected to the broker (session %s)",
                 "resumed" if flags.session_present else "new")
        self._connected.set()

    def _on_connect_fail(self, _client: Client, _userdata: object) -> None:
        self._connect_failure = "the TCP or TLS connection failed"

    def _on_disconnect(self, _client: Client, _userdata: object, _flags: DisconnectFlags,
                       reason: ReasonCode, _properties: Properties | None) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            self.disconnected_since = time.time()
        if reason.value == _SESSION_TAKEN_OVER:
            # Another client connected with this identity, and the broker dropped this one;
            # the two will keep taking the session from each other, each reconnecting.
            log.error("the broker dropped this connection because another client connected "
                      "as %s (session taken over): two server processes run with the same "
                      "identity (the same --instance name, or none, on two data "
                      "directories). Give each process its own --instance name, or stop "
                      "one; reconnecting meanwhile", self._name)
        elif was and self._client is not None:
            log.warning("lost the broker connection (%s); reconnecting", reason)

    def _on_subscribe(self, _client: Client, _userdata: object, _mid: int,
                      reasons: list[ReasonCode], _properties: Properties | None) -> None:
        for leaf, reason in zip(_INGEST_LEAVES, reasons, strict=False):
            if reason.is_failure:
                self._log_refusal(f"subscribe {leaf}", reason)

    def _on_unsubscribe(self, _client: Client, _userdata: object, _mid: int,
                        _reasons: list[ReasonCode], _properties: Properties | None) -> None:
        self._unsubscribed.set()

    def _on_publish(self, _client: Client, _userdata: object, mid: int, reason: ReasonCode,
                    _properties: Properties | None) -> None:
        with self._leaves_lock:
            leaf = self._leaves.pop(mid, None)
            if leaf is None and reason.is_failure:
                self._early_refusals[mid] = reason
        if leaf is not None and reason.is_failure:
            self._log_refusal(f"publish {leaf}", reason)

    def _log_refusal(self, kind: str, reason: ReasonCode) -> None:
        """The broker refused a subscription or a publish (its ACL does not grant this
        identity the topic, most likely): log it once per kind, as an error."""
        if kind in self._refusals_logged:
            return
        self._refusals_logged.add(kind)
        action, _, leaf = kind.partition(" ")
        log.error("the broker refused to let %s %s device topics (%s: %s): messages of that "
                  "kind are lost. Grant this identity the fleet's topics%s in the broker's "
                  "ACL (docs/scale.md, 'External brokers'); logged once", self._name, action,
                  leaf, reason, " and the shared subscription" if self._shared else "")

    def _topics(self) -> list[str]:
        """The filters the service subscribes to (through the shared subscription if
        enabled), in the order of _INGEST_LEAVES."""
        prefix = f"$share/edgefleet-{self._fleet}/" if self._shared else ""
        return [prefix + device_topic(self._fleet, "+", leaf) for leaf in _INGEST_LEAVES]

    def _on_message(self, _client: Client, _userdata: object, message: MQTTMessage) -> None:
        prefix = device_topic(self._fleet, "", "")[:-1]  # "edgefleet/{fleet}/devices/"
        device, _, leaf = message.topic.removeprefix(prefix).partition("/")
        inbound = Inbound(device, leaf, bytes(message.payload), message.mid, message.qos,
                          self._generation)
        ingest, chunks = self._ingest, self._chunks
        if ingest is None or chunks is None:
            return  # stopping: unacknowledged, the broker delivers it again
        if message.retain and not inbound.payload:
            self.ack(inbound)  # a retained message cleared, by this or another server
            return
        if message.retain:
            self._refuse_retained(message.topic, inbound, ingest)
            return
        if leaf != CHUNK_REQUEST_LEAF:
            ingest.put(inbound)  # stored, then acknowledged, by the ingest thread
            return
        # Chunk requests are answered here, at once: nothing to store.
        try:
            frame = chunks.answer(device, inbound.payload)
            if frame is not None:
                self.publish(device, CHUNK_LEAF, frame)
        except (ProtocolError, RegistryError) as exc:
            ingest.put(replace(inbound, error=exc))  # to record as a protocol error
            return
        except Exception:
            # The database is down, or a bug: log it and keep serving the other devices.
            log.exception("failed to answer a chunk request of %s", device)
        self.ack(inbound)

    def _refuse_retained(self, topic: str, inbound: Inbound, ingest: Ingest) -> None:
        """Devices never publish retained messages: one would stay on the broker (and come
        back at every subscription) however large. Clear it and record why."""
        client = self._client
        clearing = None
        if client is not None and inbound.payload:
            clearing = client.publish(topic, b"", qos=1, retain=True)
        error = ProtocolError("devices must not publish retained messages; it was cleared")
        ingest.put(replace(inbound, error=error, clearing=clearing))
