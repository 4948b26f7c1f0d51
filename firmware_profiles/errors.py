"""Exceptions raised by the firmware_profiles package.

The tree::

    ProfileError                a profile cannot be used
    ├── InvalidProfileError     a profile file is malformed (names the file and the key)
    └── UnknownProfileError     no profile has the requested name
"""

from __future__ import annotations

__all__ = ["InvalidProfileError", "ProfileError", "UnknownProfileError"]


class ProfileError(Exception):
    """Root of every error the firmware_profiles package raises on purpose."""


class InvalidProfileError(ProfileError):
    """A profile file is malformed; the message names the file and the dotted key."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"key '{key}': " if key else ""
        super().__init__(f"{file}: {where}{problem}")


class UnknownProfileError(ProfileError):
    """No profile with the requested name exists in the searched directory."""
