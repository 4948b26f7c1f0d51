"""The fleet server's persistent state: devices, enrollment tokens, bundles, desired and
reported state, events and telemetry. SQLite by default, PostgreSQL by URL.

Open it with :func:`open_registry`; one :class:`Registry` is safe to share between threads.
Records come back as frozen dataclasses; what travels on the wire is the protocol's own
records (:mod:`protocol.messages`). The layout, the URL forms, the schema and its migrations
and the concurrency guarantees are in docs/registry.md. Modules, by concept:

==================  ==========================================================================
``registry``        :func:`open_registry`, :class:`Registry`: one transaction per call
``records``         what calls return, and :func:`is_converged`
``devices``         enrollment, group and tags, online state
``device_messages`` what devices send (reports, events, samples), stored a batch at a time
``tokens``          one-time enrollment tokens
``bundles``         bundle records; ``bundle_store``: the bundle files themselves
``desired``         desired state, its history and rollback
``events``          the event log
``telemetry``       telemetry samples
``values``          checks of input values, JSON as stored
``database``        transactions, batches, dialects; ``sqlite`` and ``postgres``: the pools
``migrations``      versioned schema migrations, one module per version
==================  ==========================================================================
"""

from __future__ import annotations

from .database import is_outage
from .device_messages import DeviceEvent, DeviceMessage, DeviceReport, DeviceSample, StoredBatch
from .migrations import SCHEMA_VERSION
from .records import (
    BundleRecord,
    DeltaRecord,
    DesiredChange,
    DesiredState,
    Device,
    DeviceModels,
    Enrolled,
    EventRecord,
    TelemetryRecord,
    desired_json,
    is_converged,
)
from .registry import Registry, open_registry

__all__ = [
    "SCHEMA_VERSION",
    "BundleRecord",
    "DeltaRecord",
    "DesiredChange",
    "DesiredState",
    "Device",
    "DeviceEvent",
    "DeviceMessage",
    "DeviceModels",
    "DeviceReport",
    "DeviceSample",
    "Enrolled",
    "EventRecord",
    "Registry",
    "StoredBatch",
    "TelemetryRecord",
    "desired_json",
    "is_converged",
    "is_outage",
    "open_registry",
]
