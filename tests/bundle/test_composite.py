"""The manifest's optional composite declaration: round trip, old bytes kept, bad ones refused."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bundle.composite import CompositeDecl, composite_from_obj, composite_to_obj
from bundle.errors import MalformedBundleError
from bundle.manifest import ArtifactVariant, Manifest, manifest_from_json, manifest_to_json
from bundle.signing import ArtifactInput, rerelease_bundle
from bundle.trust import TrustedState, verify_bundle
from tests.bundle.repo import MODEL, NOW, ONLINE, VALID, Repo, spec

CHEAP = ArtifactVariant(path="artifacts/cnn.onnx", format="onnx", dtype="fp32",
                        sha256="a" * 64, size=10)
COSTLY = ArtifactVariant(path="artifacts/vit.onnx", format="onnx", dtype="fp32",
                         sha256="b" * 64, size=20)
CASCADE = CompositeDecl("cascade", ("artifacts/cnn.onnx", "artifacts/vit.onnx"), "logits",
                        threshold=0.93)
PLAIN = Manifest(name="digits", version=1, profiles=("x86-avx2",), artifacts=(CHEAP, COSTLY))


def test_round_trip_and_old_manifests_unchanged() -> None:
    with_composite = dataclasses.replace(PLAIN, composite=CASCADE)
    assert manifest_from_json(manifest_to_json(with_composite)) == with_composite
    assert b"composite" not in manifest_to_json(PLAIN)
    ensemble = CompositeDecl("ensemble", ("artifacts/cnn.onnx", "artifacts/vit.onnx"), "logits",
                             combiner="weighted", weights=(2.0, 1.0))
    assert composite_from_obj(composite_to_obj(ensemble)) == ensemble


def test_members_must_be_artifacts_of_the_bundle() -> None:
    obj = json.loads(manifest_to_json(dataclasses.replace(PLAIN, composite=CASCADE)))
    obj["composite"]["members"][1] = "artifacts/other.onnx"
    with pytest.raises(MalformedBundleError, match="not among the bundle's artifacts"):
        manifest_from_json(json.dumps(obj).encode())


@pytest.mark.parametrize(("obj", "fragment"), [
    ({"kind": "cascade", "members": ["a", "b"], "output": "y"}, "needs a threshold"),
    ({"kind": "cascade", "members": ["a", "b", "c"], "output": "y", "threshold": 0.5},
     "two members"),
    ({"kind": "ensemble", "members": ["a", "b"], "output": "y"}, "needs one of mean"),
    ({"kind": "ensemble", "members": ["a", "b"], "output": "y", "combiner": "weighted",
      "weights": [1]}, "one non-negative weight per member"),
    ({"kind": "ensemble", "members": ["a"], "output": "y", "combiner": "mean"}, "2 to 8"),
    ({"kind": "stack", "members": ["a", "b"], "output": "y"}, "must be one of"),
    ({"kind": "cascade", "members": ["a", "a"], "output": "y", "threshold": 0.5}, "differ"),
])
def test_bad_declarations_name_the_field(obj: dict[str, Any], fragment: str) -> None:
    with pytest.raises(MalformedBundleError, match=fragment):
        composite_from_obj(obj)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@given(st.dictionaries(st.sampled_from(["kind", "members", "output", "scores", "combiner",
                                        "weights", "threshold"]), _json))
def test_parser_raises_only_its_own_error(obj: dict[str, Any]) -> None:
    try:
        decl = composite_from_obj(obj)
    except MalformedBundleError:
        return
    assert decl.kind in ("ensemble", "cascade")


def test_signed_bundle_carries_the_declaration_through_a_re_release() -> None:
    repo = Repo()
    artifacts = (ArtifactInput("cnn.onnx", MODEL, "onnx", "fp32"),
                 ArtifactInput("vit.onnx", MODEL[:100], "onnx", "fp32"))
    built = repo.build(dataclasses.replace(spec(artifacts=artifacts), composite=CASCADE))
    verified = verify_bundle(built, TrustedState(root=repo.root), now=NOW, profile="x86-avx2")
    assert verified.manifest.composite == CASCADE
    repo.metadata_version += 1
    again = rerelease_bundle(built, version=2, root_chain=repo.root_chain,
                             signers={r: repo.signers[r] for r in ONLINE},
                             metadata_version=repo.metadata_version, expires=VALID)
    assert verify_bundle(again, TrustedState(root=repo.root), now=NOW).manifest.composite \
        == CASCADE
