"""Delta benchmark: edgefleet's weight-level deltas against generic binary deltas (issue 18).

For each pair of model versions (base -> target), side by side in one run:

- **edgefleet**: :func:`bundle.delta.make_delta`, through ``build_release`` (its "make"
  time includes signing the release; per tensor: copy, XOR or byte-wise
  difference as byte planes, zstd with the base tensor as dictionary; whole-file patch-from
  as the last resort), applied streaming by :func:`bundle.delta.apply_delta`;
- **bsdiff**: ``bsdiff4.diff`` / ``bsdiff4.patch``;
- **zstd --patch-from**: python-zstandard at level 19 with the whole base as a raw-content
  dictionary and a window over all of it (what ``zstd -19 --long --patch-from`` does);
- **gzip**: the full target file, gzip -9 (no delta: the baseline).

Reported per case: bytes on the wire (the delta alone, and edgefleet's whole delta bundle
with its signed metadata beside the full bundle's), and the time and peak memory to apply
on the device, in a fresh child process per method and case that applies twice: the
figures are the second apply's (peak RSS growth from ``VmHWM``, after the first apply's
free heap is trimmed and the mark reset); the first apply's growth over the process after
its imports is reported as "cold" (it includes the library code paged in at first use).
Ratios are against the full bundle and against the
best generic delta, measured in the same run.

Cases: the ViT (``models/build_delta_pairs.py`` builds them into ``models/generated/delta``
on first use, with torch): only the last layer fine-tuned, all layers fine-tuned a few
steps, re-quantized (int8, recalibrated), pruned (half the weights zeroed); and the digits
CNN as ONNX and as TFLite with its last layer nudged (no training: the committed files,
the head's weights plus noise of 1% of their spread); and the committed 2 MB sentence
encoder with every float tensor nudged (``encoder_all_layers``: 0.1% of each one's spread).

    nice .venv/bin/python benchmarks/delta_bench.py [--cases last_layer,pruned] [--json F]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import bsdiff4
import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.archive import read_archive  # noqa: E402
from bundle.delta import apply_delta  # noqa: E402
from bundle.signing import (  # noqa: E402
    ArtifactInput,
    BundleSpec,
    DeltaBase,
    build_release,
    read_contents,
)
from bundle.tensor_index import tensor_index  # noqa: E402
from tests.bundle.repo import ONLINE, VALID, Repo  # noqa: E402

PAIRS = ROOT / "models" / "generated" / "delta"
VIT_CASES = ("last_layer", "all_layers", "requantized", "pruned")
CNN_CASES = ("cnn_onnx_last_layer", "cnn_tflite_last_layer")
ENCODER_CASES = ("encoder_all_layers",)
METHODS = ("edgefleet", "bsdiff", "zstd_patch_from", "gzip_full")


@dataclass
class Result:
    """One method on one case."""

    case: str
    method: str
    artifact_bytes: int
    wire_bytes: int
    make_s: float
    apply_s: float
    apply_peak_bytes: int  # the second apply in the process (_apply_child)
    apply_cold_peak_bytes: int  # the first, with the code it runs paged in


def _pair(case: str) -> tuple[bytes, bytes, str]:
    """(base, target, format) of a case."""
    if case in VIT_CASES:
        if not (PAIRS / case / "target.onnx").exists():
            print(f"building the ViT version pairs into {PAIRS} (torch; minutes)", flush=True)
            subprocess.run([sys.executable, "build_delta_pairs.py"], cwd=ROOT / "models",
                           check=True)
        return ((PAIRS / case / "base.onnx").read_bytes(),
                (PAIRS / case / "target.onnx").read_bytes(), "onnx")
    if case in ENCODER_CASES:
        base = (ROOT / "models" / "text_encoder.onnx").read_bytes()
        return base, _nudge_all_layers(base, "onnx"), "onnx"
    fmt = "onnx" if "onnx" in case else "tflite"
    base = (ROOT / "models" / f"digits_cnn.{fmt}").read_bytes()
    return base, _nudge_last_layer(base, fmt), fmt


def _nudge_all_layers(data: bytes, fmt: str) -> bytes:
    """Every float tensor of at least 1 KiB plus noise of 0.1% of its spread (a few
    fine-tuning steps: sign, exponent and high mantissa bits stay)."""
    rng = np.random.default_rng(0)
    out = bytearray(data)
    for span in tensor_index(data, fmt):
        if span.elem_size != 4 or span.length < 1024:
            continue
        values = np.frombuffer(data, np.float32, span.length // 4, span.offset)
        noise = rng.normal(0, 1e-3 * float(values.std()), values.shape).astype(np.float32)
        out[span.offset:span.offset + span.length] = (values + noise).tobytes()
    return bytes(out)


def _nudge_last_layer(data: bytes, fmt: str) -> bytes:
    """The float tensor of the classifier head (the last float weight of ten outputs) plus
    noise of 1% of its spread."""
    spans = [s for s in tensor_index(data, fmt) if s.elem_size == 4 and s.length >= 1024
             and (s.length // 4) % 10 == 0]
    head = min(spans, key=lambda s: s.length)  # the 10-way head is the smallest such
    values = np.frombuffer(data, np.float32, head.length // 4, head.offset)
    noise = np.random.default_rng(0).normal(0, 0.01 * float(values.std()), values.shape)
    out = bytearray(data)
    out[head.offset:head.offset + head.length] = (values + noise.astype(np.float32)).tobytes()
    return bytes(out)


def _zstd_patch(base: bytes, target: bytes) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        19, window_log=max(10, min(30, (len(base) + len(target)).bit_length())),
        enable_ldm=True)
    zdict = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(compression_params=params, dict_data=zdict).compress(target)


def _make(method: str, base: bytes, target: bytes, fmt: str) -> bytes:
    if method == "bsdiff":
        return bytes(bsdiff4.diff(base, target))
    if method == "zstd_patch_from":
        return _zstd_patch(base, target)
    return gzip.compress(target, 9)


def _release(base: bytes, target: bytes, fmt: str) -> tuple[bytes, int, int]:
    """edgefleet's release of ``target`` with a delta from ``base`` (what ``fleet bundle
    build --delta-from`` does): the delta, and the sizes of the full and the delta bundle."""
    repo = Repo()
    spec = BundleSpec(name="bench", version=2, profiles=("x86-64-avx2",), artifacts=(
        ArtifactInput(f"model.{fmt}", target, fmt, "fp32", bases=(DeltaBase(1, base),)),))
    release = build_release(spec, root_chain=repo.root_chain,
                            signers={r: repo.signers[r] for r in ONLINE}, metadata_version=1,
                            expires=VALID)
    delta = read_contents(release.deltas[1], artifacts=False).manifest.artifacts[0].deltas[0]
    data = read_archive(release.deltas[1]).read(f"targets/{delta.path}")
    return data, len(release.full), len(release.deltas[1])


# --- applying, in a child process ----------------------------------------------------------

def _apply_child(method: str, base_path: Path, patch_path: Path, out_path: Path,
                 target_sha256: str) -> None:
    """Rebuild the target twice in this (fresh) process; prints the seconds and the peak
    memory growth of the second apply, and the cold peak of the first.

    The first apply pays the code of zstd, numpy or bsdiff that this process has not run
    yet: their pages become resident (RssFile), 0.3 to 0.9 MiB, whatever the model's size,
    and a running agent has paid it at its first install. Between the two, the heap the
    first left free is given back (``malloc_trim``) and the high-water mark reset, so the
    second apply's peak is the memory its data takes, not hidden in a heap the imports left
    resident."""
    def run() -> None:
        if method == "edgefleet":
            size = int(os.environ["BENCH_TARGET_SIZE"])
            with patch_path.open("rb") as delta, base_path.open("rb") as base, \
                    out_path.open("wb") as out:
                apply_delta(iter(lambda: delta.read(1 << 20), b""),
                            patch_path.stat().st_size, base, out,
                            base_sha256=os.environ["BENCH_BASE_SHA256"],
                            target_sha256=target_sha256, target_size=size)
        elif method == "bsdiff":
            out_path.write_bytes(bsdiff4.patch(base_path.read_bytes(), patch_path.read_bytes()))
        elif method == "zstd_patch_from":
            zdict = zstandard.ZstdCompressionDict(base_path.read_bytes(),
                                                  dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            decompressor = zstandard.ZstdDecompressor(dict_data=zdict, max_window_size=1 << 31)
            with patch_path.open("rb") as patch, out_path.open("wb") as out:
                decompressor.copy_stream(patch, out)
        else:
            with gzip.open(patch_path, "rb") as patch, out_path.open("wb") as out:
                while block := patch.read(1 << 20):
                    out.write(block)

    before = _peak_rss()
    run()
    cold = max(0, _peak_rss() - before)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _peak_rss()
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    peak = _peak_rss()
    digest = hashlib.sha256(out_path.read_bytes()).hexdigest()
    print(json.dumps({"seconds": seconds, "peak": max(0, peak - before), "cold_peak": cold,
                      "ok": digest == target_sha256}))


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM). Not getrusage's ru_maxrss:
    a child inherits its parent's (this benchmark's) high-water mark across fork and exec,
    which would hide the apply's own peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def _apply(method: str, base: Path, patch: Path, target: bytes) -> tuple[float, int, int]:
    out = patch.with_suffix(".out")
    env = {**os.environ, "BENCH_TARGET_SIZE": str(len(target)),
           "BENCH_BASE_SHA256": hashlib.sha256(base.read_bytes()).hexdigest()}
    done = subprocess.run([sys.executable, __file__, "--apply", method, str(base), str(patch),
                           str(out), hashlib.sha256(target).hexdigest()],
                          capture_output=True, text=True, env=env, check=True)
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    if not answer["ok"]:
        raise AssertionError(f"{method} did not rebuild the target")
    out.unlink()
    return float(answer["seconds"]), int(answer["peak"]), int(answer["cold_peak"])


def run_case(case: str, work: Path) -> tuple[list[Result], tuple[int, int]]:
    """Every method on one case, and edgefleet's (full bundle, delta bundle) sizes."""
    base, target, fmt = _pair(case)
    base_path = work / f"{case}.base"
    base_path.write_bytes(base)
    results = []
    sizes = (0, 0)
    for method in METHODS:
        started = time.perf_counter()
        if method == "edgefleet":  # the delta, signed into its release
            patch, *bundle_sizes = _release(base, target, fmt)
            sizes = (bundle_sizes[0], bundle_sizes[1])
        else:
            patch = _make(method, base, target, fmt)
        make_s = time.perf_counter() - started
        patch_path = work / f"{case}.{method}"
        patch_path.write_bytes(patch)
        apply_s, peak, cold = _apply(method, base_path, patch_path, target)
        results.append(Result(case, method, len(target), len(patch), make_s, apply_s, peak,
                              cold))
        print(f"  {case:22} {method:16} {len(patch):>11,} B  make {make_s:6.1f} s  "
              f"apply {apply_s:6.2f} s  peak {peak / 2**20:7.2f} MiB "
              f"(cold {cold / 2**20:5.2f})", flush=True)
    return results, sizes


