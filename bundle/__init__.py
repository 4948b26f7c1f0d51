"""The edgefleet bundle format: one signed file holding a model's artifacts and manifest.

Shared by the fleet server (writes) and the agent (reads and verifies). Pure: it imports
nothing else from the project, so both sides can depend on it.
"""

from __future__ import annotations
