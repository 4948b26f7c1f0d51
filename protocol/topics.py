"""The fleet's MQTT topic tree: one root per fleet, one subtree per device.

``edgefleet/{fleet}/devices/{device}/{leaf}``; which leaves carry what is in
:mod:`protocol.messages` and docs/transport.md. The broker's ACL grants a device exactly
:data:`DEVICE_READS` and :data:`DEVICE_WRITES` under its own subtree, with the device's
certificate CN as ``{device}``.
"""

from __future__ import annotations

__all__ = [
    "CHUNK_LEAF",
    "CHUNK_REQUEST_LEAF",
    "DEVICE_READS",
    "DEVICE_WRITES",
    "EXPERIMENT_PUSH_LEAF",
    "device_topic",
    "fleet_topic_filter",
]

#: Topic leaves a device may subscribe to (server -> device) and publish to
#: (device -> server).
DEVICE_READS = ("desired", "inbox/#")
DEVICE_WRITES = ("reported", "telemetry", "events", "outbox/#")
#: Where bundle chunks are answered (server -> device) and requested (device -> server).
CHUNK_LEAF = "inbox/chunks"
CHUNK_REQUEST_LEAF = "outbox/chunks"
#: Under it, one retained posterior push per experiment: ``inbox/experiments/{experiment}``
#: (server -> device; within ``inbox/#``, so the ACL already lets the device read it).
EXPERIMENT_PUSH_LEAF = "inbox/experiments"


def device_topic(fleet: str, device_id: str, leaf: str) -> str:
    """The topic (or filter, if ``leaf`` has wildcards) ``leaf`` of one device."""
    return f"edgefleet/{fleet}/devices/{device_id}/{leaf}"


def fleet_topic_filter(fleet: str) -> str:
    """The filter matching every topic of a fleet (what the fleet server may use)."""
    return f"edgefleet/{fleet}/#"
