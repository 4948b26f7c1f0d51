"""Bundle verification in a short-lived child process, so the agent's serving threads do
not wait on it (the installer's default verifier, :class:`agent.installer.Installer`)."""

from __future__ import annotations

import multiprocessing
import os
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path

from bundle.errors import BundleError
from bundle.trust import TrustedState, VerifiedBundle, verify_bundle

from .errors import InstallError

__all__ = ["VERIFIER_NICE", "verify_in_child"]

#: The child's niceness: it yields the CPU to serving.
VERIFIER_NICE = 10


def verify_in_child(path: Path, trusted: TrustedState, now: datetime,
                    profile: str | None) -> VerifiedBundle:
    """verify_bundle of the file at ``path`` in a short-lived child process at low priority.

    Verification is pure Python for the most part (TUF metadata, canonical JSON): run in
    the agent's own process it holds the GIL in 0.5 ms slices for tens of milliseconds,
    and every request served meanwhile waits for it. In a child process it costs the
    serving threads nothing but CPU, which the child yields (nice 10). The child gets the
    path and reads the file in bounded blocks; what comes back is the manifest and the
    entry index, never the artifacts. It is a daemon process: an agent that stops takes it
    down at once, and an install cut short is resumed at the next start.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_verifier_main, args=(send, path, trusted, now, profile),
                            name="edgefleet-verifier", daemon=True)
    child.start()
    send.close()
    try:
        ok, result = receive.recv()
    except EOFError:
        child.join()
        raise InstallError("verify_failed", f"the verifier process died (exit code "
                           f"{child.exitcode}) while checking {path.name}; the bundle may "
                           "be too big for this device's memory") from None
    finally:
        receive.close()
    child.join()
    if not ok:
        raise result
    assert isinstance(result, VerifiedBundle)
    return result


def _verifier_main(send: Connection, path: Path, trusted: TrustedState, now: datetime,
                   profile: str | None) -> None:
    os.nice(VERIFIER_NICE)
    try:
        result: object = (True, verify_bundle(path, trusted, now=now, profile=profile))
    except BundleError as exc:
        result = (False, exc)
    except Exception as exc:  # anything else is a bug in a reader: report it, typed
        result = (False, InstallError("verify_failed", f"verifying {path.name} raised "
                                      f"{type(exc).__name__}: {exc}"))
    send.send(result)
    send.close()
