"""Property tests: whatever bytes the reader is handed, only BundleError escapes, quickly."""

from __future__ import annotations

import contextlib
import functools
import json
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundle.archive import frame
from bundle.errors import BundleError
from bundle.manifest import manifest_from_json, manifest_to_json
from bundle.trust import TrustedState, verify_bundle
from tests.bundle.repo import NOW, Repo, entries, rebuild
from tests.bundle.test_manifest import FULL

FUZZ = settings(max_examples=150, deadline=timedelta(seconds=2),
                suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _valid() -> tuple[bytes, TrustedState]:
    repo = Repo()
    return repo.build(), TrustedState(root=repo.root)


def _verify(data: bytes) -> None:
    _, trusted = _valid()
    with contextlib.suppress(BundleError):
        verify_bundle(data, trusted, now=NOW, profile="x86-avx2")


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _verify(data)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_framed_payload(payload: bytes) -> None:
    # Past the checksum, straight into the tar parser.
    _verify(frame(payload))


@FUZZ
@given(st.data())
def test_mutated_payload_of_valid_bundle(data: st.DataObject) -> None:
    bundle, _ = _valid()
    payload = bytearray(bundle[16:-32])
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    _verify(frame(bytes(payload[:cut] if data.draw(st.booleans()) else payload)))


@FUZZ
@given(st.sampled_from(sorted(entries(_valid()[0]))), st.binary(max_size=2048))
def test_entry_replaced_by_random_bytes(name: str, junk: bytes) -> None:
    # Every metadata file, the manifest and each artifact in turn.
    _verify(rebuild({**entries(_valid()[0]), name: junk}))


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                     | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=12), inner, max_size=6),
                     max_leaves=20)


def _parse_manifest(obj: object) -> None:
    with contextlib.suppress(BundleError):
        manifest_from_json(json.dumps(obj).encode())


@FUZZ
@given(_JSON)
def test_manifest_reader_on_arbitrary_json(obj: object) -> None:
    _parse_manifest(obj)


@FUZZ
@given(st.data(), _JSON)
def test_manifest_reader_on_mutated_manifest(data: st.DataObject, value: object) -> None:
    # One field of a valid manifest (top level, a variant, a tensor) set to any JSON value.
    obj = json.loads(manifest_to_json(FULL))
    target = data.draw(st.sampled_from([obj, obj["artifacts"][0], obj["self_test"][0],
                                        obj["self_test"][0]["inputs"]["x"], obj["inputs"][0]]))
    target[data.draw(st.sampled_from(sorted(target)))] = value
    _parse_manifest(obj)
