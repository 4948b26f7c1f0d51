"""The fleet protocol: what the server and the agents say to each other over MQTT.

Topics are :mod:`protocol.topics`' (docs/transport.md); this module fixes the payloads, shared
by both sides so they cannot drift apart. All are JSON objects with ``"protocol": 1``
except bundle chunks, which are binary frames. Decoders validate and raise ProtocolError;
unknown extra fields are ignored so either side can be upgraded first.

=============  ==================  ========================================================
topic leaf     direction           payload
=============  ==================  ========================================================
desired        server -> device    :class:`Desired` (retained): per model, the bundle to run
reported       device -> server    :class:`Reported`: what runs, and each model's last install
events         device -> server    :class:`Event`: one install transition, rejection, error;
                                   ``seq`` (if set) orders and dedupes, as for telemetry;
                                   or an :class:`EventBatch` of several, oldest first, to a
                                   server whose desired state lists
                                   :data:`FEATURE_EVENT_BATCH`
telemetry      device -> server    :class:`Telemetry`: one sample; ``seq`` orders and dedupes
outbox/chunks  device -> server    :class:`ChunkRequest`: bytes [offset, offset+length)
inbox/chunks   server -> device    :class:`Chunk` frame: header + data, or an error
inbox/experiments/{experiment}
               server -> device    :class:`PosteriorPush` (retained): the fleet's merged
                                   posterior of one experiment; empty when it ended
=============  ==================  ========================================================

Bundles travel by pull: the device asks for the chunks it lacks, a few at a time, and
checks each one's sha256 before writing it, so a dropped connection resumes at the first
missing byte and a corrupted chunk is asked for again (docs/transport.md, "Bundle
transfer").
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ProtocolError
from .experiment_messages import PosteriorPush, experiment_declarations
from .fields import (
    PROTOCOL_VERSION,
    as_dict,
    dict_field,
    float_field,
    int_field,
    message_object,
    model_name,
    object_of,
    opt_int,
    opt_sha,
    opt_str,
    sha_field,
    share_field,
    str_field,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEVICE_EVENT_KIND",
    "FEATURE_EVENT_BATCH",
    "MAX_BUNDLE_URLS",
    "MAX_CHUNK_REQUEST_BYTES",
    "MAX_DEVICE_MESSAGE_BYTES",
    "MAX_EVENTS_PER_MESSAGE",
    "MAX_EVENT_BATCH_BYTES",
    "MAX_EVENT_BYTES",
    "MAX_FEATURES",
    "MAX_REPORTED_BYTES",
    "MAX_TELEMETRY_BYTES",
    "MAX_URL_CHARS",
    "PROTOCOL_VERSION",
    "Chunk",
    "ChunkRequest",
    "DeltaOffer",
    "Desired",
    "DesiredModel",
    "DesiredShadow",
    "Event",
    "EventBatch",
    "InstallReport",
    "ModelReport",
    "Reported",
    "Telemetry",
    "decode_chunk",
    "decode_chunk_request",
    "decode_desired",
    "decode_event",
    "decode_events",
    "decode_reported",
    "decode_telemetry",
    "encode",
    "encode_chunk",
]

DEFAULT_CHUNK_BYTES = 256 * 1024
_MAX_CHUNK_BYTES = 4 * 1024 * 1024
#: The largest payload each device -> server message may have; decoders refuse bigger ones
#: before parsing, and senders must stay below. Reports and events are small records;
#: telemetry carries histograms (a few KiB per model); a chunk request is one line.
MAX_REPORTED_BYTES = 64 * 1024
MAX_EVENT_BYTES = 16 * 1024
#: An :class:`EventBatch`: at most this many events, this many bytes in all (each event's
#: ``detail`` still within MAX_EVENT_BYTES).
MAX_EVENTS_PER_MESSAGE = 32
MAX_EVENT_BATCH_BYTES = 64 * 1024
MAX_TELEMETRY_BYTES = 256 * 1024
MAX_CHUNK_REQUEST_BYTES = 4 * 1024
#: The largest payload of any device -> server message (the bound above that is largest):
#: what the fleet server's MQTT client needs to receive, and so what it announces to the
#: broker as its maximum packet size (with room for the topic and properties).
MAX_DEVICE_MESSAGE_BYTES = max(MAX_REPORTED_BYTES, MAX_EVENT_BATCH_BYTES, MAX_TELEMETRY_BYTES,
                               MAX_CHUNK_REQUEST_BYTES)
#: Kinds of event a device may send (docs/transport.md). The server stores them under its
#: own ``agent.`` namespace, so a device can never write an event that reads as the
#: server's (``device.enrolled``, ``desired.set``).
DEVICE_EVENT_KIND = re.compile(
    r"offline|protocol_error|fetch\.(?:started|failed)|install\.[a-z_]{1,32}"
    r"|shadow\.(?:loaded|failed|unloaded)|model\.switched_back")
#: Bounds on a desired model's ``urls``: how many, and how long each.
MAX_BUNDLE_URLS = 8
MAX_URL_CHARS = 2048
#: Features a desired state may list (:attr:`Desired.features`), at most, each a short name.
MAX_FEATURES = 16
_MAX_FEATURE_CHARS = 64
#: The server stores ``events`` messages carrying an :class:`EventBatch`.
FEATURE_EVENT_BATCH = "events.batch"
_URL = re.compile(r"https?://[^\s/?#]+(?:/[^\s]*)?")
_MAGIC = b"EFC1"
_HEADER = struct.Struct(">4sI")


@dataclass(frozen=True)
class DeltaOffer:
    """A smaller bundle of the same release for a device that runs ``base_version``: it
    carries the deltas from that version instead of the artifacts (docs/bundle-format.md
    §8). The device may take it, or the full bundle if its stored base is missing or
    damaged."""

    bundle_sha256: str
    size: int
    base_version: int


@dataclass(frozen=True)
class DesiredShadow:
    """A candidate a device stages beside the model it serves and runs on a share of live
    requests off the request path, reporting how its answers compare (never served)."""

    version: int
    bundle_sha256: str
    size: int
    sample_rate: float  # share of requests also run on the candidate, in (0, 1]


@dataclass(frozen=True)
class DesiredModel:
    """One model a device should run: the bundle (by sha256) holding that version.

    ``shadow``: a candidate to run in shadow beside it (rollouts' shadow phase).
    ``compare_previous``: share of requests, in [0, 1], also run on the version this one
    replaced, kept loaded while it is above 0 (so that a return to it is immediate) and
    compared with the served answers (rollouts' agreement gate).
    ``delta``: a delta bundle of the same release, when the server has one for the version
    the device runs.
    ``urls``: HTTP(S) addresses of the bundle's bytes, in order of preference (the fleet
    server's bundle endpoint, a mirror, a CDN); the device tries them with range requests
    before asking for chunks over MQTT. They need no trust: the bytes must hash to
    ``bundle_sha256`` and then pass the bundle's signature checks (docs/scale.md).
    """

    version: int
    bundle_sha256: str
    size: int
    shadow: DesiredShadow | None = None
    compare_previous: float = 0.0
    delta: DeltaOffer | None = None
    urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class Desired:
    """Everything a device should run; models absent here are left as they are."""

    models: Mapping[str, DesiredModel]
    issued_at: float
    #: The experiments the device takes part in, each the JSON object of
    #: ``experiments.spec.spec_to_json`` (checked here for size and names only: the agent
    #: parses it with ``spec_from_json``). Every arm's model is among ``models``. An
    #: experiment absent here is over on the device.
    experiments: tuple[Mapping[str, Any], ...] = ()
    #: What the server accepts beyond this protocol's base messages (:data:`FEATURE_EVENT_BATCH`),
    #: so that a newer agent sends them only to a server that understands them. Names this
    #: side does not know are kept and ignored.
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelReport:
    """A model the device serves."""

    version: int
    bundle_sha256: str | None  # None for a model installed outside the fleet
    state: str  # an InstallState value: "committed", or "probation" while on trial


@dataclass(frozen=True)
class InstallReport:
    """The latest install of one model, finished or not."""

    version: int | None
    bundle_sha256: str | None
    state: str  # an InstallState value (protocol.install_states)
    reason: str | None = None
    detail: str | None = None
    progress: float | None = None  # fraction of the bundle fetched, while downloading


@dataclass(frozen=True)
class Reported:
    """What a device runs and how its latest installs went."""

    profile: str | None
    agent_version: str
    models: Mapping[str, ModelReport]
    installs: Mapping[str, InstallReport] = field(default_factory=dict)
    at: float = 0.0


@dataclass(frozen=True)
class Event:
    """Something that happened on a device, for the server's event log.

    ``seq`` numbers the device's outgoing messages, telemetry and events alike (unique per
    device, increasing): the server stores an event whose (device, seq) it already has only
    once. None for an event sent outside that sequence (the MQTT will, an older agent).
    """

    kind: str
    at: float
    detail: Mapping[str, Any] = field(default_factory=dict)
    seq: int | None = None


@dataclass(frozen=True)
class EventBatch:
    """Several events in one ``events`` message, oldest first: fewer messages for the broker
    and the server when a device has several to send at once (an install's transitions)."""

    events: tuple[Event, ...]


@dataclass(frozen=True)
class Telemetry:
    """One telemetry sample; ``seq`` is unique per device and increases with time."""

    seq: int
    at: float
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class ChunkRequest:
    """Bytes ``[offset, offset + length)`` of the bundle with this sha256, please."""

    bundle_sha256: str
    offset: int
    length: int


@dataclass(frozen=True)
class Chunk:
    """An answer to a ChunkRequest: ``data`` of a bundle ``total`` bytes long, or ``error``."""

    bundle_sha256: str
    offset: int
    total: int
    data: bytes
    error: str | None = None


def encode(message: Desired | Reported | Event | EventBatch | Telemetry | ChunkRequest
           | PosteriorPush) -> bytes:
    """The JSON payload of any message but a chunk."""
    obj = asdict(message)
    if isinstance(message, Desired):
        for key in ("experiments", "features"):
            if not obj[key]:
                del obj[key]
        # The optional parts only when set: an older agent sees the message it knows, and
        # the retained message is what the registry's desired_json shows.
        for model in obj["models"].values():
            for key, unset in (("delta", None), ("shadow", None), ("compare_previous", 0.0),
                               ("urls", ())):
                if model[key] == unset:
                    del model[key]
    return json.dumps({"protocol": PROTOCOL_VERSION, **obj}, separators=(",", ":"),
                      sort_keys=True).encode()


def encode_chunk(chunk: Chunk) -> bytes:
    """A chunk frame: magic, header length, JSON header (with the data's sha256), data."""
    header = json.dumps({"bundle_sha256": chunk.bundle_sha256, "offset": chunk.offset,
                         "total": chunk.total, "length": len(chunk.data),
                         "sha256": hashlib.sha256(chunk.data).hexdigest(),
                         "error": chunk.error}, separators=(",", ":")).encode()
    return _HEADER.pack(_MAGIC, len(header)) + header + chunk.data


def decode_chunk(payload: bytes) -> Chunk:
    """Parse a chunk frame and check its data against the sha256 in its header."""
    if len(payload) < _HEADER.size:
        raise ProtocolError(f"chunk frame of {len(payload)} bytes is too short")
    magic, length = _HEADER.unpack_from(payload)
    if magic != _MAGIC or _HEADER.size + length > len(payload):
        raise ProtocolError("not a chunk frame (bad magic or header length)")
    header = object_of(payload[_HEADER.size:_HEADER.size + length], "chunk header")
    data = payload[_HEADER.size + length:]
    chunk = Chunk(bundle_sha256=sha_field(header, "bundle_sha256"),
                  offset=int_field(header, "offset"), total=int_field(header, "total"),
                  data=data, error=opt_str(header, "error"))
    if chunk.error is None:
        if int_field(header, "length") != len(data):
            raise ProtocolError(f"chunk at {chunk.offset} carries {len(data)} bytes, its "
                                f"header says {header['length']}")
        if hashlib.sha256(data).hexdigest() != sha_field(header, "sha256"):
            raise ProtocolError(f"chunk at {chunk.offset} does not match its sha256 "
                                "(corrupted in transit)")
        if chunk.offset + len(data) > chunk.total:
            raise ProtocolError(f"chunk at {chunk.offset} runs past the bundle's "
                                f"{chunk.total} bytes")
    return chunk


def decode_desired(payload: bytes) -> Desired:
    """Parse a ``desired`` message."""
    obj = message_object(payload, "desired")
    models = dict_field(obj, "models")
    return Desired(models={model_name(name): _desired_model(as_dict(m, f"models.{name}"), name)
                           for name, m in models.items()},
                   issued_at=float_field(obj, "issued_at"),
                   experiments=experiment_declarations(obj.get("experiments")),
                   features=_features(obj.get("features")))


def _features(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if (not isinstance(value, list) or len(value) > MAX_FEATURES
            or not all(isinstance(v, str) and 0 < len(v) <= _MAX_FEATURE_CHARS
                       for v in value)):
        raise ProtocolError(f"desired 'features' must be a list of at most {MAX_FEATURES} "
                            f"names of 1 to {_MAX_FEATURE_CHARS} characters")
    return tuple(value)


def _desired_model(m: Mapping[str, Any], name: str) -> DesiredModel:
    shadow = m.get("shadow")
    if shadow is not None:
        s = as_dict(shadow, f"models.{name}.shadow")
        rate = share_field(s, "sample_rate")
        if rate == 0.0:
            raise ProtocolError(f"models.{name}.shadow.sample_rate must be above 0")
        shadow = DesiredShadow(version=int_field(s, "version"),
                               bundle_sha256=sha_field(s, "bundle_sha256"),
                               size=int_field(s, "size"), sample_rate=rate)
    return DesiredModel(version=int_field(m, "version"),
                        bundle_sha256=sha_field(m, "bundle_sha256"),
                        size=int_field(m, "size"), shadow=shadow,
                        compare_previous=share_field(m, "compare_previous")
                        if "compare_previous" in m else 0.0,
                        delta=_delta_offer(m.get("delta"), f"models.{name}.delta"),
                        urls=_urls(m, f"models.{name}.urls"))


def _delta_offer(obj: Any, where: str) -> DeltaOffer | None:
    if obj is None:
        return None
    d = as_dict(obj, where)
    return DeltaOffer(bundle_sha256=sha_field(d, "bundle_sha256"), size=int_field(d, "size"),
                      base_version=int_field(d, "base_version"))


def _urls(m: Mapping[str, Any], where: str) -> tuple[str, ...]:
    value = m.get("urls")
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_BUNDLE_URLS:
        raise ProtocolError(f"{where} must be a list of at most {MAX_BUNDLE_URLS} URLs")
    for url in value:
        if (not isinstance(url, str) or len(url) > MAX_URL_CHARS
                or not _URL.fullmatch(url)):
            raise ProtocolError(f"{where} holds {str(url)[:80]!r}, not an http(s) URL of at "
                                f"most {MAX_URL_CHARS} characters")
    return tuple(value)


def decode_reported(payload: bytes) -> Reported:
    """Parse a ``reported`` message."""
    obj = message_object(payload, "reported", MAX_REPORTED_BYTES)
    models = {model_name(n): ModelReport(
        version=int_field(as_dict(m, f"models.{n}"), "version"),
        bundle_sha256=opt_sha(m, "bundle_sha256"), state=str_field(m, "state"))
        for n, m in dict_field(obj, "models").items()}
    installs = {}
    for n, raw in dict_field(obj, "installs").items():
        i = as_dict(raw, f"installs.{n}")
        progress = i.get("progress")
        installs[model_name(n)] = InstallReport(
            version=opt_int(i, "version"), bundle_sha256=opt_sha(i, "bundle_sha256"),
            state=str_field(i, "state"), reason=opt_str(i, "reason"),
            detail=opt_str(i, "detail"),
            progress=None if progress is None else float_field(i, "progress"))
    return Reported(profile=opt_str(obj, "profile"), agent_version=str_field(obj, "agent_version"),
                    models=models, installs=installs, at=float_field(obj, "at"))


def decode_event(payload: bytes) -> Event:
    """Parse an ``events`` message; its kind must be one a device may send
    (:data:`DEVICE_EVENT_KIND`)."""
    return _event(message_object(payload, "event", MAX_EVENT_BYTES))


def decode_events(payload: bytes) -> tuple[Event, ...]:
    """Parse an ``events`` message, one :class:`Event` or an :class:`EventBatch` of 1 to
    :data:`MAX_EVENTS_PER_MESSAGE` (each as :func:`decode_event` checks it)."""
    obj = message_object(payload, "events", MAX_EVENT_BATCH_BYTES)
    if "events" not in obj:
        if len(payload) > MAX_EVENT_BYTES:
            raise ProtocolError(f"event of {len(payload)} bytes exceeds the "
                                f"{MAX_EVENT_BYTES // 1024} KiB limit of its kind")
        return (_event(obj),)
    items = obj["events"]
    if not isinstance(items, list) or not 0 < len(items) <= MAX_EVENTS_PER_MESSAGE:
        raise ProtocolError(f"'events' must be a list of 1 to {MAX_EVENTS_PER_MESSAGE} events")
    events = tuple(_event(as_dict(item, f"events[{i}]")) for i, item in enumerate(items))
    for i, event in enumerate(events):
        if len(json.dumps(event.detail, separators=(",", ":"))) > MAX_EVENT_BYTES:
            raise ProtocolError(f"events[{i}]'s detail exceeds the "
                                f"{MAX_EVENT_BYTES // 1024} KiB limit of an event")
    return events


def _event(obj: Mapping[str, Any]) -> Event:
    kind = str_field(obj, "kind")
    if not DEVICE_EVENT_KIND.fullmatch(kind):
        raise ProtocolError(f"event kind {kind[:64]!r} is not one a device may send")
    return Event(kind=kind, at=float_field(obj, "at"), detail=dict_field(obj, "detail"),
                 seq=opt_int(obj, "seq"))


def decode_telemetry(payload: bytes) -> Telemetry:
    """Parse a ``telemetry`` message."""
    obj = message_object(payload, "telemetry", MAX_TELEMETRY_BYTES)
    return Telemetry(seq=int_field(obj, "seq"), at=float_field(obj, "at"),
                     metrics=dict_field(obj, "metrics"))


def decode_chunk_request(payload: bytes) -> ChunkRequest:
    """Parse a chunk request; the length must be 1 byte to 4 MiB."""
    obj = message_object(payload, "chunk request", MAX_CHUNK_REQUEST_BYTES)
    request = ChunkRequest(bundle_sha256=sha_field(obj, "bundle_sha256"),
                           offset=int_field(obj, "offset"), length=int_field(obj, "length"))
    if not 0 < request.length <= _MAX_CHUNK_BYTES:
        raise ProtocolError(f"chunk length {request.length} is outside 1..{_MAX_CHUNK_BYTES}")
    return request
