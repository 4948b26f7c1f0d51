"""Choosing the artifact variant a device runs."""

from __future__ import annotations

import dataclasses

import pytest

from agent.errors import InstallError
from agent.variants import choose_variant, composite_members
from bundle.composite import CompositeDecl
from bundle.manifest import ArtifactVariant, Manifest
from tests.agent.conftest import profile


def _manifest(*variants: tuple[str, str, str | None]) -> Manifest:
    return Manifest(name="m", version=1, profiles=("x86-64-avx2", "coral-edgetpu", "rpi4"),
                    artifacts=tuple(ArtifactVariant(
                        path=f"artifacts/{i}.{fmt}", format=fmt, dtype=dtype, sha256="0" * 64,
                        size=1, profile=prof) for i, (fmt, dtype, prof) in enumerate(variants)))


BUNDLE = _manifest(("onnx", "fp32", None), ("onnx", "int8", "x86-64-avx2"),
                   ("onnx", "int8", "x86-64-vnni"), ("tflite", "fp32", None))


@pytest.mark.parametrize(("profile_name", "formats", "chosen"), [
    ("x86-64-avx2", {"onnx", "tflite"}, "artifacts/1.onnx"),  # made for this profile
    ("x86-64-vnni", {"onnx", "tflite"}, "artifacts/2.onnx"),
    ("rpi4", {"onnx", "tflite"}, "artifacts/3.tflite"),  # its preferred format
    ("rpi4", {"onnx"}, "artifacts/0.onnx"),  # the runtime installed; never another's int8
    (None, {"onnx", "tflite"}, "artifacts/0.onnx"),  # generic CPU: fp32 first
])
def test_choice(profile_name: str | None, formats: set[str], chosen: str) -> None:
    device = profile(profile_name) if profile_name else None
    assert choose_variant(BUNDLE, device, formats).path == chosen


def test_nothing_fits_names_what_the_bundle_offers() -> None:
    with pytest.raises(InstallError, match=r"no artifact this device can run \(profile "
                       r"coral-edgetpu, runtimes for onnx, tflite\); it offers "
                       r"artifacts/0.onnx") as caught:
        choose_variant(BUNDLE, profile("coral-edgetpu"), {"onnx", "tflite"})
    assert caught.value.reason == "no_variant"


def test_a_composite_runs_every_member_in_declared_order() -> None:
    composite = dataclasses.replace(BUNDLE, composite=CompositeDecl(
        "cascade", ("artifacts/3.tflite", "artifacts/0.onnx"), "logits", threshold=0.5))
    members = composite_members(composite, profile("rpi4"), {"onnx", "tflite"})
    assert [m.path for m in members] == ["artifacts/3.tflite", "artifacts/0.onnx"]
    with pytest.raises(InstallError, match=r"member artifacts/3.tflite \(tflite, profile "
                       r"any\) this device cannot run") as caught:
        composite_members(composite, profile("rpi4"), {"onnx"})
    assert caught.value.reason == "no_variant"
    made_for_another = dataclasses.replace(composite, composite=CompositeDecl(
        "ensemble", ("artifacts/0.onnx", "artifacts/2.onnx"), "logits", combiner="mean"))
    with pytest.raises(InstallError, match=r"artifacts/2\.onnx \(onnx, profile x86-64-vnni\)"):
        composite_members(made_for_another, profile("x86-64-avx2"), {"onnx"})
