"""``fleet keys`` and ``fleet bundle`` through ``main([...])``: exit codes and output."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from onnx import TensorProto, helper

from bundle.trust import TrustedState, verify_bundle
from fleet_server.cli import main
from tests.bundle.repo import NOW


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _tiny_onnx() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny", [x], [y])
    data: bytes = helper.make_model(graph).SerializeToString()
    return data


@pytest.fixture
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    code, out, _ = _run(capsys, "keys", "init", "--dir", tmp_path / "keys")
    assert code == 0, out
    return tmp_path / "keys"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(b"weights" * 100)
    return path


def _build(capsys: pytest.CaptureFixture[str], keys: Path, out: Path, *extra: str | Path,
           version: int = 1) -> tuple[int, str, str]:
    return _run(capsys, "bundle", "build", "--name", "digits", "--version", str(version),
                "--keys", keys, "--out", out, *extra)


def test_keys_init_layout(keys: Path) -> None:
    root_keys = list((keys / "offline").glob("root-*.pem"))
    online = sorted(p.name.split("-")[0] for p in (keys / "online").glob("*.pem"))
    assert len(root_keys) == 1
    assert online == ["snapshot", "targets", "timestamp"]
    for key in [*root_keys, *(keys / "online").glob("*.pem")]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "OFFLINE" in (keys / "offline" / "README.txt").read_text()
    assert json.loads((keys / "root.json").read_bytes())["signed"]["version"] == 1


def test_keys_init_refuses_existing_dir(keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "keys", "init", "--dir", keys)
    assert code == 1
    assert err.count("\n") == 1
    assert "already holds keys" in err


def test_build_then_verify(keys: Path, model: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.efb"
    code, stdout, err = _build(capsys, keys, out, "--model", model, "--profile", "x86-avx2")
    assert code == 0, err
    assert "digits v1" in stdout
    root = keys / "root.json"
    code, stdout, _ = _run(capsys, "bundle", "verify", out, "--root", root)
    assert code == 0
    assert stdout.startswith("OK digits v1 for profiles x86-avx2")
    code, stdout, _ = _run(capsys, "bundle", "verify", out, "--root", root, "--json")
    assert json.loads(stdout)["artifacts"][0]["path"] == "artifacts/model.bin"


@pytest.mark.parametrize(("mangle", "reason"), [
    (lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:], "ChecksumError"),
    (lambda data: data, "WrongProfileError"),
])
def test_verify_failure_is_one_line(keys: Path, model: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str], *, mangle,
                                    reason: str) -> None:
    out = tmp_path / "b.efb"
    _build(capsys, keys, out, "--model", model, "--profile", "x86-avx2")
    out.write_bytes(mangle(out.read_bytes()))
    code, stdout, err = _run(capsys, "bundle", "verify", out, "--root",
                             keys / "root.json", "--profile", "rpi4")
    assert code == 1
    assert stdout == ""
    assert err.count("\n") == 1
    assert err.startswith(f"fleet: error: {reason}: ")


def test_versions_only_go_up(keys: Path, model: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    _build(capsys, keys, tmp_path / "1.efb", "--model", model, "--profile", "p", version=2)
    code, _, err = _build(capsys, keys, tmp_path / "2.efb", "--model", model, "--profile", "p",
                          version=2)
    assert code == 1
    assert "use --version 3 or higher" in err


@pytest.mark.parametrize("days", ["-5", "0", "99999", "soon"])
def test_validity_is_checked_before_the_version_is_used(
        days: str, keys: Path, model: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _build(capsys, keys, tmp_path / "1.efb", "--model", model, "--profile", "p",
               "--valid-days", days)
    assert exit_info.value.code == 2
    assert "not a number of days from 1 to 3650" in capsys.readouterr().err
    assert not (tmp_path / "1.efb").exists()
    code, _, err = _build(capsys, keys, tmp_path / "1.efb", "--model", model, "--profile", "p")
    assert code == 0, err  # version 1 is still free


def test_artifacts_dir_with_report(keys: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    art = tmp_path / "compressed"
    art.mkdir()
    (art / "m.fp32.onnx").write_bytes(_tiny_onnx())
    (art / "m.int8.tflite").write_bytes(b"TFL3" * 50)
    (art / "report.json").write_text(json.dumps({
        "variants": [{"file": "m.fp32.onnx", "format": "onnx", "dtype": "fp32"},
                     {"file": "m.int8.tflite", "format": "tflite", "dtype": "int8",
                      "profile": "rpi4"}],
        "profiles": ["rpi4", "x86-avx2"],
        "self_test": [{"inputs": {"x": {"dtype": "float32", "shape": [1, 4],
                                        "data": "AAAAAAAAAAAAAAAAAAAAAA=="}},
                       "expected_outputs": {"y": {"dtype": "float32", "shape": [1, 4],
                                                  "data": "AAAAAAAAAAAAAAAAAAAAAA=="}}}],
        "baseline": {"x": {"mean": [0.0]}},
        "int8": {"accuracy_drop": 0.3}}))
    out = tmp_path / "b.efb"
    code, _, err = _build(capsys, keys, out, "--artifacts", art)
    assert code == 0, err
    verified = verify_bundle(out.read_bytes(), TrustedState(
        root=(keys / "root.json").read_bytes()), now=NOW, profile="rpi4")
    m = verified.manifest
    assert m.profiles == ("rpi4", "x86-avx2")
    assert [(a.format, a.dtype, a.profile) for a in m.artifacts] == [
        ("onnx", "fp32", None), ("tflite", "int8", "rpi4")]
    assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [("x", "float32", ("batch", 4))]
    assert len(m.self_test) == 1
    assert m.compression_report["int8"] == {"accuracy_drop": 0.3}


def test_artifacts_dir_without_report_infers_formats(keys: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    art = tmp_path / "compressed"
    art.mkdir()
    (art / "m.onnx").write_bytes(_tiny_onnx())
    (art / "notes.txt").write_text("ignored")
    out = tmp_path / "b.efb"
    assert _build(capsys, keys, out, "--artifacts", art, "--profile", "x86")[0] == 0
    code, stdout, _ = _run(capsys, "bundle", "verify", out, "--root",
                           keys / "root.json")
    assert code == 0
    assert "artifacts/m.onnx  onnx fp32" in stdout
    verified = verify_bundle(out.read_bytes(), TrustedState(
        root=(keys / "root.json").read_bytes()), now=NOW)
    # No report.json: the signature was read from the ONNX model itself.
    assert [(s.name, s.shape) for s in verified.manifest.outputs] == [("y", ("batch", 4))]


def test_rotation_keeps_old_devices_working(keys: Path, model: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    for role in ("root", "timestamp", "root"):
        code, stdout, err = _run(capsys, "keys", "rotate", "--dir", keys, "--role", role)
        assert code == 0, err
    assert "root is now v4" in stdout
    assert len(list((keys / "offline" / "retired").glob("root-*.pem"))) == 2
    out = tmp_path / "b.efb"
    assert _build(capsys, keys, out, "--model", model, "--profile", "p")[0] == 0
    pinned_v1 = keys / "repository" / "root_history" / "1.root.json"
    code, stdout, _ = _run(capsys, "bundle", "verify", out, "--root", pinned_v1)
    assert code == 0
    assert "trusted root v4" in stdout


def test_rotate_root_with_threshold_2_of_3(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert _run(capsys, "keys", "init", "--dir", keys, "--root-keys", "3",
                "--root-threshold", "2")[0] == 0
    code, _, err = _run(capsys, "keys", "rotate", "--dir", keys, "--role", "root")
    assert code == 0, err
    root = json.loads((keys / "root.json").read_bytes())
    assert root["signed"]["roles"]["root"]["threshold"] == 2
    assert len(root["signatures"]) == 6  # three old keys vouch, three new keys prove


def test_rotate_without_offline_keys_fails(keys: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "usb"
    empty.mkdir()
    code, _, err = _run(capsys, "keys", "rotate", "--dir", keys, "--role", "targets",
                        "--offline-dir", empty)
    assert code == 1
    assert "no root key of the current root" in err


def test_encrypt_for_device(keys: Path, model: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    pub = tmp_path / "device.pub"
    pub.write_bytes(X25519PrivateKey.generate().public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    out = tmp_path / "b.efb"
    code, stdout, err = _build(capsys, keys, out, "--model", model, "--profile", "p",
                               "--encrypt-for", pub)
    assert code == 0, err
    assert "encrypted" in stdout
    code, stdout, _ = _run(capsys, "bundle", "verify", out, "--root",
                           keys / "root.json")
    assert code == 0
    assert " encrypted" in stdout


@pytest.mark.parametrize(("args", "fragment"), [
    (("--artifacts", "missing-dir", "--profile", "p"), "is not a directory"),
    (("--model", "missing.onnx", "--profile", "p"), "cannot read"),
    (("--model", "{model}"), "no target profile"),
])
def test_build_input_errors(keys: Path, model: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str], *, args: tuple[str, ...],
                            fragment: str) -> None:
    argv = [str(model) if a == "{model}" else str(tmp_path / a) if "missing" in a else a
            for a in args]
    code, _, err = _build(capsys, keys, tmp_path / "b.efb", *argv)
    assert code == 1
    assert err.count("\n") == 1
    assert fragment in err


def test_build_without_keys_says_run_init(model: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _build(capsys, tmp_path / "nokeys", tmp_path / "b.efb", "--model", model,
                          "--profile", "p")
    assert code == 1
    assert "run 'fleet keys init' first" in err


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bundle", "build", "--name", "x"])
    assert exc.value.code == 2
    capsys.readouterr()


def test_verify_checks_the_size_before_reading_the_file(
        keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # issue 9 item 11: a 600 MB file was read whole (657 MB RSS) before the size check.
    import tracemalloc

    huge = tmp_path / "huge.efb"
    with open(huge, "wb") as f:
        f.truncate(600 * 1024 * 1024)  # sparse: no disk used
    tracemalloc.start()
    try:
        code, _, err = _run(capsys, "bundle", "verify", huge, "--root", keys / "root.json")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 1
    assert err.startswith("fleet: error: OversizeError: ")
    assert peak < 16 * 1024 * 1024


def test_build_with_delta_from_writes_the_delta_bundle_beside(
        keys: Path, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v1 = tmp_path / "d1.efb"
    assert _build(capsys, keys, v1, "--model", model, "--profile", "p")[0] == 0
    model.write_bytes(b"weights" * 90 + b"tuned!!" * 10)
    code, out, _ = _build(capsys, keys, tmp_path / "d2.efb", "--model", model, "--profile", "p",
                          "--delta-from", v1, version=2)
    assert code == 0, out
    delta = tmp_path / "d2.from-v1.efb"
    assert f"built {delta}: the delta bundle from v1" in out
    code, out, _ = _run(capsys, "bundle", "verify", delta, "--root", keys / "root.json",
                        "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["delta_base"] == 1
    assert summary["artifacts"][0]["deltas"][0]["base_version"] == 1
    # A later build from a bundle of another model, or no artifact of the same name, fails.
    other = tmp_path / "other.bin"
    other.write_bytes(b"x" * 10)
    code, _, err = _build(capsys, keys, tmp_path / "d3.efb", "--model", other, "--profile",
                          "p", "--delta-from", v1, version=3)
    assert code == 1
    assert "deltas pair artifacts by name" in err


@pytest.mark.parametrize(("declaration", "fragment"), [
    ("not json", "is not JSON"),
    ('{"kind": "cascade", "members": ["artifacts/model.bin"], "output": "y", '
     '"threshold": 0.5}', "a cascade has two members"),
    ('{"kind": "ensemble", "members": ["artifacts/model.bin", "artifacts/other.bin"], '
     '"output": "y", "combiner": "mean"}', "artifacts/other.bin not among the bundle's"),
])
def test_build_composite_declaration_errors(keys: Path, model: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str], *,
                                            declaration: str, fragment: str) -> None:
    (tmp_path / "decl.json").write_text(declaration)
    code, _, err = _build(capsys, keys, tmp_path / "b.efb", "--model", model, "--profile", "p",
                          "--composite", tmp_path / "decl.json")
    assert code == 1
    assert err.count("\n") == 1
    assert fragment in err
    assert not (tmp_path / "b.efb").exists()
