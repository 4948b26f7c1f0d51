"""Entry names inside a bundle, shared by the writer (signing) and the reader (trust)."""

from __future__ import annotations

#: Directory of TUF metadata entries (``N.root.json``, ``timestamp.json``, ...).
METADATA_DIR = "metadata"
#: Directory of TUF target entries; a target path ``P`` is stored as ``targets/P``.
TARGETS_DIR = "targets"
#: TUF target path of the manifest.
MANIFEST_PATH = "manifest.json"
#: The top-level TUF roles, in the order a client loads them.
TOP_LEVEL_ROLES = ("root", "timestamp", "snapshot", "targets")
#: The roles whose keys stay online on the fleet server.
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
