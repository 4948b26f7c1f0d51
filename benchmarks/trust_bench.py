"""Trust benchmark: what a rollback's re-release and a certificate revocation cost the server.

In one run, beside a baseline measured in the same run:

1. **Re-release of a large bundle** (``bundle.signing.rerelease_bundle``, what ``fleet
   rollback`` signs): seconds and the process's peak RSS growth, against building the same
   bundle from its artifacts (``build_bundle``, what ``fleet bundle build`` does). Both
   hold the bundle in memory; the re-release should cost about the same.
2. **Revocation reaching the broker**: ``FleetCA.revoke`` (CRL re-signed and written) and
   ``Broker.reload_crl`` (SIGHUP until Mosquitto logs the reload) against a real embedded
   Mosquitto, and ``Broker.restart`` (what a device reset does to drop its connection).

Run::

    .venv/bin/python benchmarks/trust_bench.py [--mib 100] [--revocations 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bundle.signing import ArtifactInput, build_bundle, rerelease_bundle  # noqa: E402
from fleet_server.broker import Broker  # noqa: E402
from tests.bundle.repo import ONLINE, VALID, Repo, spec  # noqa: E402
from tests.mqtt_broker import TestFleet  # noqa: E402
from transport.x509 import certificate_fingerprint  # noqa: E402


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def signing(mib: int) -> None:
    repo = Repo()
    model = os.urandom(mib * 1024 * 1024)
    signers = {r: repo.signers[r] for r in ONLINE}
    bundle_spec = spec("big", 1, artifacts=[ArtifactInput("m.onnx", model, "onnx", "fp32")])
    before = _peak_mib()
    started = time.perf_counter()
    v1 = build_bundle(bundle_spec, root_chain=repo.root_chain, signers=signers,
                      metadata_version=1, expires=VALID)
    build_s, build_peak = time.perf_counter() - started, _peak_mib()
    del model, bundle_spec
    started = time.perf_counter()
    v3 = rerelease_bundle(v1, version=3, root_chain=repo.root_chain, signers=signers,
                          metadata_version=2, expires=VALID, rollback_of=1)
    rerelease_s, rerelease_peak = time.perf_counter() - started, _peak_mib()
    print(f"bundle of {len(v1) / 2**20:.0f} MiB (re-release {len(v3) / 2**20:.0f} MiB)")
    print(f"  build_bundle (baseline): {build_s:.2f} s, peak RSS {build_peak:.0f} MiB "
          f"(+{build_peak - before:.0f} MiB)")
    print(f"  rerelease_bundle:        {rerelease_s:.2f} s ({rerelease_s / build_s:.2f}x), "
          f"peak RSS {rerelease_peak:.0f} MiB (+{rerelease_peak - build_peak:.0f} MiB more)")


def revocation(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        fleet = TestFleet.create(home)
        devices = [fleet.device_identity(f"dev{i}") for i in range(count)]
        config = fleet.broker_config(home / "broker", crl_file=fleet.ca.crl_path)
        revoke_ms, reload_ms = [], []
        with Broker.embedded(config) as broker:
            for identity in devices:
                started = time.perf_counter()
                fleet.ca.revoke(certificate_fingerprint(identity.cert_file.read_bytes()), "b")
                revoke_ms.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                assert broker.reload_crl()
                reload_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            broker.restart()
            restart_s = time.perf_counter() - started
    print(f"revocations ({count}):")
    print(f"  FleetCA.revoke (CRL signed, written): median {statistics.median(revoke_ms):.1f} ms")
    print(f"  Broker.reload_crl (SIGHUP to reload logged): median "
          f"{statistics.median(reload_ms):.0f} ms, max {max(reload_ms):.0f} ms")
    print(f"  Broker.restart (all connections dropped, listening again): {restart_s:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=100, help="artifact size (default 100)")
    parser.add_argument("--revocations", type=int, default=5)
    args = parser.parse_args()
    signing(args.mib)
    revocation(args.revocations)


if __name__ == "__main__":
    main()
