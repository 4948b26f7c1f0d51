"""``fleet demo``: the product's main job, end to end, on this machine.

The demo drives the real command-line tools as separate processes, exactly as an operator
and a device would run them, so it exercises the installed product rather than library
internals (and keeps ``fleet_server`` free of imports of the agent or the compressor).

Today's slice: probe this host and pick its firmware profile, compress the reference model
for it (candidates measured here, accuracy-gated), create the fleet's keys, build and sign a
bundle from the compressor's output, verify it on the device side, then show that a copy with
one flipped bit is rejected with its reason.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import FleetError

__all__ = ["DemoError", "run_demo"]

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"


class DemoError(FleetError):
    """A demo step did not behave as the demo expects."""


@dataclass(frozen=True)
class _Step:
    title: str
    argv: list[str]
    expect_success: bool = True
    show_output: bool = True  # False for machine-readable output the demo summarises itself


def _tool(name: str) -> str:
    """The console script installed beside this interpreter (the demo's own venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _run(step: _Step, number: int, out: list[str]) -> subprocess.CompletedProcess[str]:
    shown = [Path(step.argv[0]).name, *step.argv[1:]]
    print(f"\n[{number}] {step.title}\n    $ {shlex.join(shown)}")
    started = time.monotonic()
    result = subprocess.run(step.argv, capture_output=True, text=True, check=False)
    shown_output = result.stdout + result.stderr if step.show_output else result.stderr
    for line in shown_output.rstrip().splitlines():
        print(f"    {line}")
    print(f"    (exit {result.returncode}, {time.monotonic() - started:.1f} s)")
    if (result.returncode == 0) != step.expect_success:
        wanted = "succeed" if step.expect_success else "fail"
        raise DemoError(f"step {number} ({step.title}) was expected to {wanted} but exited "
                        f"{result.returncode}; re-run it by hand to see why.")
    out.append(step.title)
    return result


def run_demo(workdir: Path | None = None, models: Path = REPO_MODELS) -> int:
    """Run the demo in ``workdir`` (a fresh temporary directory by default); 0 on success."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
            return run_demo(Path(tmp), models)
    workdir.mkdir(parents=True, exist_ok=True)
    model, data = models / "digits_cnn.onnx", models / "digits_data.npz"
    for needed in (model, data):
        if not needed.is_file():
            raise DemoError(f"{needed} is missing; run the demo from a full checkout of the "
                            "repository (the reference models are committed there).")
    done: list[str] = []
    started = time.monotonic()

    probe = _run(_Step("Probe this host and match it to a firmware profile",
                       [_tool("edge-agent"), "probe", "--json"], show_output=False), 1, done)
    profile = json.loads(probe.stdout)["best_profile"]
    if profile is None:
        raise DemoError("no firmware profile fits this host (run 'edge-agent probe' to see "
                        "why); the demo needs one to target its bundle at")
    print(f"    best profile for this host: {profile}")
    artifacts, keys = workdir / "artifacts", workdir / "keys"
    bundle = workdir / "digits-1.efb"
    steps: Sequence[_Step] = [
        _Step(f"Compress the reference model for {profile} (accuracy-gated, measured here)",
              [_tool("edge-compress"), str(model), "--profile", profile, "--calibration",
               str(data), "--eval", str(data), "--out", str(artifacts)]),
        _Step("Create the fleet's keys (offline root, online signing keys)",
              [_tool("fleet"), "keys", "init", "--dir", str(keys)]),
        _Step("Build and sign bundle digits v1 from the compressor's output",
              [_tool("fleet"), "bundle", "build", "--name", "digits", "--version", "1",
               "--artifacts", str(artifacts), "--keys", str(keys), "--out", str(bundle)]),
        _Step("Device side: verify the bundle against the pinned root of trust",
              [_tool("edge-agent"), "verify", str(bundle), "--state-dir",
               str(workdir / "device"), "--root", str(keys / "root.json"),
               "--profile", profile]),
    ]
    for number, step in enumerate(steps, start=2):
        _run(step, number, done)

    tampered = workdir / "digits-1-tampered.efb"
    payload = bytearray(bundle.read_bytes())
    payload[len(payload) // 2] ^= 0x01
    tampered.write_bytes(bytes(payload))
    _run(_Step("Device side: a bundle with one flipped bit is rejected, with the reason",
               [_tool("edge-agent"), "verify", str(tampered), "--state-dir",
                str(workdir / "device"), "--root", str(keys / "root.json"),
                "--profile", profile], expect_success=False), len(steps) + 2, done)
    print(f"\ndemo passed: {len(done)} steps in {time.monotonic() - started:.1f} s")
    return 0
