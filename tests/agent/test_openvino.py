"""With onnxruntime's OpenVINO build (onnxruntime-openvino, which replaces onnxruntime) on a
machine without an NPU: the NPU a profile asks for is found missing by asking OpenVINO's
devices, the model falls back to onnxruntime's CPU provider with the reason, and status,
metadata and telemetry say which device runs it. Skipped, with the reason, where the
OpenVINO build is not the installed onnxruntime."""

from __future__ import annotations

import pytest

from agent.metrics import ModelReading
from agent.runtime import Runtime
from agent.sessions import open_session, zero_feeds
from firmware_profiles import get_profile
from firmware_profiles.devices import OPENVINO, probe_devices
from firmware_profiles.host import probe_host
from firmware_profiles.loader import load_profiles
from firmware_profiles.matching import match_profiles
from firmware_profiles.model import Accelerator
from tests.agent.bundles import DIGITS

ort = pytest.importorskip("onnxruntime")
if OPENVINO not in ort.get_available_providers():
    pytest.skip("onnxruntime here is not the OpenVINO build (pip install onnxruntime-openvino "
                "in place of onnxruntime)", allow_module_level=True)
DEVICES = probe_devices(tuple(ort.get_available_providers()))[OPENVINO]
if "NPU" in DEVICES:
    pytest.skip("this machine has an NPU: the fallback cannot be shown", allow_module_level=True)


def test_openvino_lists_its_devices() -> None:
    assert "CPU" in DEVICES


def test_the_npu_asked_for_is_not_taken_for_granted() -> None:
    npu = get_profile("intel-npu")
    session = open_session(DIGITS, "onnx", npu.accelerators)
    assert session.backend == "onnxruntime:CPUExecutionProvider"
    assert session.device == "cpu"
    assert session.fallback == (f"{OPENVINO} has no NPU device here (it sees "
                                f"{', '.join(DEVICES)})")
    host = probe_host(load_profiles())
    intel_npu = next(m for m in match_profiles(host, load_profiles())
                     if m.profile.name == "intel-npu")
    assert not intel_npu.fits


def test_openvino_serving_reports_the_device_it_applied() -> None:
    """An accelerator kind OpenVINO has no device name for gets its default device; the
    session proves it with a run and reports what OpenVINO applied."""
    other = Accelerator("vpu", "dsp", "onnxruntime", OPENVINO, None, ("fp32",))
    session = open_session(DIGITS, "onnx", [other])
    assert session.backend == f"onnxruntime:{OPENVINO}"
    assert session.device == "CPU"
    assert session.fallback is None
    assert session.run(zero_feeds(session.inputs))[0].shape == (1, 10)


def test_status_metadata_and_telemetry_say_the_device() -> None:
    runtime = Runtime(profile=get_profile("intel-npu"))
    info = runtime.load_file(DIGITS, "digits")
    assert info.device == "cpu"
    assert info.fallback is not None
    assert "no NPU device" in info.fallback
    model = runtime.status()["models"][0]
    assert (model["device"], model["backend"]) == ("cpu", "onnxruntime:CPUExecutionProvider")
    assert "no NPU device" in model["fallback"]
    reading = ModelReading(info.version, info.state, info.backend, info.fallback,
                           device=info.device)
    assert reading.device == "cpu"
