"""The firmware profile records: what one kind of device can run.

Field meanings, types and allowed values are documented in docs/profiles.md; the loader
(``firmware_profiles.loader``) is the only place that builds these from TOML.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ACCELERATOR_KINDS",
    "ARCHES",
    "DTYPES",
    "FEATURES",
    "FORMATS",
    "RUNTIMES",
    "SCHEMA_VERSION",
    "Accelerator",
    "Cpu",
    "Profile",
]

SCHEMA_VERSION = 1
ARCHES = ("x86_64", "aarch64", "armv7")
# Canonical ISA feature names: x86 names as Linux prints them in /proc/cpuinfo, ARM names
# normalised (asimd -> neon, asimddp -> dotprod, asimdhp -> fp16).
FEATURES = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "amx_int8", "neon", "dotprod", "fp16", "i8mm", "bf16", "sve",
)
RUNTIMES = ("onnxruntime", "litert")
ACCELERATOR_KINDS = ("gpu", "npu", "tpu", "dsp")
FORMATS = ("onnx", "tflite")
# int8-full: every tensor integer, inputs and outputs included (Edge TPU, most NPUs).
DTYPES = ("fp32", "fp16", "int8", "int8-full")


@dataclass(frozen=True)
class Cpu:
    """The CPU every device of the kind has."""

    arch: str
    # Each entry is a feature name, or alternatives joined by "|" (any one suffices).
    features: tuple[str, ...]
    cores: int
    # True when the CPU has int8 dot-product instructions (VNNI, dotprod): int8 kernels are
    # then fast, and quantization needs no reduce_range.
    fast_int8: bool


@dataclass(frozen=True)
class Accelerator:
    """An accelerator and the runtime provider (onnxruntime EP or LiteRT delegate) it needs."""

    name: str
    kind: str
    runtime: str
    provider: str  # onnxruntime execution provider name, or LiteRT delegate name
    library: str | None  # shared library of a LiteRT delegate loaded with load_delegate
    dtypes: tuple[str, ...]


@dataclass(frozen=True)
class Profile:
    """One kind of device, as read from ``firmware_profiles/profiles/NAME.toml``."""

    name: str
    description: str
    cpu: Cpu
    accelerators: tuple[Accelerator, ...]
    # When true the profile describes the accelerator, so a host only matches it when one of
    # its accelerators is really available.
    requires_accelerator: bool
    ram_mb: int
    model_budget_mb: int
    storage_mb: int
    formats: tuple[str, ...]  # in order of preference
    dtypes: tuple[str, ...]  # in order of preference
    avoid_ops: tuple[str, ...]
    source: str  # the file it was read from, for messages
