"""edgefleet fleet server: keys and signing, bundle store, device registry, rollouts."""

from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"
