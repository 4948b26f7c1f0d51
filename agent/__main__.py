"""``python -m agent``: the same as ``edge-agent``."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
