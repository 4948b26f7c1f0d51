"""Errors of the experiments package: one root, split by cause.

    ExperimentError              anything this package refuses
    ├── InvalidExperimentData    a message, declaration or argument that does not make sense
    ├── UnknownResponse          feedback for a response id never issued, expired or used
    └── OutOfOrderDelta          a device's delta skipped a sequence number (resend the gap)
"""

from __future__ import annotations

__all__ = ["ExperimentError", "InvalidExperimentData", "OutOfOrderDelta", "UnknownResponse"]


class ExperimentError(Exception):
    """Root of the package's errors; ``transient`` says whether retrying later can succeed."""

    transient = False


class InvalidExperimentData(ExperimentError):
    """Input that is malformed or out of bounds; the message names the field and the fix."""


class OutOfOrderDelta(ExperimentError):
    """A delta arrived before an earlier one from the same device; the device resends."""

    transient = True


class UnknownResponse(ExperimentError):
    """Feedback names a response id this device did not issue, or one already reported or
    forgotten (ids are kept for a bounded time and number)."""
