"""Device descriptions (firmware profiles) and host probing, shared by every edgefleet part.

Pure: imports only the standard library (onnxruntime and LiteRT are probed lazily in
``runtimes``) and nothing else from the project. Schema: docs/profiles.md.
"""

from __future__ import annotations

from .errors import InvalidProfileError, ProfileError, UnknownProfileError
from .host import HostCapabilities, probe_host
from .loader import PROFILES_DIR, get_profile, load_profile, load_profiles, parse_profile
from .matching import ProfileMatch, best_profile, match_profiles
from .model import Accelerator, Cpu, Profile

__all__ = [
    "PROFILES_DIR",
    "Accelerator",
    "Cpu",
    "HostCapabilities",
    "InvalidProfileError",
    "Profile",
    "ProfileError",
    "ProfileMatch",
    "UnknownProfileError",
    "best_profile",
    "get_profile",
    "load_profile",
    "load_profiles",
    "match_profiles",
    "parse_profile",
    "probe_host",
]
