"""Accelerator devices, not just runtimes: which devices an execution provider can reach here,
and the provider options that put a model on the profile's device.

An execution provider being installed says nothing about the hardware: the OpenVINO
package runs on any x86 CPU, CUDA's on a machine with no GPU. So the host probe asks the
devices themselves (:func:`probe_devices`: OpenVINO's available devices, CUDA's device
count) and a profile's accelerator is available only when its device is there
(:func:`device_present`). :func:`provider_options` names that device to the provider, so
OpenVINO runs on the NPU asked for instead of its default (the CPU).

Pure but for :func:`probe_devices`, which imports the runtime or loads the driver library
lazily and turns every failure into "no devices".
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping

from .model import Accelerator

__all__ = ["CUDA_PROVIDERS", "OPENVINO", "device_present", "probe_devices",
           "provider_options", "wanted_device"]

log = logging.getLogger(__name__)

OPENVINO = "OpenVINOExecutionProvider"
CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
#: OpenVINO's device name for an accelerator kind.
_OPENVINO_DEVICE = {"npu": "NPU", "gpu": "GPU"}


def wanted_device(acc: Accelerator) -> str | None:
    """The device ``acc`` means, as its provider names devices (None: the provider has no
    device choice, e.g. CoreML or a LiteRT delegate)."""
    if acc.runtime != "onnxruntime":
        return None
    if acc.provider == OPENVINO:
        return _OPENVINO_DEVICE.get(acc.kind)  # other kinds: OpenVINO's own default
    if acc.provider in CUDA_PROVIDERS:
        return "cuda:0"
    return None


def provider_options(acc: Accelerator) -> dict[str, str]:
    """onnxruntime provider options that select ``acc``'s device."""
    device = wanted_device(acc)
    if device is None:
        return {}
    if acc.provider == OPENVINO:
        return {"device_type": device}
    return {"device_id": device.split(":", 1)[1]}


def device_present(acc: Accelerator, devices: Mapping[str, tuple[str, ...]]) -> tuple[bool, str]:
    """Whether ``acc``'s device is among the probed ``devices`` (provider -> device names),
    and if not, why: for the fallback reason."""
    device = wanted_device(acc)
    if device is None or acc.provider not in devices:
        return True, ""  # nothing to check, or not probed: the provider's load decides
    found = devices[acc.provider]
    if device in found or any(d.startswith(f"{device}.") for d in found):
        return True, ""
    return False, (f"{acc.provider} has no {device} device here (it sees "
                   f"{', '.join(found) or 'none'})")


def probe_devices(providers: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """The devices each device-choosing provider among ``providers`` can reach."""
    devices: dict[str, tuple[str, ...]] = {}
    if OPENVINO in providers:
        devices[OPENVINO] = _openvino_devices()
    cuda = _cuda_devices() if any(p in providers for p in CUDA_PROVIDERS) else ()
    for provider in CUDA_PROVIDERS:
        if provider in providers:
            devices[provider] = cuda
    return devices


def _openvino_devices() -> tuple[str, ...]:
    """OpenVINO's available devices (``CPU``, ``GPU.0``, ``NPU``...), as the OpenVINO build
    of onnxruntime reports them (or the openvino package, if that is what is installed)."""
    try:
        from onnxruntime.capi import _pybind_state

        return tuple(_pybind_state.get_available_openvino_device_ids())
    except (ImportError, AttributeError, RuntimeError) as exc:
        log.debug("onnxruntime does not list OpenVINO devices: %s", exc)
    try:
        import openvino

        return tuple(openvino.Core().available_devices)
    except (ImportError, AttributeError, RuntimeError) as exc:
        log.debug("openvino cannot list devices: %s", exc)
    return ()


def _cuda_devices() -> tuple[str, ...]:
    """``cuda:N`` for each device the CUDA driver counts; none without a driver."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return ()
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return ()
    return tuple(f"cuda:{n}" for n in range(count.value))
