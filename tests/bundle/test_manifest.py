"""The manifest data model and its canonical JSON."""

from __future__ import annotations

import json

import pytest

from bundle.errors import MalformedBundleError
from bundle.manifest import (
    ArtifactVariant,
    Manifest,
    SelfTestCase,
    Tensor,
    TensorSpec,
    canonical_json,
    manifest_from_json,
    manifest_to_json,
)

FULL = Manifest(
    name="digits", version=3, profiles=("x86-avx2", "rpi4"),
    artifacts=(ArtifactVariant(path="artifacts/m.onnx", format="onnx", dtype="int8",
                               sha256="a" * 64, size=10, profile="x86-avx2"),),
    inputs=(TensorSpec("x", "float32", (None, 1, 8, 8)),),
    outputs=(TensorSpec("y", "float32", ("batch", 10)),),
    self_test=(SelfTestCase(inputs={"x": Tensor("float32", (1, 2), b"\0" * 8)},
                            expected_outputs={"y": Tensor("float32", (1,), b"\1" * 4)}),),
    baseline={"x": {"mean": 0.5}}, compression_report={"int8": {"accuracy_drop": 0.2}})


def test_round_trip_is_exact() -> None:
    data = manifest_to_json(FULL)
    assert manifest_from_json(data) == FULL
    assert data == canonical_json(json.loads(data))  # canonical: sorted, compact, ASCII


def test_unknown_fields_are_preserved() -> None:
    obj = json.loads(manifest_to_json(FULL))
    obj["future_field"] = {"kept": True}
    obj["artifacts"][0]["accelerator"] = "edgetpu"
    again = manifest_to_json(manifest_from_json(canonical_json(obj)))
    assert json.loads(again) == obj


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda o: o.update(format_version=2), "newer than this reader"),
    (lambda o: o.update(version=True), "must be an integer"),
    (lambda o: o.update(version=0), "must be from 1 to"),
    (lambda o: o.update(version=2**63), "must be from 1 to"),
    (lambda o: o.update(name="../etc"), "not a valid name"),
    (lambda o: o.update(profiles=[]), "at least one profile"),
    (lambda o: o["artifacts"][0].update(path="../m.onnx"), "artifacts/<file name>"),
    (lambda o: o["artifacts"][0].update(sha256="xyz"), "64 lowercase hex"),
    (lambda o: o["self_test"][0]["inputs"]["x"].update(data="!!"), "not base64"),
    (lambda o: o.pop("artifacts"), "must be a JSON array"),
])
def test_invalid_manifests_are_rejected(change, fragment: str) -> None:
    obj = json.loads(manifest_to_json(FULL))
    change(obj)
    with pytest.raises(MalformedBundleError, match=fragment):
        manifest_from_json(canonical_json(obj))


@pytest.mark.parametrize("data", [b"", b"\xff", b"[]", b'{"a": NaN}', b"[" * 100000])
def test_non_json_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedBundleError):
        manifest_from_json(data)
