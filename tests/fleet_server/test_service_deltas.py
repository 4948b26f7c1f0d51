"""Delta bundles in the fleet service (issue 18), over a real Mosquitto, on SQLite and
PostgreSQL: stored with their release, offered to devices by the version they report,
fetchable only by devices the release was desired for."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundle.signing import ArtifactInput, DeltaBase, Release, build_release
from fleet_server.errors import RegistryError
from fleet_server.registry import DeltaRecord
from fleet_server.service import FleetService, ServiceConfig
from protocol import messages
from tests.bundle.repo import ONLINE, VALID, Repo, spec
from tests.fleet_server.server_env import (
    PROFILE,
    desired_messages,
    enroll,
    fetch_bundle,
    request_chunk,
    service_config,
    wait_until,
    write_keys,
)
from tests.mqtt_broker import Recorder

pytestmark = pytest.mark.integration

V1 = bytes(range(256)) * 400
V2 = V1[:50_000] + b"fine-tuned" * 100 + V1[51_000:]


def _release(repo: Repo, v2: bytes = V2) -> Release:
    repo.metadata_version += 1
    return build_release(
        spec("digits", 2, profiles=(PROFILE,), artifacts=[ArtifactInput(
            "model.bin", v2, "bin", "fp32", bases=(DeltaBase(1, V1),))]),
        root_chain=repo.root_chain, signers={r: repo.signers[r] for r in ONLINE},
        metadata_version=repo.metadata_version, expires=VALID)


@pytest.fixture
def service(tmp_path: Path, db_url: str, repo: Repo) -> Iterator[FleetService]:
    config: ServiceConfig = service_config(tmp_path / "server",
                                           write_keys(tmp_path / "keys", repo), db_url)
    with FleetService(config) as running:
        yield running


def _reported(sha: str, version: int) -> bytes:
    return messages.encode(messages.Reported(
        profile=PROFILE, agent_version="0.1.0",
        models={"digits": messages.ModelReport(version, sha, "committed")}, at=1.0))


def test_a_delta_is_offered_to_devices_running_its_base_and_served_to_them_only(
        service: FleetService, tmp_path: Path, repo: Repo) -> None:
    v1 = service.add_bundle(repo.build(spec("digits", 1, profiles=(PROFILE,), artifacts=[
        ArtifactInput("model.bin", V1, "bin", "fp32")])))
    release = _release(repo)
    with pytest.raises(RegistryError, match="upload its full bundle before"):
        service.add_bundle(release.deltas[1])
    v2 = service.add_bundle(release.full)
    delta = service.add_bundle(release.deltas[1])
    assert isinstance(delta, DeltaRecord)
    assert (delta.bundle_sha256, delta.base_version) == (v2.sha256, 1)
    with pytest.raises(RegistryError, match="another build"):  # same version, other signing
        service.add_bundle(_release(repo, V2[::-1]).deltas[1])

    devices = {d: enroll(service, tmp_path, d) for d in ("gw-1", "gw-2", "gw-3")}
    recorders: list[Recorder] = []
    try:
        for name in ("gw-1", "gw-2"):
            recorder = devices[name].client()
            recorders.append(recorder)
            recorder.subscribe(devices[name].topic("desired"), devices[name].topic("inbox/#"))
        service.publish(v1.sha256, devices=["gw-1", "gw-2"])
        recorders[0].publish(devices["gw-1"].topic("reported"), _reported(v1.sha256, 1))
        wait_until(lambda: (d := service.registry.get_device("gw-1")) and d.running,
                   "gw-1's report")

        result = service.publish(v2.sha256, devices=["gw-1", "gw-2"])
        assert result.transfer is not None
        assert result.transfer.by_delta == {1: ("gw-1",)}
        assert result.transfer.full == ("gw-2",)
        assert result.transfer.saved_bytes == v2.size - delta.size > 0
        offer = messages.DeltaOffer(delta.sha256, delta.size, 1)
        want = {"gw-1": messages.DesiredModel(2, v2.sha256, v2.size, delta=offer),
                "gw-2": messages.DesiredModel(2, v2.sha256, v2.size)}
        for recorder, name in zip(recorders, ("gw-1", "gw-2"), strict=True):
            def arrived(r: Recorder = recorder, n: str = name) -> bool:
                return any(m.models.get("digits") == want[n]
                           for m in desired_messages(r, devices[n]))
            recorder.wait(arrived, f"{name}'s desired v2")

        data = fetch_bundle(recorders[0], devices["gw-1"], delta.sha256, delta.size)
        assert hashlib.sha256(data).hexdigest() == delta.sha256
        outsider = devices["gw-3"].client()
        recorders.append(outsider)
        outsider.subscribe(devices["gw-3"].topic("inbox/#"))
        refused = request_chunk(outsider, devices["gw-3"], delta.sha256, 0, 1024)
        assert refused.error is not None
        assert "not available to device gw-3" in refused.error
    finally:
        for recorder in recorders:
            recorder.close()
