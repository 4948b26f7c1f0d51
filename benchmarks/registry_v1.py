"""The registry as it was at schema v1 (one hand-written module), loaded from git.

The registry benchmark measures it beside today's registry, and the v1 test fixtures
(tests/fleet_server/registry/v1/) were made with it. Loaded from the repository's history
rather than kept as a copy, so there is one source of it: the commit below.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["V1_COMMIT", "load_v1_registry"]

ROOT = Path(__file__).resolve().parent.parent
#: The last commit whose fleet_server/registry.py had schema v1 (before the registry/ package).
V1_COMMIT = "bd2462a2bc575c94232ec4ba8d05c280b1d667ee"
_NAME = "fleet_registry_v1"


def load_v1_registry() -> ModuleType:
    """``fleet_server/registry.py`` at :data:`V1_COMMIT`, as the module ``fleet_registry_v1``.

    Raises RuntimeError when git or that commit is not available (a shallow clone)."""
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    try:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{V1_COMMIT}:fleet_server/registry.py"],
            capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"cannot read the v1 registry from git commit {V1_COMMIT[:12]} "
                           f"({exc}); run this in a full clone of the repository") from exc
    # Its one relative import; everything else it imports still exists unchanged.
    source = source.replace("from .errors import", "from fleet_server.errors import")
    spec = importlib.util.spec_from_loader(_NAME, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module  # dataclasses look their module up while being created
    exec(compile(source, f"{V1_COMMIT[:12]}:fleet_server/registry.py", "exec"), module.__dict__)
    return module
