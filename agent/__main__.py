"""``python -m agent``: the same as ``edge-agent``."""

from __future__ import annotations

import sys

from .cli import main

# Guarded: the agent's verifier runs in spawned child processes, which import the parent's
# main module (this one, under ``python -m agent``) and must not start the CLI again.
if __name__ == "__main__":
    sys.exit(main())
