"""Monitoring on the agent: the plan read from a bundle baseline, per-interval statistics
and drift, the side runner's sampling and bounded queue, and a real runtime reporting them
in telemetry samples (monitor, shadow and previous-version comparisons)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import MonitorConfig
from agent.http_api import ApiServer, ApiSettings
from agent.metrics import SystemReading
from agent.monitor import ModelMonitor, monitor_plan
from agent.probation import ProbationPolicy
from agent.runtime import Runtime
from agent.sessions import TensorInfo
from agent.side_process import MovingSession
from agent.side_runner import Request, SideChannel, SideRunner, due_after
from agent.telemetry import TelemetryCollector
from firmware_profiles.model import Profile
from stats.drift import PSI_MAJOR, PSI_MODERATE
from tests.agent.bundles import DATA, digits_baseline, digits_spec, swapped_digits, write_bundle
from tests.bundle.repo import Repo

INPUTS = (TensorInfo("input", "float32", (None, 1, 8, 8)),)
OUTPUTS = (TensorInfo("logits", "float32", (None, 10)),)
QUICK = ProbationPolicy(window_s=0.0, min_requests=10, max_latency_ratio=float("inf"))


def _eval() -> np.ndarray:
    x: np.ndarray = np.load(DATA)["eval_x"]
    return x


def _logits(x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    from tests.agent.bundles import DIGITS
    session = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"input": x})[0]
    return out


_X3 = np.load(DATA)["eval_x"][:3]
_LOGITS3 = np.random.default_rng(0).normal(size=(3, 10)).astype(np.float32)


# -- the plan ------------------------------------------------------------------------------


def test_plan_from_the_compressor_baseline() -> None:
    plan = monitor_plan(digits_baseline(), INPUTS, OUTPUTS)
    (given,) = plan.inputs
    assert given.name == "input"
    assert given.bins == 16
    assert given.baseline.sum() == len(_eval()) * 64
    (out,) = plan.outputs
    assert (out.kind, out.bins) == ("classes", 10)
    assert out.baseline is not None
    assert out.baseline.sum() == len(_eval())


def test_plan_without_a_baseline_still_watches_outputs() -> None:
    plan = monitor_plan({}, INPUTS, (*OUTPUTS, TensorInfo("emb", "float32", (None, 300))))
    assert plan.inputs == ()
    assert [(o.kind, o.bins, o.baseline) for o in plan.outputs] == [
        ("classes", 10, None), ("values", 0, None)]


_KEYS = ["input", "output", "kind", "range", "bins", "histograms", "counts", "classes"]
_leaf = (st.none() | st.booleans() | st.integers(-5, 70) | st.floats() | st.text(max_size=3)
         | st.sampled_from(["input", "logits", "classes", "values"]))
_value = _leaf | st.lists(_leaf, max_size=4) | st.lists(st.lists(st.integers(-1, 9),
                                                                  max_size=17), max_size=3)
_entry = st.dictionaries(st.sampled_from(_KEYS), _value, max_size=6)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["inputs", "outputs"]),
                       st.lists(_entry, max_size=2) | _leaf))
def test_any_baseline_gives_a_plan_that_reports(baseline: dict[str, Any]) -> None:
    # A bundle's statistics never stop a model from serving: whatever they hold.
    plan = monitor_plan(baseline, INPUTS, OUTPUTS)
    monitor = ModelMonitor(plan, 1)
    monitor.handle([({"input": _X3}, {"logits": _LOGITS3})])
    assert monitor.report()["sampled"] == 1


# -- statistics and drift --------------------------------------------------------------------


def test_drift_is_low_on_baseline_data_and_high_on_inverted_inputs() -> None:
    plan = monitor_plan(digits_baseline(), INPUTS, OUTPUTS)
    monitor = ModelMonitor(plan, 3)
    x = _eval()
    logits = _logits(x[:200])
    monitor.handle([({"input": x[row:row + 1]}, {"logits": logits[row:row + 1]})
                    for row in range(200)])
    same = monitor.report()
    assert same["version"] == 3
    assert same["sampled"] == 200
    assert same["inputs"]["input"]["psi"] < PSI_MODERATE
    assert sum(same["inputs"]["input"]["counts"]) == 200 * 64
    out = same["outputs"]["logits"]
    assert out["kind"] == "classes"
    assert sum(out["counts"]) == 200
    assert 0.5 < out["confidence_mean"] <= 1.0
    assert out["entropy_mean"] >= 0.0
    assert same["drift"]["psi"] < PSI_MODERATE

    inverted = x.max() - x[:200]
    monitor.handle([({"input": inverted}, {"logits": _logits(inverted)})])
    shifted = monitor.report()
    assert shifted["inputs"]["input"]["psi"] > PSI_MAJOR
    assert shifted["inputs"]["input"]["ks"] > 0.3
    assert shifted["drift"]["psi"] > PSI_MAJOR
    # Each report is one interval: the counts started again.
    assert monitor.report()["sampled"] == 0


# -- sampling and the side runner --------------------------------------------------------------


@given(st.floats(0.01, 1.0), st.integers(0, 2**32 - 1))
def test_sampling_takes_the_rate(rate: float, seed: int) -> None:
    draw = random.Random(seed).random
    requests, taken, due = 20_000, 0, due_after(0, rate, draw())
    for n in range(1, requests + 1):
        if n >= due:
            taken += 1
            due = due_after(n, rate, draw())
            assert due > n
    # Binomial(requests, rate): within 6 standard deviations.
    assert abs(taken - requests * rate) <= 6 * (requests * rate * (1 - rate)) ** 0.5 + 1


def test_sampling_does_not_alias_with_periodic_traffic() -> None:
    # An app cycling through 540 inputs; sampling 5% must still see (nearly) all of them,
    # not the 27 that every 20th request would.
    draw = random.Random(7).random
    seen, due = set(), due_after(0, 0.05, draw())
    for n in range(1, 540 * 100 + 1):
        if n >= due:
            seen.add(n % 540)
            due = due_after(n, 0.05, draw())
    assert len(seen) > 500


class _Recorder:
    batch = 1

    def __init__(self, block: threading.Event | None = None) -> None:
        self.handled: list[int] = []
        self.drops = 0
        self.block = block

    def handle(self, requests: Sequence[Request]) -> None:
        if self.block is not None:
            self.block.wait(10)
        self.handled += [int(inputs["n"][0]) for inputs, _ in requests]

    def dropped(self, count: int) -> None:
        self.drops += count


def test_a_busy_side_runner_drops_and_counts_and_never_blocks() -> None:
    runner = SideRunner(capacity=2)
    release = threading.Event()
    slow = _Recorder(block=release)
    channel = SideChannel(runner, [(slow, 1.0)])
    buffer = np.zeros(1)
    for n in range(1, 11):
        buffer[0] = n
        channel.offer({"n": buffer}, {})  # returns at once though the watcher is stuck
    release.set()
    runner.wait_idle()
    runner.close()
    # Two queued (and one in the worker's hands if it started in time); the rest dropped
    # and counted.
    assert slow.drops + len(slow.handled) == 10
    assert len(slow.handled) in (2, 3)
    # The arrays were copied when sampled: reusing the buffer changed nothing.
    assert slow.handled == sorted(set(slow.handled))
    assert slow.handled[0] == 1


# -- a real runtime ---------------------------------------------------------------------------


def _collect(runtime: Runtime) -> dict[str, Any]:
    metrics = TelemetryCollector(runtime, system=SystemReading).collect()
    return dict(metrics["models"]["digits"])


def _serve(runtime: Runtime, requests: int) -> None:
    x = _eval()
    for n in range(requests):
        runtime.infer("digits", {"input": x[n % len(x):n % len(x) + 1]})


@contextlib.contextmanager
def _serving_v1(state_dir: Path, repo: Repo, tmp_path: Path, x86: Profile,
                rate: float) -> Iterator[Runtime]:
    """A runtime monitoring ``rate`` of the requests, digits v1 installed; closed after."""
    runtime = Runtime(state_dir, x86, policy=QUICK, monitoring=MonitorConfig(sample_rate=rate))
    try:
        runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
        yield runtime
    finally:
        runtime.close()


def test_runtime_reports_monitor_statistics(state_dir: Path, repo: Repo, tmp_path: Path,
                                            x86: Profile) -> None:
    with _serving_v1(state_dir, repo, tmp_path, x86, 0.1) as runtime:
        _serve(runtime, 300)
        entry = _collect(runtime)
        monitor = entry["monitor"]
        assert monitor["version"] == 1
        assert 10 <= monitor["sampled"] <= 60  # Binomial(300, 0.1): 30 +- 5.2
        assert monitor["dropped"] == 0
        assert sum(monitor["inputs"]["input"]["counts"]) == monitor["sampled"] * 64
        assert monitor["inputs"]["input"]["psi"] < PSI_MODERATE
        # About 30 predictions over 10 classes: too few for a steady output PSI, but counted.
        assert sum(monitor["outputs"]["logits"]["counts"]) == monitor["sampled"]
        assert "shadow" not in entry


def test_monitoring_off_adds_nothing(state_dir: Path, repo: Repo, tmp_path: Path,
                                     x86: Profile) -> None:
    with _serving_v1(state_dir, repo, tmp_path, x86, 0.0) as runtime:
        _serve(runtime, 20)
        assert runtime.served("digits").side is None
        assert "monitor" not in _collect(runtime)


@pytest.mark.parametrize("agreeing", [True, False])
def test_a_shadow_candidate_is_compared_off_the_path(
        state_dir: Path, repo: Repo, tmp_path: Path, x86: Profile, agreeing: bool) -> None:
    with _serving_v1(state_dir, repo, tmp_path, x86, 0.0) as runtime:
        model = None if agreeing else swapped_digits()
        shadow_bundle = write_bundle(repo, tmp_path, digits_spec(2, model))
        shadow = runtime.load_shadow(shadow_bundle)
        # Off this process's GIL: the candidate runs in a child (agent/side_process.py).
        assert getattr(shadow.session, "pid", None) not in (None, os.getpid())
        runtime.attach("digits", "shadow", shadow, 0.5)
        _serve(runtime, 200)
        report = _collect(runtime)["shadow"]
        assert report["version"] == 2
        # Half the requests sampled (Binomial(200, 0.5): 100 +- 7); those that found the
        # queue full were dropped, counted.
        assert 60 <= report["requests"] + report["dropped"] <= 140
        assert report["requests"] >= 10
        assert report["errors"] == 0
        assert report["p50_ms"] is not None
        agreement = report["agreement"]
        assert agreement["metric"] == "top1"
        assert agreement["n"] == report["requests"]
        if agreeing:
            assert agreement["agree"] == agreement["n"]
            assert report["confidence_shift"] == pytest.approx(0.0, abs=1e-6)
        else:
            # Classes 0 and 1 swapped: every request predicting one of them disagrees.
            assert 0 < agreement["agree"] < agreement["n"]
        assert runtime.model("digits").version == 1  # the shadow never serves
        assert runtime.detach("digits", "shadow") is shadow
        _serve(runtime, 10)
        assert "shadow" not in _collect(runtime)


# -- the local Prometheus endpoint ------------------------------------------------------------


def _scrape(url: str) -> tuple[int, str]:
    request = urllib.request.Request(url + "/metrics",
                                     headers={"Authorization": "Bearer t0ken"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("on", [True, False])
def test_prometheus_endpoint(state_dir: Path, repo: Repo, tmp_path: Path, x86: Profile,
                             on: bool) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    runtime = Runtime(state_dir, x86, policy=QUICK, monitoring=MonitorConfig(sample_rate=1.0))
    server = ApiServer(runtime, ApiSettings(port=0, token="t0ken", prometheus=on))
    server.start()
    try:
        runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
        _serve(runtime, 40)
        _collect(runtime)  # a telemetry interval: the monitor's drift is known
        status, text = _scrape(str(server.url))
        if not on:
            assert status == 404
            assert "prometheus = true" in text
            return
        assert status == 200
        promtool = shutil.which("promtool")  # Debian's prometheus package: lint it too
        if promtool is not None:
            lint = subprocess.run([promtool, "check", "metrics"], input=text,
                                  capture_output=True, text=True, check=False, timeout=60)
            assert lint.returncode == 0, lint.stdout + lint.stderr
        families = {f.name: f for f in text_string_to_metric_families(text)}
        labels = {"model": "digits", "version": "1"}
        (requests,) = [s for s in families["edgefleet_model_requests"].samples
                       if s.name.endswith("_total")]
        assert requests.labels == labels
        assert requests.value >= 40
        latency = families["edgefleet_model_latency_seconds"].samples
        count = next(s.value for s in latency if s.name.endswith("_count"))
        infinite = next(s.value for s in latency if s.labels.get("le") == "+Inf")
        assert count == infinite >= 40
        (psi,) = families["edgefleet_model_drift_psi"].samples
        assert psi.labels == labels
        assert psi.value >= 0.0  # 40 predictions: a noisy PSI, but reported
        # Scrapes are cumulative: the next one counts on from this one.
        _serve(runtime, 10)
        families = {f.name: f for f in text_string_to_metric_families(_scrape(str(server.url))[1])}
        latency = families["edgefleet_model_latency_seconds"].samples
        assert next(s.value for s in latency if s.name.endswith("_count")) == count + 10
    finally:
        server.stop()
        runtime.close()


# -- blue-green on the runtime --------------------------------------------------------------


def test_switch_back_during_probation_rolls_back_to_the_loaded_model(
        state_dir: Path, repo: Repo, tmp_path: Path, x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=QUICK)
    try:
        runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
        _serve(runtime, 20)
        assert [r.state.value for r in runtime.check_probation()] == ["committed"]
        first = runtime.served("digits")
        record = runtime.install(write_bundle(repo, tmp_path, digits_spec(2, swapped_digits())))
        assert record.state.value == "probation"
        assert runtime.previous_version("digits") == 1
        assert not runtime.switch_back("digits", 3)  # not loaded: nothing happens
        assert runtime.switch_back("digits", 1)
        assert runtime.served("digits") is first  # the loaded model, not a new load
        latest = runtime.installer.records()[0]  # type: ignore[union-attr]
        assert (latest.version, latest.state.value, latest.reason) == (2, "rolled_back",
                                                                        "switched_back")
        assert runtime.installer.store.active("digits").version == 1  # type: ignore[union-attr]
        # Not a verdict on the bundle: a desired state naming v2 again installs it.
        assert runtime.installer.given_up() == {}  # type: ignore[union-attr]
    finally:
        runtime.close()


def test_keep_previous_compares_and_switches_both_ways(
        state_dir: Path, repo: Repo, tmp_path: Path, x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=QUICK, monitoring=MonitorConfig(sample_rate=0.0))
    try:
        runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
        runtime.keep_previous("digits", 1.0)
        _serve(runtime, 20)
        runtime.check_probation()
        v1 = runtime.served("digits")
        runtime.install(write_bundle(repo, tmp_path, digits_spec(2)))
        _serve(runtime, 20)
        runtime.check_probation()
        assert runtime.previous_version("digits") == 1
        previous = _collect(runtime)["previous"]
        assert previous["version"] == 1
        assert previous["agreement"]["n"] == previous["requests"] > 0
        assert previous["agreement"]["agree"] == previous["agreement"]["n"]  # same model
        # A small model's previous version is compared in a side process once one opened
        # (agent/side_process.py), and answers there as here.
        moving = runtime.comparisons("digits")["previous"].session
        assert isinstance(moving, MovingSession)
        deadline = time.monotonic() + 60
        while not moving.moved and time.monotonic() < deadline:
            time.sleep(0.05)
        assert moving.moved
        _serve(runtime, 40)
        moved = _collect(runtime)["previous"]
        assert moved["requests"] > 0
        assert moved["agreement"]["agree"] == moved["agreement"]["n"] == moved["requests"]
        v2 = runtime.served("digits")
        assert runtime.switch_back("digits", 1)
        assert runtime.served("digits") is v1
        assert runtime.previous_version("digits") == 2  # and back again is one swap too
        assert runtime.switch_back("digits", 2)
        assert runtime.served("digits") is v2
        runtime.keep_previous("digits", 0.0)  # blue-green off: the previous one released
        assert runtime.previous_version("digits") is None
        assert "previous" not in _collect(runtime)
    finally:
        runtime.close()


def test_the_system_probe_reports_the_state_directory_disk(tmp_path: Path) -> None:
    from agent.system_probe import SystemProbe

    reading = SystemProbe(tmp_path).read()
    assert reading.disk_free_bytes is not None
    assert reading.disk_free_bytes > 0
    assert reading.disk_percent is not None
    assert 0.0 <= reading.disk_percent <= 100.0
    assert SystemProbe().read().disk_free_bytes is None
