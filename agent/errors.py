"""Exceptions raised by the agent package.

Every message says what was wrong and what to do about it. The tree::

    AgentError
    ├── TrustStoreError       the trusted state on disk is missing, unreadable or corrupt
    ├── BundleRejectedError   a bundle failed verification; ``reason`` names the check
    ├── InstallError          an install could not finish; ``reason`` is a stable code
    ├── ModelLoadError        no runtime on this device could open the model
    ├── ModelNotFoundError    no model of that name is being served
    └── InvalidInputError     an inference request does not match the model's signature
        └── RequestTooLargeError  ... or is over one of the API's limits (api.limits)

``InvalidInputError`` and ``ModelNotFoundError`` are the caller's fault (HTTP 400 and 404;
``RequestTooLargeError`` 413);
the agent never stops serving because of them.
"""

from __future__ import annotations

__all__ = ["AgentError", "BundleRejectedError", "InstallError", "InvalidInputError",
           "ModelLoadError", "ModelNotFoundError", "RequestTooLargeError", "TrustStoreError"]


class AgentError(Exception):
    """Root of every error the agent package raises on purpose."""


class TrustStoreError(AgentError):
    """The trusted state on disk is missing, unreadable or corrupt."""


class BundleRejectedError(AgentError):
    """A bundle failed verification. ``reason`` is the bundle error's class name
    (e.g. ``"RollbackError"``), stable enough to report to the fleet server."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class InstallError(AgentError):
    """An install did not complete. ``reason`` is a stable code for the fleet server
    (``self_test_failed``, ``no_variant``, ``load_failed``, ``rejected:<check>``,
    ``disk_full``...); ``transient`` says whether the same bundle may succeed later."""

    def __init__(self, reason: str, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.transient = transient

    def __reduce__(self) -> tuple[object, ...]:
        # Raised in the verifier child and sent back: keep reason and transience.
        return (_install_error, (self.reason, str(self), self.transient))


def _install_error(reason: str, message: str, transient: bool) -> InstallError:
    return InstallError(reason, message, transient=transient)


class ModelLoadError(AgentError):
    """No runtime on this device could open the model file."""


class ModelNotFoundError(AgentError):
    """No model of the requested name (or version) is being served."""


class InvalidInputError(AgentError):
    """An inference request's tensors do not match the model's input signature."""


class RequestTooLargeError(InvalidInputError):
    """An inference request is over one of the API's limits (its batch or input size)."""
