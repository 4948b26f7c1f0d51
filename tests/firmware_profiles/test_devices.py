"""Accelerators by their devices, not their packages: which device a profile's accelerator
means, the provider options that select it, and profile matching that needs the device."""

from __future__ import annotations

from dataclasses import replace

import pytest

from firmware_profiles import HostCapabilities, get_profile, match_profiles
from firmware_profiles.devices import (
    OPENVINO,
    device_present,
    probe_devices,
    provider_options,
    wanted_device,
)
from firmware_profiles.loader import load_profiles
from firmware_profiles.model import Accelerator

NPU = Accelerator("npu", "npu", "onnxruntime", OPENVINO, None, ("int8",))
GPU = replace(NPU, name="igpu", kind="gpu")
CUDA = Accelerator("gpu", "gpu", "onnxruntime", "CUDAExecutionProvider", None, ("fp16",))
EDGETPU = Accelerator("edgetpu", "tpu", "litert", "edgetpu", "libedgetpu.so.1", ("int8-full",))


def test_the_device_each_accelerator_means() -> None:
    assert (wanted_device(NPU), provider_options(NPU)) == ("NPU", {"device_type": "NPU"})
    assert (wanted_device(GPU), provider_options(GPU)) == ("GPU", {"device_type": "GPU"})
    assert (wanted_device(CUDA), provider_options(CUDA)) == ("cuda:0", {"device_id": "0"})
    assert (wanted_device(EDGETPU), provider_options(EDGETPU)) == (None, {})


@pytest.mark.parametrize(("acc", "devices", "present"), [
    (NPU, {OPENVINO: ("CPU",)}, False),  # the OpenVINO package on a machine with no NPU
    (NPU, {OPENVINO: ("CPU", "NPU")}, True),
    (GPU, {OPENVINO: ("CPU", "GPU.0", "GPU.1")}, True),
    (GPU, {OPENVINO: ()}, False),
    (CUDA, {"CUDAExecutionProvider": ()}, False),  # the CUDA build, no driver or GPU
    (CUDA, {"CUDAExecutionProvider": ("cuda:0",)}, True),
    (NPU, {}, True),  # not probed: the provider's own load decides
    (EDGETPU, {OPENVINO: ("CPU",)}, True),
])
def test_device_present(acc: Accelerator, devices: dict[str, tuple[str, ...]],
                        present: bool) -> None:
    found, why = device_present(acc, devices)
    assert found is present
    if not present:
        assert why.startswith(f"{acc.provider} has no {wanted_device(acc)} device here")


def test_an_openvino_install_is_not_an_npu() -> None:
    """Regression (issue 17): with onnxruntime-openvino on a machine without an NPU, probe
    picked intel-npu because the provider was installed."""
    host = HostCapabilities(
        arch="x86_64", features=frozenset({"avx2", "fma", "avx_vnni", "sse4_2"}),
        memory_mb=32768, onnxruntime_providers=("OpenVINOExecutionProvider",
                                                "CPUExecutionProvider"),
        litert_runtime=None, litert_delegates=(), devices={OPENVINO: ("CPU",)})
    profiles = load_profiles()
    by_name = {m.profile.name: m for m in match_profiles(host, profiles)}
    assert not by_name["intel-npu"].fits
    assert "needs one of its accelerators" in by_name["intel-npu"].reasons[0]
    with_npu = replace(host, devices={OPENVINO: ("CPU", "NPU")})
    best = match_profiles(with_npu, profiles)[0]
    assert best.profile == get_profile("intel-npu")
    assert best.available_accelerators == ("npu",)


def test_probing_this_host() -> None:
    """Nothing here has a GPU driver or an OpenVINO build: no devices, and no error."""
    assert probe_devices(("CPUExecutionProvider",)) == {}
    cuda = probe_devices(("CUDAExecutionProvider",))
    assert set(cuda) == {"CUDAExecutionProvider"}
    assert all(d.startswith("cuda:") for d in cuda["CUDAExecutionProvider"])
