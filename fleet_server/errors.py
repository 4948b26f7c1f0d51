"""Exceptions raised by the fleet_server package.

Every message says what was wrong and what to do about it. Errors of the bundle package
(:class:`bundle.errors.BundleError`) pass through unchanged: they already name the reason a
bundle was refused, and the CLI prints them the same way. The tree::

    FleetError
    ├── KeyStoreError       the keys directory is missing, incomplete or inconsistent
    └── BundleInputError    the artifacts, model or report given to `fleet bundle build`
"""

from __future__ import annotations

__all__ = ["BundleInputError", "FleetError", "KeyStoreError"]


class FleetError(Exception):
    """Root of every error the fleet_server package raises on purpose."""


class KeyStoreError(FleetError):
    """The keys directory is missing, incomplete or inconsistent."""


class BundleInputError(FleetError):
    """The artifacts directory, model file or report.json cannot be used for a bundle."""
