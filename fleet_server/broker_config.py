"""The embedded Mosquitto's files, rendered from one :class:`BrokerConfig` (pure): the
configuration (:func:`render_config`) and the access control list (:func:`render_acl`, usable
on an external Mosquitto too). :mod:`fleet_server.broker` writes them and runs Mosquitto.

Security model (docs/transport.md): the only listener speaks TLS and requires a client
certificate from the fleet CA; the certificate's CN becomes both the MQTT user name and the
client id, so a device cannot pose as another one or take over its session; the ACL lets a
device use only its own subtree and lets the fleet server's identity use the whole fleet.
There is deliberately no plain-text listener, not even on localhost.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from protocol.topics import DEVICE_READS, DEVICE_WRITES, device_topic, fleet_topic_filter
from transport.mqtt import TLSIdentity

from .errors import BrokerError

__all__ = ["SERVER_IDENTITY", "BrokerConfig", "render_acl", "render_config"]

#: Default CN of the fleet server's own MQTT identity: the one client the ACL grants the
#: whole fleet subtree.
SERVER_IDENTITY = "fleet-server"


@dataclass(frozen=True)
class BrokerConfig:
    """Settings of an embedded broker for one fleet."""

    fleet: str
    #: Holds the configuration, ACL, log and persistence database (module docstring).
    data_dir: Path
    #: The broker's files: ``ca_file`` is the fleet CA (client certificates are checked
    #: against it), ``cert_file``/``key_file`` its server certificate
    #: (:meth:`fleet_server.ca.FleetCA.issue_server_cert`).
    tls: TLSIdentity
    #: 0 picks a free port at start (tests, demos); devices need a fixed one, e.g. 8883.
    port: int = 0
    #: Address to listen on; "" listens on every interface, as devices are other machines.
    bind_address: str = ""
    #: CN of the fleet server's client certificate, granted the whole fleet subtree.
    server_identity: str = SERVER_IDENTITY
    #: CNs of further fleet server processes (``fleet serve --instance``), granted the same.
    more_server_identities: tuple[str, ...] = ()
    #: Seconds between saves of the persistence database (it is also saved on a clean
    #: stop); a broker crash loses retained messages and queues changed since the last save.
    autosave_interval: int = 60
    #: QoS 1 messages queued per client beyond those in flight before the broker drops new
    #: ones (Mosquitto's default is 1000). Sized for the fleet server's own session, which
    #: queues the fleet's reports while the server restarts or falls behind in a rollout:
    #: about 14 messages per device per rollout (install events and reports, 330 bytes on
    #: average), 140,000 at 10,000 devices if a server stored none of them meanwhile
    #: (docs/scale.md, "Broker queues"). Mosquitto 2.0's limits are global, not per client:
    #: this count does not bound what a device costs the broker, its byte bound does
    #: (max_queued_bytes), since what is queued for a device is few and large (chunk
    #: frames, desired states). 10,000 until issue 16: a rollout to 10,000 devices lost 350
    #: reports to it.
    max_queued_messages: int = 200_000
    #: QoS 1 messages sent to a client and not yet acknowledged, at most (0: no limit;
    #: Mosquitto's default is 20). Mosquitto 2.0.11 queues the messages beyond the limit
    #: and may then deliver them out of order: a device's newer ``reported`` state could
    #: reach the fleet server before an older one, which would then overwrite it. Without
    #: a limit nothing is queued for a connected client and its messages arrive in order;
    #: TCP's flow control still paces a slow reader.
    max_inflight_messages: int = 0
    #: Bytes of QoS 1 messages in flight to one client; beyond it they queue (next bound).
    #: With no count limit above, this is what keeps a client that stops reading its
    #: socket (while asking for chunks) from growing the broker without bound. Measured
    #: (tests/fleet_server/test_broker.py): a stalled client costs the broker about twice
    #: these two bounds, 77 MiB with 8 + 32 MiB, however much is sent to it (252 MiB for
    #: 128 MiB sent without them). Large enough that the fleet server, which acknowledges
    #: in batches, never reaches it in normal operation (reordering, above).
    max_inflight_bytes: int = 8 * 1024 * 1024
    #: Bytes queued for one client beyond those in flight; more are dropped. Bounds what a
    #: disconnected or stalled client costs the broker in memory and persistence: a
    #: device's queue (2 x (8 + 32) MiB of broker memory at most, measured). The fleet
    #: server's backlog of small messages fits too: 140,000 reports and events of a
    #: 10,000-device rollout are 46 MB, of which a server session holds 8 MiB in flight
    #: and 32 MiB queued; two processes (shared subscriptions) hold twice that.
    max_queued_bytes: int = 32 * 1024 * 1024
    #: Largest MQTT packet anyone may send, in bytes: a bundle chunk frame (at most 4 MiB of
    #: data, protocol.messages) plus headers. A client sending more is disconnected.
    max_packet_size: int = 4 * 1024 * 1024 + 64 * 1024
    #: The fleet CA's certificate revocation list (:attr:`fleet_server.ca.FleetCA.crl_path`):
    #: client certificates it lists are refused at the TLS handshake. None: no CRL.
    crl_file: Path | None = None


def render_acl(fleet: str, server_identity: str = SERVER_IDENTITY,
               more_server_identities: Sequence[str] = ()) -> str:
    """The Mosquitto ACL file for ``fleet`` (usable on an external Mosquitto too).

    ``%u`` is the client's user name, which the listener takes from its certificate CN.
    Mosquitto applies ``pattern`` lines to every client and ``topic`` lines after ``user X``
    to X only; anything not granted is denied. Not a SUBSCRIBE, though: Mosquitto 2.0.11's
    acl_file grants every subscription and checks read access on delivery, so it cannot
    keep a device out of the servers' shared subscription (``$share/...``), where the
    device's turn of each message would be dropped. Shared subscriptions need the dynamic
    security plugin's roles instead (docs/scale.md, "A device must not join the share").
    """
    lines = [f"# edgefleet ACL of fleet {fleet} (docs/transport.md). Generated by",
             "# fleet_server/broker_config.py: change BrokerConfig, not this file.",
             "",
             "# Each device (user name = certificate CN = device id), its own subtree only:"]
    lines += [f"pattern read {device_topic(fleet, '%u', leaf)}" for leaf in DEVICE_READS]
    lines += [f"pattern write {device_topic(fleet, '%u', leaf)}" for leaf in DEVICE_WRITES]
    lines += ["", "# The fleet server (each of its processes): the whole fleet."]
    for identity in (server_identity, *more_server_identities):
        lines += [f"user {identity}", f"topic readwrite {fleet_topic_filter(fleet)}"]
    return "\n".join(lines) + "\n"


def render_config(config: BrokerConfig, port: int) -> str:
    """The ``mosquitto.conf`` (Mosquitto 2.x) of ``config``, listening on ``port``."""
    data = config.data_dir.resolve()
    paths = {"acl_file": data / "acl", "persistence_location": data / "persistence",
             "pid_file": data / "mosquitto.pid",
             "cafile": config.tls.ca_file.resolve(), "certfile": config.tls.cert_file.resolve(),
             "keyfile": config.tls.key_file.resolve(),
             **({"crlfile": config.crl_file.resolve()} if config.crl_file else {})}
    for option, path in paths.items():
        # The config format has no quoting: a line ends the value.
        if "\n" in str(path) or "\r" in str(path):
            raise BrokerError(f"the {option} path {str(path)!r} contains a line break, which "
                              "a mosquitto configuration cannot express; use another path")
    listener = f"listener {port} {config.bind_address}".rstrip()
    return f"""\
