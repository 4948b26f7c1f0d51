"""The profile loader: every packaged profile loads; every kind of malformed file is named."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_profiles import (
    PROFILES_DIR,
    InvalidProfileError,
    ProfileError,
    UnknownProfileError,
    get_profile,
    load_profile,
    load_profiles,
    parse_profile,
)

REQUIRED = {"x86-64-avx2", "x86-64-vnni", "rpi4", "rpi5", "jetson-orin", "coral-edgetpu",
            "android-nnapi", "intel-npu"}

VALID = """\
schema_version = 1
name = "dev"
description = "a test device"

[cpu]
arch = "x86_64"
features = ["avx2", "avx512_vnni|avx_vnni"]
cores = 2
fast_int8 = true

[memory]
ram_mb = 1024
model_budget_mb = 128
storage_mb = 512

[models]
formats = ["onnx"]
dtypes = ["int8", "fp32"]

[[accelerators]]
name = "tpu"
kind = "tpu"
runtime = "litert"
provider = "edgetpu"
library = "libedgetpu.so.1"
dtypes = ["int8-full"]
"""


def test_packaged_profiles_all_load() -> None:
    profiles = load_profiles()
    assert {p.name for p in profiles} >= REQUIRED
    for profile in profiles:
        assert profile.formats
        assert profile.dtypes
        assert profile.model_budget_mb <= profile.ram_mb
        assert not profile.requires_accelerator or profile.accelerators


def test_profile_semantics_that_decisions_depend_on() -> None:
    assert get_profile("x86-64-vnni").cpu.fast_int8
    assert not get_profile("x86-64-avx2").cpu.fast_int8
    assert "dotprod" in get_profile("rpi5").cpu.features
    assert "dotprod" not in get_profile("rpi4").cpu.features
    coral = get_profile("coral-edgetpu")
    assert coral.dtypes == ("int8-full",)
    assert coral.accelerators[0].library == "libedgetpu.so.1"
    jetson = get_profile("jetson-orin")
    assert jetson.dtypes[0] == "fp16"
    assert {a.provider for a in jetson.accelerators} == {
        "TensorrtExecutionProvider", "CUDAExecutionProvider"}
    assert get_profile("intel-npu").accelerators[0].provider == "OpenVINOExecutionProvider"


def test_valid_text_parses_to_the_record() -> None:
    profile = parse_profile(VALID, "dev.toml")
    assert profile.cpu.features == ("avx2", "avx512_vnni|avx_vnni")
    assert profile.accelerators[0].dtypes == ("int8-full",)
    assert profile.avoid_ops == ()
    assert profile.source == "dev.toml"


def _edit(old: str, new: str) -> str:
    assert old in VALID, old
    return VALID.replace(old, new, 1)


# (case, profile text, dotted key the error must name, fragment of the problem)
INVALID = [
    ("toml_syntax", _edit('cores = 2', 'cores = = 2'), "", "not valid TOML"),
    ("missing_required", _edit('ram_mb = 1024\n', ''), "memory.ram_mb", "missing"),
    ("missing_table", VALID.split("[cpu]", maxsplit=1)[0], "cpu", "missing"),
    ("wrong_type", _edit('cores = 2', 'cores = "two"'), "cpu.cores", "expected an integer"),
    ("bool_for_int", _edit('cores = 2', 'cores = true'), "cpu.cores", "expected an integer"),
    ("unknown_key", _edit('cores = 2', 'cores = 2\ncore = 3'), "cpu.core", "unknown key"),
    ("unknown_top_key", _edit('schema_version = 1', 'schema_version = 1\nnmae = "x"'),
     "nmae", "unknown key"),
    ("unknown_feature", _edit('"avx2", ', '"avx3", '), "cpu.features[0]",
     "unknown value 'avx3'"),
    ("unknown_alternative", _edit('avx512_vnni|avx_vnni', 'avx512_vnni|vnni2'),
     "cpu.features[1]", "unknown value 'vnni2'"),
    ("unknown_arch", _edit('arch = "x86_64"', 'arch = "mips"'), "cpu.arch", "unknown value"),
    ("unknown_dtype", _edit('dtypes = ["int8", "fp32"]', 'dtypes = ["int4"]'),
     "models.dtypes[0]", "unknown value 'int4'"),
    ("empty_formats", _edit('formats = ["onnx"]', 'formats = []'), "models.formats",
     "at least one"),
    ("negative_budget", _edit('storage_mb = 512', 'storage_mb = -5'), "memory.storage_mb",
     "at least 1"),
    ("budget_over_ram", _edit('model_budget_mb = 128', 'model_budget_mb = 4096'),
     "memory.model_budget_mb", "exceeds ram_mb"),
    ("name_not_stem", _edit('name = "dev"', 'name = "other"'), "name",
     "does not match the file name"),
    ("schema_version", _edit('schema_version = 1', 'schema_version = 2'), "schema_version",
     "unsupported version 2"),
    ("accelerator_runtime", _edit('runtime = "litert"', 'runtime = "tensorflow"'),
     "accelerators[0].runtime", "unknown value"),
    ("library_for_onnxruntime", _edit('runtime = "litert"', 'runtime = "onnxruntime"'),
     "accelerators[0].library", "only LiteRT delegates"),
    ("requires_without_accelerators",
     VALID.split("[[accelerators]]", maxsplit=1)[0].replace('description = "a test device"',
                                                'description = "d"\nrequires_accelerator = true'),
     "requires_accelerator", "no [[accelerators]]"),
    ("accelerators_not_tables",
     VALID.split("[[accelerators]]", maxsplit=1)[0].replace("schema_version = 1",
                                                "schema_version = 1\naccelerators = [1]"),
     "accelerators[0]", "expected a table"),
]


@pytest.mark.parametrize(("text", "key", "problem"), [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid_profile_names_file_and_key(text: str, key: str, problem: str) -> None:
    with pytest.raises(InvalidProfileError) as caught:
        parse_profile(text, "dev.toml")
    error = caught.value
    assert error.file == "dev.toml"
    assert error.key == key
    assert problem in error.problem
    message = str(error)
    assert message.startswith("dev.toml: ")
    assert "\n" not in message
    if key:
        assert f"key '{key}'" in message


def test_load_profile_reads_files_and_reports_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "dev.toml"
    path.write_text(VALID, encoding="utf-8")
    assert load_profile(path).name == "dev"
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(InvalidProfileError, match=re.escape(f"{path}: cannot read it")):
        load_profile(path)


def test_get_profile_unknown_lists_known() -> None:
    with pytest.raises(UnknownProfileError, match=r"no profile named 'rpi9'.*known: .*rpi5"):
        get_profile("rpi9")


def test_load_profiles_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(UnknownProfileError, match=r"no \*\.toml profiles"):
        load_profiles(tmp_path)


def test_packaged_directory_is_the_default() -> None:
    assert {p.stem for p in PROFILES_DIR.glob("*.toml")} == {p.name for p in load_profiles()}


_toml_values = st.recursive(
    st.one_of(st.booleans(), st.integers(-5, 5000), st.text(max_size=12),
              st.sampled_from(["x86_64", "aarch64", "avx2", "neon", "int8", "onnx", "litert"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(
                                ["cpu", "arch", "features", "cores", "memory", "ram_mb",
                                 "models", "formats", "dtypes", "accelerators", "name"]),
                                inner, max_size=5)),
    max_leaves=12)


def _to_toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_to_toml(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{k} = {_to_toml(v)}" for k, v in value.items()) + "}"


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["schema_version", "name", "description", "cpu",
                                        "memory", "models", "accelerators",
                                        "requires_accelerator"]),
                       _toml_values, max_size=8))
def test_parser_only_raises_profile_errors_on_structured_input(doc: dict[str, object]) -> None:
    text = "\n".join(f"{key} = {_to_toml(value)}" for key, value in doc.items())
    with contextlib.suppress(ProfileError):
        parse_profile(text, "dev.toml")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parser_only_raises_profile_errors_on_arbitrary_text(text: str) -> None:
    with contextlib.suppress(ProfileError):
        parse_profile(VALID[: len(text) % len(VALID)] + text, "dev.toml")
