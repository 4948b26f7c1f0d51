"""Install memory benchmark: a bundle larger than the device's memory installs in it.

Builds (by this script, never committed) a signed bundle of about ``--bundle-mb`` MB: the
reference digits model for this device's profile beside one large variant made for another
profile (random bytes: bundles are format-agnostic), so the device fetches, checksums and
verifies every byte but stages only its own variant. Then ``edge-agent install`` runs in a
fresh process, once for the small digits bundle (the baseline, same run) and once for the
big one, each inside a cgroup (v1 or v2) whose memory limit is ``--limit-mb`` (a device
with that much RAM; page cache counts against it and is reclaimed under it); a process that
goes over is killed, which fails the run. Meanwhile psutil samples the resident memory of
the install process and its verifier child every 10 ms (the figure reported: the largest
sum seen).

    .venv/bin/python benchmarks/install_memory_bench.py --bundle-mb 400 --limit-mb 256
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.trust_store import TrustStore
from bundle.signing import ArtifactInput, BundleSpec
from bundle.trust import TrustedState
from tests.agent.bundles import PROFILE, digits_spec
from tests.bundle.repo import Repo

_CGROUP_V1 = Path("/sys/fs/cgroup/memory")
_CGROUP_V2 = Path("/sys/fs/cgroup")


def _cgroup(limit: int) -> Path:
    """A fresh memory cgroup limited to ``limit`` bytes (swap included where supported)."""
    name = f"edgefleet-install-bench-{os.getpid()}"
    if (_CGROUP_V1 / "memory.limit_in_bytes").exists():
        group = _CGROUP_V1 / name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit))
        return group
    group = _CGROUP_V2 / name
    group.mkdir()
    (group / "memory.max").write_text(str(limit))
    (group / "memory.swap.max").write_text("0")
    return group


def _install(bundle: Path, state: Path, limit: int) -> tuple[int, float, str]:
    """Run ``edge-agent install`` in a memory cgroup; peak RSS (agent + verifier), seconds,
    and the install's outcome line."""
    group = _cgroup(limit)
    try:
        started = time.perf_counter()
        # The shell joins the cgroup, then becomes the agent (exec), so it starts inside.
        process = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"),
             sys.executable, "-m", "agent", "install", str(bundle), "--state-dir", str(state),
             "--profile", PROFILE],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watched = psutil.Process(process.pid)
        peak = 0
        while process.poll() is None:
            try:
                tree = [watched, *watched.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        output = (process.stdout.read() if process.stdout else "").strip()
        if process.returncode != 0:
            raise SystemExit(f"install failed (exit {process.returncode}, -9 is the cgroup's "
                             f"OOM kill):\n{output}")
        return peak, seconds, output.splitlines()[-1]
    finally:
        _remove_cgroup(group)


def _remove_cgroup(group: Path) -> None:
    # The kernel lets a cgroup go only once its last exited process is reaped.
    for _ in range(100):
        try:
            os.rmdir(group)
            return
        except OSError:
            time.sleep(0.05)
    print(f"warning: could not remove {group}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle-mb", type=int, default=400)
    parser.add_argument("--limit-mb", type=int, default=256)
    args = parser.parse_args()
    limit = args.limit_mb * 1024 * 1024
    repo = Repo()
    with tempfile.TemporaryDirectory(prefix="install-mem-") as tmp_name:
        tmp = Path(tmp_name)
        small = tmp / "digits-v1.efb"
        small.write_bytes(repo.build(digits_spec(1)))
        small_size = small.stat().st_size
        base = digits_spec(2)
        other = ArtifactInput("other-device.onnx", os.urandom(args.bundle_mb * 1024 * 1024),
                              "onnx", "fp32", "rpi4")
        big = tmp / "digits-v2-big.efb"
        big.write_bytes(repo.build(BundleSpec(
            name=base.name, version=2, profiles=(PROFILE, "rpi4"),
            artifacts=(*base.artifacts, other), inputs=base.inputs, outputs=base.outputs,
            self_test=base.self_test)))
        del other
        state = tmp / "state"
        TrustStore(state / "trust").save(TrustedState(root=repo.root))
        small_peak, small_s, small_out = _install(small, state, limit)
        big_peak, big_s, big_out = _install(big, state, limit)
    mb = 1024 * 1024
    print(f"memory limit (cgroup): {args.limit_mb} MB")
    print(f"{'bundle':<28}{'size MB':>10}{'peak RSS MB':>13}{'seconds':>9}")
    print(f"{'digits v1 (baseline)':<28}{small_size / mb:>10.2f}"
          f"{small_peak / mb:>13.1f}{small_s:>9.1f}")
    print(f"{'digits v2 + other variant':<28}{args.bundle_mb:>10.0f}{big_peak / mb:>13.1f}"
          f"{big_s:>9.1f}")
    print(f"peak RSS ratio big/baseline: {big_peak / small_peak:.2f}; "
          f"big peak / bundle size: {big_peak / (args.bundle_mb * mb):.2f}")
    print(f"outcomes: {small_out} | {big_out}")


if __name__ == "__main__":
    main()