# edgefleet broker of fleet {config.fleet}. Generated by fleet_server/broker_config.py at
# every start: change BrokerConfig, not this file.

# Run as the user that started us (the owner of the key files), even when that is root;
# Mosquitto would otherwise switch to the user "mosquitto", which cannot read them.
user {pwd.getpwuid(os.geteuid()).pw_name}
per_listener_settings false
allow_anonymous false
acl_file {paths["acl_file"]}

# Retained messages (desired state) and persistent sessions survive a restart.
persistence true
persistence_location {paths["persistence_location"]}/
autosave_interval {config.autosave_interval}
pid_file {paths["pid_file"]}

# Bounds on what one client can make the broker hold (a device that asks for chunks and
# never reads them, a server that stalls): BrokerConfig says why each is set as it is.
max_queued_messages {config.max_queued_messages}
max_queued_bytes {config.max_queued_bytes}
max_inflight_messages {config.max_inflight_messages}
max_inflight_bytes {config.max_inflight_bytes}
max_packet_size {config.max_packet_size}
# Chunked transfers are request/response: Nagle's algorithm would delay each answer.
set_tcp_nodelay true

log_dest stderr
log_timestamp_format %Y-%m-%dT%H:%M:%S

# The only listener: TLS, a fleet CA certificate required, its CN is the user name and the
# client id (so a device can neither pose as another nor take over another's session).
{listener}
protocol mqtt
cafile {paths["cafile"]}
certfile {paths["certfile"]}
keyfile {paths["keyfile"]}
{f"crlfile {paths['crlfile']}" if "crlfile" in paths else "# no crlfile"}
tls_version tlsv1.2
require_certificate true
use_identity_as_username true
use_username_as_clientid true
"""
