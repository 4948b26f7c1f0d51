"""What the ``edge-agent`` commands share: the state directory, config-backed options, the
pinned root."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .config_load import option_type
from .trust_store import TrustStore, resolve_root

__all__ = ["DEFAULT_STATE_DIR", "option", "pin_root", "state_dir_option"]

#: Where the agent keeps its state unless told otherwise (or EDGEFLEET_STATE_DIR).
DEFAULT_STATE_DIR = Path(os.environ.get("EDGEFLEET_STATE_DIR", "/var/lib/edgefleet/agent"))


def state_dir_option(p: argparse.ArgumentParser) -> None:
    """``--state-dir DIR``, defaulting to :data:`DEFAULT_STATE_DIR`."""
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"agent state directory (default {DEFAULT_STATE_DIR}, or "
                   "$EDGEFLEET_STATE_DIR)")


def option(p: argparse.ArgumentParser, flag: str, table: type[Any], key: str,
            metavar: str | None = None) -> None:
    """A flag for config key ``key`` of ``table``: its default, bounds and meaning."""
    kind, default, meaning = option_type(table, key)
    p.add_argument(flag, type=kind, default=default, metavar=metavar,
                   help=f"{meaning} (default {default})")


def pin_root(state_dir: Path, root: Path | None) -> None:
    """Pin ``root`` if the device trusts nothing yet; refuse one that differs from the pin.

    Once a root is pinned, newer roots arrive only inside bundles, signed by the old one.
    """
    from .startup import usable_state_dir

    store = TrustStore(state_dir / "trust")
    trusted = resolve_root(store, root)  # checks ``root`` before anything is written
    if trusted is not None and not store.exists():
        usable_state_dir(state_dir)
        store.save(trusted)
