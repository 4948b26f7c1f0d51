"""edgefleet agent: the on-device daemon that verifies, installs and serves models.

Importable with only the ``agent`` extra installed: nothing here may import the compressor,
the fleet server, or their dependencies.
"""

from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"
