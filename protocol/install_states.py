"""The names of an install's states, as the agent records them and reports them.

The agent's install state machine (``agent.install_state``) moves between these states; its
``reported`` message carries them (:class:`protocol.messages.ModelReport` ``state``,
:class:`protocol.messages.InstallReport` ``state``), and the fleet server reads them to
decide whether a device has converged. Both sides import the names from here, so neither
keeps a copy of the other's strings.
"""

from __future__ import annotations

import enum

__all__ = ["InstallState"]


class InstallState(str, enum.Enum):
    """Where one install is (a ``str``, so it compares equal to the name on the wire)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    ACTIVATING = "activating"
    PROBATION = "probation"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
