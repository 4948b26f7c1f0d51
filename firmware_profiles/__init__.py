"""Device descriptions (firmware profiles) and host probing, shared by every edgefleet part."""

from __future__ import annotations