def main() -> None:
    """Run the cases, print the table with its ratios, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(VIT_CASES + CNN_CASES + ENCODER_CASES))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--apply", nargs=5, metavar=("METHOD", "BASE", "PATCH", "OUT", "SHA"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.apply:
        method, base, patch, out, sha = args.apply
        _apply_child(method, Path(base), Path(patch), Path(out), sha)
        return
    print(f"delta bench: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="delta-bench-") as tmp:
        for case in args.cases.split(","):
            results, (full_bundle, delta_bundle) = run_case(case, Path(tmp))
            by = {r.method: r for r in results}
            ours = by["edgefleet"]
            generic = min((by[m] for m in ("bsdiff", "zstd_patch_from")),
                          key=lambda r: r.wire_bytes)
            rows.append({
                "case": case, "artifact_bytes": ours.artifact_bytes,
                "full_bundle_bytes": full_bundle, "delta_bundle_bytes": delta_bundle,
                "delta_bundle_vs_full": delta_bundle / full_bundle,
                "best_generic": generic.method,
                "edgefleet_vs_best_generic": ours.wire_bytes / generic.wire_bytes,
                "edgefleet_peak_vs_artifact": ours.apply_peak_bytes / ours.artifact_bytes,
                "edgefleet_cold_peak_vs_artifact":
                    ours.apply_cold_peak_bytes / ours.artifact_bytes,
                "results": [asdict(r) for r in results]})
    print("\ncase                    artifact   full bundle  delta bundle  (% of full)  "
          "ours / best generic  peak / artifact (cold)")
    for row in rows:
        print(f"{row['case']:22} {row['artifact_bytes']:>10,} {row['full_bundle_bytes']:>12,} "
              f"{row['delta_bundle_bytes']:>12,}   {100 * row['delta_bundle_vs_full']:8.2f}%"  # type: ignore[operator]
              f"   {row['edgefleet_vs_best_generic']:8.3f} ({row['best_generic']})"
              f"   {row['edgefleet_peak_vs_artifact']:8.2f} "
              f"({row['edgefleet_cold_peak_vs_artifact']:.2f})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
