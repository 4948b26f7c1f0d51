"""Shadow candidates and blue-green through the fleet link, against a real Mosquitto with
the test as the server (tests/agent/test_fleet_link.py's harness): the desired state names
a shadow or a share to compare with the previous version, the agent fetches, verifies,
loads and runs them off the request path, reports them in its telemetry, and switches back
to a previous version still loaded at once."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from agent.fleet_link import FleetLink
from agent.telemetry import TelemetryCollector
from tests.agent import test_fleet_link as harness
from tests.agent.bundles import DATA, DIGITS, digits_spec, swapped_digits
from tests.agent.test_fleet_link import FakeServer, wait
from tests.bundle.repo import Repo

# The harness's fixtures (a real Mosquitto, the fake server, the link factory), by name.
fleet, broker, server, link_factory = (harness.fleet, harness.broker, harness.server,
                                       harness.link_factory)

pytestmark = pytest.mark.integration


def _entries(server: FakeServer, key: str) -> list[dict[str, Any]]:
    """Every ``models.digits.KEY`` entry the server received so far."""
    return [s.metrics["models"]["digits"][key] for s in list(server.samples)
            if key in s.metrics.get("models", {}).get("digits", {})]


def _serve(link: FleetLink, requests: int) -> None:
    x = np.load(DATA)["eval_x"]
    for n in range(requests):
        link.runtime.infer("digits", {"input": x[n % len(x):n % len(x) + 1]})


def _pooled(entries: list[dict[str, Any]]) -> tuple[int, int, int]:
    return (sum(e["requests"] for e in entries), sum(e["agreement"]["n"] for e in entries),
            sum(e["agreement"]["agree"] for e in entries))


def test_a_shadow_candidate_is_fetched_run_reported_and_unloaded(
        server: FakeServer, repo: Repo, link_factory: Callable[..., FleetLink]) -> None:
    link = link_factory(telemetry=TelemetryCollector)
    v1, v2 = repo.build(digits_spec(1)), repo.build(digits_spec(2, swapped_digits()))
    sha1 = server.want(1, v1, shadow=(2, v2, 0.5))
    wait(lambda: "shadow.loaded" in server.events, "the shadow candidate to load", 60)
    assert server.last_report() == {"digits": (1, sha1, "committed")}  # it never serves
    assert link.runtime.model("digits").version == 1

    def compared() -> int:
        return _pooled(_entries(server, "shadow"))[1]

    _serve(link, 400)
    wait(lambda: compared() >= 50, "telemetry reporting the shadow's comparisons", 30)
    shadow = _entries(server, "shadow")
    assert {e["version"] for e in shadow} == {2}
    requests, n, agree = _pooled(shadow)
    # Classes 0 and 1 swapped: the candidate disagrees on every 0 and 1 predicted.
    assert 0 < agree < n
    assert sum(e["errors"] for e in shadow) == 0
    # Half of 400 requests sampled at random: Binomial(400, 0.5), 200 +- 10.
    assert requests + sum(e["dropped"] for e in shadow) <= 260
    monitor = _entries(server, "monitor")
    assert sum(e["sampled"] for e in monitor) > 0
    assert {e["version"] for e in monitor} == {1}
    assert monitor[-1]["inputs"]["input"]["counts"]  # the bundle's baseline bins

    server.want(1, v1)  # the shadow removed from the desired state
    wait(lambda: "shadow.unloaded" in server.events, "the shadow to be unloaded")
    assert link.runtime.shadow_of("digits") is None
    assert link.runtime.model("digits").version == 1


def test_a_shadow_that_fails_its_self_test_is_reported_and_not_retried(
        server: FakeServer, repo: Repo, link_factory: Callable[..., FleetLink]) -> None:
    link = link_factory()
    v1 = repo.build(digits_spec(1))
    bad = repo.build(digits_spec(2, swapped_digits(), golden_from=DIGITS.read_bytes()))
    server.want(1, v1, shadow=(2, bad, 0.5))
    wait(lambda: "shadow.failed" in server.events, "the shadow to fail", 60)
    event = next(e for e in server.event_log if e.kind == "shadow.failed")
    assert "self-test" in event.detail["reason"]
    assert link.runtime.shadow_of("digits") is None
    time.sleep(1.0)  # the link ticks several times: the bad candidate is not fetched again
    assert [e.kind for e in server.event_log].count("shadow.failed") == 1


def test_blue_green_keeps_the_previous_version_and_switches_back_at_once(
        server: FakeServer, repo: Repo, link_factory: Callable[..., FleetLink]) -> None:
    link = link_factory(telemetry=TelemetryCollector)
    runtime = link.runtime
    v1, v2 = repo.build(digits_spec(1)), repo.build(digits_spec(2, swapped_digits()))
    sha1 = server.want(1, v1)
    wait(lambda: server.last_report() == {"digits": (1, sha1, "committed")}, "v1 committed")
    first = runtime.served("digits")
    sha2 = server.want(2, v2, compare_previous=0.5)
    wait(lambda: server.last_report() == {"digits": (2, sha2, "committed")}, "v2 committed")
    assert runtime.previous_version("digits") == 1

    _serve(link, 200)
    wait(lambda: _pooled(_entries(server, "previous"))[1] >= 20,
         "telemetry comparing v2 with the kept v1", 30)
    previous = _entries(server, "previous")
    assert {e["version"] for e in previous} == {1}
    _, n, agree = _pooled(previous)
    assert 0 < agree < n  # v2 swaps two classes

    # The desired state names v1 again: served by the v1 still loaded, nothing fetched.
    fetched = server.served_bytes
    switched = threading.Event()
    seen: list[float] = []
    x = np.load(DATA)["eval_x"][:1]

    def client() -> None:
        while not switched.is_set():
            model = runtime.served("digits")
            model.run({"input": x})
            if model.version == 1:
                seen.append(time.perf_counter())
                switched.set()

    received: list[float] = []
    on_message = link._client.on_message  # when the device has the desired state
    assert on_message is not None

    def receive(*args: Any) -> None:
        received.append(time.perf_counter())
        on_message(*args)

    link._client.on_message = receive
    thread = threading.Thread(target=client)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # as edge-agent run does (agent/daemon.py)
    thread.start()
    start = time.perf_counter()
    server.want(1, v1, compare_previous=0.5)
    switched.wait(10)
    thread.join()
    sys.setswitchinterval(switch_interval)
    assert seen, "v1 never served again"
    elapsed_ms = (seen[0] - start) * 1e3
    on_device_ms = (seen[0] - received[0]) * 1e3
    print(f"\nswitch back: {on_device_ms:.1f} ms from receiving the desired state to the "
          f"first request served by the previous version ({elapsed_ms:.1f} ms from "
          "publishing it, the broker hop included)")
    assert elapsed_ms < 2000
    assert runtime.served("digits") is first  # the same loaded model: no load
    assert server.served_bytes == fetched  # no fetch
    wait(lambda: server.last_report() == {"digits": (1, sha1, "committed")},
         "the switch reported")
    # The event and the report are two messages with no order between them.
    wait(lambda: "model.switched_back" in server.events, "the switched_back event")
    # Blue-green the other way round: v2 is now the one kept beside.
    assert runtime.previous_version("digits") == 2
