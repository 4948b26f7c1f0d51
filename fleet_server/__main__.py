"""``python -m fleet_server``: the ``fleet`` command, for where the script is not on PATH."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
