"""Well-known ports by which the parts of a fleet find each other, in one place.

Every CLI default, config default, help text and docs example takes its number from here,
so the agent's `enroll --help`, its config file and the server's `serve` cannot disagree.
"""

from __future__ import annotations

__all__ = ["AGENT_API_PORT", "MQTTS_PORT", "SERVER_API_PORT"]

#: The agent's local inference API (Open Inference Protocol) on the device's loopback.
AGENT_API_PORT = 8470
#: The fleet server's operator API (enrollment, devices, publishing).
SERVER_API_PORT = 8780
#: IANA port of MQTT over TLS; the embedded broker and ``mqtts://`` URLs default to it.
MQTTS_PORT = 8883
