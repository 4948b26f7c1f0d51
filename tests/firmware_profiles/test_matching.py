"""Profile matching (pure, hand-built hosts) and probing of this real machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware_profiles import (
    HostCapabilities,
    best_profile,
    load_profiles,
    match_profiles,
    probe_host,
)
from firmware_profiles.host import normalise_arch, parse_cpu_features
from firmware_profiles.runtimes import import_litert

PROFILES = load_profiles()
X86 = frozenset({"sse4_2", "avx", "avx2", "fma"})
ARM = frozenset({"neon"})


def host(arch: str = "x86_64", features: frozenset[str] = X86, memory_mb: int = 8192,
         providers: tuple[str, ...] = ("CPUExecutionProvider",),
         delegates: tuple[str, ...] = ("xnnpack",)) -> HostCapabilities:
    return HostCapabilities(arch=arch, features=features, memory_mb=memory_mb,
                            onnxruntime_providers=providers, litert_runtime="ai-edge-litert",
                            litert_delegates=delegates)


CASES = [
    ("vnni_gateway", host(features=X86 | {"avx512_vnni"}), "x86-64-vnni"),
    ("avx_vnni_gateway", host(features=X86 | {"avx_vnni"}), "x86-64-vnni"),
    ("avx2_gateway", host(), "x86-64-avx2"),
    ("rpi5", host("aarch64", ARM | {"dotprod", "fp16"}), "rpi5"),
    ("rpi4", host("aarch64", ARM), "rpi4"),
    ("jetson_cuda", host("aarch64", ARM | {"dotprod"},
                         providers=("CUDAExecutionProvider", "CPUExecutionProvider")),
     "jetson-orin"),
    ("coral", host("aarch64", ARM, delegates=("xnnpack", "edgetpu")), "coral-edgetpu"),
    ("android", host("aarch64", ARM | {"dotprod"},
                     providers=("NnapiExecutionProvider", "CPUExecutionProvider")),
     "android-nnapi"),
    ("intel_npu", host(features=X86 | {"avx_vnni"},
                       providers=("OpenVINOExecutionProvider", "CPUExecutionProvider")),
     "intel-npu"),
    ("small_memory_rpi", host("aarch64", ARM, memory_mb=300), "rpi4"),
]


@pytest.mark.parametrize(("capabilities", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_best_profile(capabilities: HostCapabilities, expected: str) -> None:
    best = best_profile(capabilities, PROFILES)
    assert best is not None
    assert best.name == expected


def test_no_fit_explains_every_missing_requirement() -> None:
    riscv = host("riscv64", frozenset())
    assert best_profile(riscv, PROFILES) is None
    rpi5 = next(m for m in match_profiles(riscv, PROFILES) if m.profile.name == "rpi5")
    assert not rpi5.fits
    assert rpi5.reasons == ("needs a aarch64 CPU, host is riscv64", "needs ISA feature neon",
                            "needs ISA feature dotprod")


def test_accelerator_profile_needs_its_provider() -> None:
    cpu_only_arm = host("aarch64", ARM | {"dotprod"})
    jetson = next(m for m in match_profiles(cpu_only_arm, PROFILES)
                  if m.profile.name == "jetson-orin")
    assert not jetson.fits
    assert "TensorrtExecutionProvider" in jetson.reasons[-1]


def test_memory_below_budget_does_not_fit() -> None:
    tiny = host(features=X86 | {"avx512_vnni"}, memory_mb=256)
    names = [m.profile.name for m in match_profiles(tiny, PROFILES) if m.fits]
    assert names == []


def test_ranking_is_deterministic_and_fitting_first() -> None:
    capabilities = host(features=X86 | {"avx512_vnni"})
    ranked = match_profiles(capabilities, PROFILES)
    assert ranked == match_profiles(capabilities, list(reversed(PROFILES)))
    assert [m.fits for m in ranked] == sorted((m.fits for m in ranked), reverse=True)
    assert [m.profile.name for m in ranked[:2]] == ["x86-64-vnni", "x86-64-avx2"]


@pytest.mark.parametrize(("machine", "arch"), [("x86_64", "x86_64"), ("AMD64", "x86_64"),
                                               ("arm64", "aarch64"), ("armv7l", "armv7")])
def test_normalise_arch(machine: str, arch: str) -> None:
    assert normalise_arch(machine) == arch


def test_parse_cpu_features_x86_and_arm() -> None:
    x86 = "processor\t: 0\nflags\t\t: fpu sse4_2 avx2 fma avx512_vnni ht\n"
    assert parse_cpu_features(x86) == {"sse4_2", "avx2", "fma", "avx512_vnni"}
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm asimddp asimdhp i8mm\n"
    assert parse_cpu_features(arm) == {"neon", "dotprod", "fp16", "i8mm"}
    assert parse_cpu_features("") == frozenset()


def test_probe_this_host() -> None:
    probed = probe_host(PROFILES)
    assert probed.memory_mb > 0
    assert "CPUExecutionProvider" in probed.onnxruntime_providers
    assert probed.litert_runtime == "ai-edge-litert"
    assert "xnnpack" in probed.litert_delegates
    assert "edgetpu" not in probed.litert_delegates or Path("/dev/apex_0").exists()
    if probed.arch == "x86_64":
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        assert ("avx2" in probed.features) == (" avx2" in cpuinfo)
        vnni = " avx512_vnni" in cpuinfo or " avx_vnni" in cpuinfo
        best = best_profile(probed, PROFILES)
        assert best is not None
        assert best.name == ("x86-64-vnni" if vnni else "x86-64-avx2")


def test_import_litert_prefers_ai_edge_litert() -> None:
    litert = import_litert()
    assert litert is not None
    assert litert.distribution == "ai-edge-litert"
    assert hasattr(litert.interpreter, "Interpreter")
