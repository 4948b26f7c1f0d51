"""What a fleet benchmark prepares before its devices connect: a signed bundle, the devices'
identities on disk, an open-file limit high enough for thousands of connections, a work
directory; and the percentile its reports use."""

from __future__ import annotations

import os
import resource
import secrets
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from bundle.signing import ArtifactInput, BundleSpec, build_bundle
from fleet_server.ca import FleetCA
from fleet_sim.device import PROFILE, DeviceSpec
from transport.mqtt import TLSIdentity
from transport.x509 import certificate_fingerprint, make_device_key_and_csr

MODEL = "bench"


def issue_device(ca: FleetCA, devices_dir: Path, device_id: str) -> tuple[TLSIdentity, str]:
    """A device's key and CSR made as the agent makes them, signed by ``ca``, written to
    ``devices_dir/ID/`` (device.key, device.crt, ca.crt): its identity and its
    certificate's fingerprint (what the registry records at enrollment)."""
    key_pem, csr_pem = make_device_key_and_csr(device_id)
    cert = ca.sign_device_csr(csr_pem, device_id)
    home = devices_dir / device_id
    home.mkdir(parents=True)
    (home / "device.key").write_bytes(key_pem)
    os.chmod(home / "device.key", 0o600)
    (home / "device.crt").write_bytes(cert)
    (home / "ca.crt").write_bytes(ca.cert_pem)
    return (TLSIdentity(home / "ca.crt", home / "device.crt", home / "device.key"),
            certificate_fingerprint(cert))


def raise_open_files(needed: int) -> tuple[int, int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (Mosquitto and the workers
    inherit it); returns (before, now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed * 2)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard


def make_bundle(keys_dir: Path, size: int, version: int = 1) -> bytes:
    """A signed bundle of model ``bench`` v``version`` (keys as ``fleet keys init`` makes
    them, made in ``keys_dir`` unless it holds them) whose one artifact is ``size`` random
    bytes declared as an fp32 ONNX model."""
    from fleet_server.keys import KeyStore, init_keys

    store = KeyStore.at(keys_dir)
    if not store.online_dir.exists():
        init_keys(store)
    spec = BundleSpec(name=MODEL, version=version, profiles=(PROFILE,), artifacts=(
        ArtifactInput("model.onnx", secrets.token_bytes(size), "onnx", "fp32"),))
    expires = datetime.fromtimestamp(time.time() + 30 * 86400, timezone.utc).replace(
        microsecond=0)
    return build_bundle(spec, root_chain=store.root_chain(),
                        signers={r: store.signers(r) for r in ("targets", "snapshot",
                                                               "timestamp")},
                        metadata_version=version, expires=expires)


def device_specs(home: Path, ids: Sequence[str]) -> list[DeviceSpec]:
    """The devices ``ids`` with their identity files under ``home/devices/ID``."""
    return [DeviceSpec(d, TLSIdentity(home / "devices" / d / "ca.crt",
                                      home / "devices" / d / "device.crt",
                                      home / "devices" / d / "device.key")) for d in ids]


@contextmanager
def work_dir(keep: Path | None) -> Iterator[Path]:
    """``keep`` (created; it must not exist), or a temporary directory removed after."""
    if keep is not None:
        keep.mkdir(parents=True)
        yield keep.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        yield Path(tmp)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank), NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]
