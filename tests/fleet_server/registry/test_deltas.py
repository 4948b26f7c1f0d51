"""Delta bundles in the registry (issue 18), on both databases."""

from __future__ import annotations

import pytest

from fleet_server.errors import RegistryError
from fleet_server.registry import Registry
from tests.fleet_server.registry.helpers import bundle, kinds


def test_a_delta_is_stored_with_its_release_once(reg: Registry) -> None:
    bundle(reg, version=1)
    v2 = bundle(reg, version=2)
    delta = reg.put_delta(b"delta from v1", v2, 1)
    assert (delta.bundle_sha256, delta.base_version, delta.size) == (v2, 1, 13)
    assert delta.path.read_bytes() == b"delta from v1"
    assert reg.put_delta(b"delta from v1", v2, 1) == delta  # idempotent
    assert reg.get_delta(delta.sha256) == delta
    assert reg.deltas_of(v2) == [delta]
    assert reg.get_bundle(delta.sha256) is None  # not a release of its own
    assert kinds(reg).count("bundle.delta_stored") == 1


def test_a_release_has_one_delta_per_base_from_earlier_versions_only(reg: Registry) -> None:
    v2 = bundle(reg, version=2)
    reg.put_delta(b"delta from v1", v2, 1)
    with pytest.raises(RegistryError, match="already has another delta from v1"):
        reg.put_delta(b"another delta from v1", v2, 1)
    with pytest.raises(RegistryError, match="earlier version, not v2"):
        reg.put_delta(b"delta from itself", v2, 2)
    with pytest.raises(RegistryError, match="no stored bundle"):
        reg.put_delta(b"orphan", "0" * 64, 1)
    assert [d.base_version for d in reg.deltas_of(v2)] == [1]
