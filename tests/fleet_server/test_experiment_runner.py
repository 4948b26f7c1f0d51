"""The server's experiments on a real registry (SQLite and PostgreSQL), without a broker:
start, deltas counted once in the ingest's transaction, pushes, status, stop."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from experiments.assign import device_arm
from experiments.errors import InvalidExperimentData
from experiments.spec import spec_from_json
from fleet_server.errors import RegistryError, ReleaseError
from fleet_server.experiment_runner import ExperimentRequest, ExperimentRunner
from fleet_server.ingest import PROTOCOL_ERROR, Inbound, Ingest
from fleet_server.registry import Registry, open_registry
from protocol.experiment_messages import decode_posterior_push
from protocol.messages import Telemetry, encode
from tests.fleet_server.registry.helpers import bundle, enroll

DEVICES = [f"gw-{i}" for i in range(6)]


class Wire:
    """What the runner publishes: desired-state publishes and single messages."""

    def __init__(self) -> None:
        self.published: list[list[str]] = []
        self.sent: list[tuple[str, str, bytes, bool]] = []

    def publish(self, devices: Any) -> None:
        self.published.append(list(devices))

    def send(self, device: str, leaf: str, payload: bytes, retain: bool) -> None:
        self.sent.append((device, leaf, payload, retain))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def reg(db_url: str, tmp_path: Path) -> Iterator[Registry]:
    registry = open_registry(db_url, blob_dir=tmp_path / "blobs")
    for device in DEVICES:
        enroll(registry, device)
    enroll(registry, "other", group="elsewhere")
    yield registry
    registry.close()


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def runner(reg: Registry, wire: Wire, clock: Clock) -> ExperimentRunner:
    return ExperimentRunner(reg, publish=wire.publish, send=wire.send, fleet_push_s=30.0,
                            clock=clock)


def _ab(reg: Registry, name: str = "ab1", **kw: Any) -> ExperimentRequest:
    a, b = bundle(reg, "digits", 1), bundle(reg, "digits-b", 1)
    return ExperimentRequest(name, (("a", a), ("b", b)), **{"group": "lab", "unit": "request",
                                                             **kw})


def _sample(seq: int, *deltas: dict[str, Any]) -> Telemetry:
    return Telemetry(seq, 1.0, {"experiments": list(deltas)})


def _delta(seq: int, a: tuple[int, float] = (1, 1.0), experiment: str = "ab1"
           ) -> dict[str, Any]:
    return {"experiment": experiment, "seq": seq, "arms": {"a": [a[0], a[1], a[1]]}}


def test_start_declares_the_experiment_and_installs_every_arm(
        reg: Registry, runner: ExperimentRunner, wire: Wire) -> None:
    record = runner.start(_ab(reg, split=(20.0, 80.0)), "admin")
    spec = spec_from_json(record.spec)
    assert (spec.model, spec.arms, spec.split) == (
        "digits", (("a", "digits"), ("b", "digits-b")), (("a", 0.2), ("b", 0.8)))
    for device in DEVICES:
        assert set(reg.get_device(device).desired) == {"digits", "digits-b"}  # type: ignore[union-attr]
        assert runner.declarations(device) == (record.spec,)
    assert runner.declarations("other") == ()
    assert wire.published == [DEVICES]
    assert reg.last_audit("experiment.start") is not None
    view = runner.status("ab1")
    assert (view["status"], view["devices"], view["verdict"]) == ("running", 6, "running")
    assert [(a["arm"], a["n"], a["model"]) for a in view["arms"]] == [
        ("a", 0, "digits"), ("b", 0, "digits-b")]


def test_device_units_install_only_each_devices_arm(reg: Registry,
                                                    runner: ExperimentRunner) -> None:
    v1, v2 = bundle(reg, "digits", 1), bundle(reg, "digits", 2)
    runner.start(ExperimentRequest("ab-dev", (("old", v1), ("new", v2)), group="lab"),
                 "admin")
    for device in DEVICES:
        want = v1 if device_arm("ab-dev", device, (("old", 0.5), ("new", 0.5))) == "old" else v2
        assert reg.get_device(device).desired["digits"].bundle_sha256 == want  # type: ignore[union-attr]


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"unit": "sideways"}, InvalidExperimentData, "unit must be"),
    ({"strategy": "thompson", "unit": "device"}, InvalidExperimentData, "--unit request"),
    ({"split": (1.0,)}, InvalidExperimentData, "one per variant"),
    ({"alpha": 0.9}, InvalidExperimentData, "alpha"),
    ({"group": None}, InvalidExperimentData, "exactly one of"),
    ({"group": "nobody"}, RegistryError, "has no devices"),
    ({"group": None, "devices": ("gw-0", "ghost")}, RegistryError, "unknown device"),
    ({"name": "bad name"}, InvalidExperimentData, "not valid"),
])
def test_bad_requests_change_nothing(reg: Registry, runner: ExperimentRunner,
                                     change: dict[str, Any], error: type[Exception],
                                     message: str) -> None:
    request = _ab(reg)
    fields = {**request.__dict__, **change}
    with pytest.raises(error, match=message):
        runner.start(ExperimentRequest(**fields), "admin")
    assert reg.list_experiments() == []
    assert reg.get_device("gw-0").desired == {}  # type: ignore[union-attr]


def test_clashes_are_refused(reg: Registry, runner: ExperimentRunner) -> None:
    runner.start(_ab(reg), "admin")
    with pytest.raises(RegistryError, match="exists already"):
        runner.start(_ab(reg, group=None, devices=("other",)), "admin")
    with pytest.raises(InvalidExperimentData, match="already serve digits in experiment ab1"):
        runner.start(_ab(reg, name="ab2"), "admin")
    # An arm's model is taken too: another experiment on it would change that arm under ab1.
    b2 = bundle(reg, "digits-b", 2)
    with pytest.raises(InvalidExperimentData, match="already serve digits-b in experiment ab1"):
        runner.start(ExperimentRequest("ab5", (("a", bundle(reg, "digits-b", 1)), ("b", b2)),
                                       group="lab"), "admin")
    assert runner.running_on("digits-b", ["gw-0", "other"]) == {"gw-0": "ab1"}
    assert runner.running_on("speech", ["gw-0"]) == {}
    same = bundle(reg, "digits", 1)
    with pytest.raises(InvalidExperimentData, match="distinct model names"):
        runner.start(ExperimentRequest("ab3", (("a", same), ("b", same)), group="elsewhere",
                                       unit="request"), "admin")
    older = reg.put_bundle(b"old", "speech", 1).sha256
    newer = reg.put_bundle(b"new", "speech", 2).sha256
    reg.set_desired(newer, devices=["other"])
    with pytest.raises(ReleaseError, match="older than"):
        runner.start(ExperimentRequest("ab4", (("a", older), ("b", newer)), (1.0, 0.0),
                                       devices=("other",)), "admin")
    assert [e.name for e in reg.list_experiments()] == ["ab1"]


def test_deltas_count_once_gaps_are_refused_and_pushes_follow(
        reg: Registry, runner: ExperimentRunner, wire: Wire, clock: Clock) -> None:
    runner.start(_ab(reg), "admin")
    assert runner.take("gw-0", _sample(1, _delta(1, (4, 3.0)))) == []
    assert runner.take("gw-0", _sample(1, _delta(1, (4, 3.0)))) == []  # redelivered
    refused = runner.take("gw-0", _sample(2, _delta(3)))
    assert [type(e).__name__ for e in refused] == ["OutOfOrderDelta"]
    refused = runner.take("other", _sample(1, _delta(1)))
    assert "does not take part" in str(refused[0])
    refused = runner.take("gw-1", _sample(1, _delta(1, experiment="nope"), {"seq": 1}))
    assert ["not running" in str(e) or "JSON" in str(e) or "experiment" in str(e)
            for e in refused] == [True, True]
    assert runner.take("gw-1", Telemetry(1, 1.0, {"experiments": "x"}))
    assert runner.take("gw-1", Telemetry(1, 1.0, {})) == []
    view = runner.status("ab1")
    assert [(a["arm"], a["n"], a["mean"]) for a in view["arms"]] == [("a", 4, 0.75),
                                                                    ("b", 0, 0.0)]
    assert view["version"] == 1
    # The first flush pushes to every device of the experiment, retained.
    runner.flush()
    pushes = {d: decode_posterior_push(p) for d, leaf, p, retain in wire.sent
              if leaf == "inbox/experiments/ab1" and retain}
    assert set(pushes) == set(DEVICES)
    assert (pushes["gw-0"].applied_seq, pushes["gw-1"].applied_seq) == (1, 0)
    assert pushes["gw-3"].arms == {"a": (4, 3.0, 3.0), "b": (0, 0.0, 0.0)}
    # Within fleet_push_s only the devices whose deltas were applied get one.
    wire.sent.clear()
    runner.take("gw-1", _sample(1, _delta(1)))
    runner.flush()
    assert [(d, decode_posterior_push(p).version) for d, _, p, _ in wire.sent] == [("gw-1", 2)]
    wire.sent.clear()
    runner.flush()
    assert wire.sent == []  # nothing new
    # gw-1's delta, held back from the others, reaches them with the first batch after
    # fleet_push_s, whatever it holds.
    clock.now += 31
    runner.flush()
    assert sorted(d for d, _, _, _ in wire.sent) == DEVICES
    assert {decode_posterior_push(p).version for _, _, p, _ in wire.sent} == {2}
    # On a new broker connection every device of every running experiment gets it again.
    wire.sent.clear()
    assert runner.push_all() == len(DEVICES)
    assert sorted(d for d, _, _, _ in wire.sent) == DEVICES


def test_a_batch_that_fails_counts_nothing(reg: Registry, runner: ExperimentRunner) -> None:
    runner.start(_ab(reg), "admin")
    def failing_batch() -> None:
        with reg.batch():
            reg.add_telemetry("gw-0", [_sample(1, _delta(1))])
            runner.take("gw-0", _sample(1, _delta(1)))
            raise RuntimeError("the database went away")

    with pytest.raises(RuntimeError):
        failing_batch()
    assert reg.telemetry("gw-0") == []
    assert runner.status("ab1")["arms"][0]["n"] == 0
    with reg.batch():
        assert runner.take("gw-0", _sample(1, _delta(1), _delta(3))) != []
    assert runner.status("ab1")["arms"][0]["n"] == 1  # the refused delta changed nothing


def test_stop_and_promote(reg: Registry, runner: ExperimentRunner, wire: Wire) -> None:
    runner.start(_ab(reg), "admin")
    wire.published.clear()
    ended = runner.stop("ab1", "admin", reason="enough")
    assert ended.status == "stopped"
    assert wire.published == [DEVICES]
    assert {(d, p, r) for d, _, p, r in wire.sent} == {(d, b"", True) for d in DEVICES}
    for device in DEVICES:
        assert runner.declarations(device) == ()
        assert set(reg.get_device(device).desired) == {"digits"}  # type: ignore[union-attr]
    assert runner.take("gw-0", _sample(1, _delta(1)))  # no longer counted
    with pytest.raises(InvalidExperimentData, match="stopped already"):
        runner.stop("ab1", "admin")
    runner.start(_ab(reg, name="ab2"), "admin")
    with pytest.raises(InvalidExperimentData, match="not an arm"):
        runner.stop("ab2", "admin", winner="c")
    promoted = runner.stop("ab2", "admin", winner="b")
    assert (promoted.status, promoted.detail["winner"]) == ("promoted", "b")
    assert set(reg.get_device("gw-0").desired) == {"digits", "digits-b"}  # type: ignore[union-attr]
    assert runner.status("ab2")["promoted"] == "b"
    with pytest.raises(RegistryError, match="no experiment"):
        runner.get("nope")
    assert json.dumps(runner.status("ab2"))


def test_the_ingest_thread_counts_deltas_records_refusals_and_pushes(
        reg: Registry, runner: ExperimentRunner, wire: Wire) -> None:
    runner.start(_ab(reg), "admin")
    acked: list[int] = []
    ingest = Ingest(reg, lambda inbound: acked.append(inbound.mid), experiments=runner)
    ingest.start()
    for mid, (seq, deltas) in enumerate([(1, [_delta(1)]), (1, [_delta(1)]),
                                         (2, [_delta(3), _delta(2, (2, 2.0))])]):
        ingest.put(Inbound("gw-0", "telemetry", encode(_sample(seq, *deltas)), mid, 1, 0))
    ingest.stop()
    assert sorted(acked) == [0, 1, 2]
    assert [r.sample.seq for r in reg.telemetry("gw-0")] == [1, 2]
    assert runner.status("ab1")["arms"][0]["n"] == 3  # deltas 1 and 2, once each
    refused = [e.detail["error"] for e in reg.events(device="gw-0")
               if e.kind == PROTOCOL_ERROR]
    assert len(refused) == 1
    assert "delta 3 from 'gw-0' arrived before 2" in refused[0]
    pushed = [decode_posterior_push(p) for d, _, p, _ in wire.sent if d == "gw-0"]
    assert (pushed[-1].version, pushed[-1].applied_seq) == (2, 2)


def test_a_running_rollout_of_an_arm_model_refuses_the_start(reg: Registry, wire: Wire,
                                                             clock: Clock) -> None:
    rollouts = {"digits-b": {"gw-1": "r-1234"}}
    runner = ExperimentRunner(reg, publish=wire.publish, send=wire.send, clock=clock,
                              rollouts=lambda model: rollouts.get(model, {}))
    with pytest.raises(InvalidExperimentData, match="gw-1 take part in rollout r-1234 of "
                                                    "digits-b"):
        runner.start(_ab(reg), "admin")
    assert reg.list_experiments() == []


@pytest.mark.parametrize(("change", "message"), [
    ({"split": (50.0, 60.0)}, "adds up to 110"),
    ({"split": (1.0, 3.0)}, "adds up to 4"),
])
def test_a_split_that_does_not_add_up_is_refused(reg: Registry, runner: ExperimentRunner,
                                                 change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidExperimentData, match=message):
        runner.start(_ab(reg, **change), "admin")
    runner.start(_ab(reg, split=(0.25, 0.75)), "admin")  # fractions are fine too


def test_an_arm_named_twice_is_named_in_the_refusal(reg: Registry,
                                                    runner: ExperimentRunner) -> None:
    a = bundle(reg, "digits", 1)
    with pytest.raises(InvalidExperimentData, match="arm 'a' is given twice"):
        runner.start(ExperimentRequest("ab1", (("a", a), ("a", a)), group="lab"), "admin")
