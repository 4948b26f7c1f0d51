"""The runner on a real registry (SQLite and PostgreSQL): a simulated fleet reports through
the registry, the runner reads it, and a second runner on a fresh connection takes over."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleet_server.audit import verify_chain
from fleet_server.errors import RegistryError, RolloutError
from fleet_server.leadership import AdvisoryLeadership
from fleet_server.registry import Registry, open_registry
from fleet_server.rollouts.runner import RolloutOptions, RolloutRunner, Selection
from fleet_server.rollouts.simulator import Behaviour, SimFleet
from fleet_server.rollouts.views import rollout_json, rollout_text
from protocol.messages import DesiredModel, InstallReport, ModelReport, Reported, encode
from tests.fleet_server.registry.helpers import Clock
from tests.postgres import postgres_schema

PROFILES = ("x86-64-avx2", "arm64-neon")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reg(db_url: str, tmp_path: Path, clock: Clock) -> Iterator[Registry]:
    with open_registry(db_url, blob_dir=tmp_path / "blobs", clock=clock) as registry:
        yield registry


class Bridge:
    """A simulated fleet whose devices read their desired state from the registry and
    report into it, as agents do over MQTT."""

    def __init__(self, reg: Registry, clock: Clock, n: int, bad: Behaviour | None) -> None:
        self.reg, self.clock = reg, clock
        self.v1 = reg.put_bundle(b"digits v1", "digits", 1).desired
        self.v2 = reg.put_bundle(b"digits v2", "digits", 2).desired
        profiles = {f"dev{i:03d}": PROFILES[i % 2] for i in range(n)}
        for device, profile in profiles.items():
            reg.upsert_device(device, group="lab", profile=profile,
                              cert_fingerprint="ab" * 32)
        reg.set_desired(self.v1.bundle_sha256, group="lab")
        self.sim = SimFleet("digits", self.v1, profiles, start=clock.now,
                            behaviour=lambda d, v: bad if v == 2 and bad else Behaviour())
        self.sent: dict[str, int] = {}
        self.report()

    def follow(self) -> None:
        """Devices take the desired state the registry holds for them."""
        for device in self.reg.list_devices(group="lab"):
            want = device.desired.get("digits")
            sim = self.sim.devices[device.id]
            if want != sim.desired:
                self.sim.apply_desired(device.id, want)

    def report(self) -> None:
        for d in self.sim.devices.values():
            installs = {} if d.install_version is None else {"digits": InstallReport(
                d.install_version, None, d.install_state or "committed")}
            self.reg.set_reported(d.id, encode(Reported(
                profile=d.profile, agent_version="sim", at=self.clock.now, installs=installs,
                models={} if d.version is None else {
                    "digits": ModelReport(d.version, None, "committed")})))
            new = [s for s in d.samples if s.seq > self.sent.get(d.id, 0)]
            if new:
                self.reg.add_telemetry(d.id, new)
                self.sent[d.id] = new[-1].seq

    def run(self, runner: RolloutRunner, rollout: str, seconds: float) -> str:
        end = self.clock.now + seconds
        while self.clock.now < end and runner.get(rollout).status in ("running", "paused"):
            runner.tick_all()
            self.follow()
            self.sim.advance(30.0)
            self.clock.now = self.sim.now
            self.report()
        return runner.get(rollout).status


def _runner(reg: Registry, clock: Clock, published: list[str]) -> RolloutRunner:
    return RolloutRunner(reg, publish=published.extend, online=lambda d, now: True,
                         clock=clock)


def test_a_good_rollout_succeeds_and_survives_a_new_runner(reg: Registry, clock: Clock,
                                                           db_url: str, tmp_path: Path) -> None:
    fleet = Bridge(reg, clock, 40, None)
    published: list[str] = []
    runner = _runner(reg, clock, published)
    state = runner.create(fleet.v2.bundle_sha256, Selection(group="lab"),
                          RolloutOptions(bake_s=120.0), actor="alice")
    exposed = sorted(state.exposed)
    assert published == exposed
    assert len(exposed) == 2
    assert reg.get_device(exposed[0]).desired["digits"] == DesiredModel(  # type: ignore[union-attr]
        2, fleet.v2.bundle_sha256, fleet.v2.size, compare_previous=0.1)
    with pytest.raises(RolloutError, match="already take part"):
        runner.create(fleet.v2.bundle_sha256, Selection(devices=(exposed[0],)),
                      RolloutOptions(), actor="bob")
    fleet.run(runner, state.spec.id, 200.0)
    # A second server process (a fresh connection and runner) carries on from the registry.
    with open_registry(db_url, blob_dir=tmp_path / "blobs", clock=clock) as other:
        second = _runner(other, clock, published)
        assert second.get(state.spec.id).step >= 1
        assert fleet.run(second, state.spec.id, 3000.0) == "succeeded"
    assert all(d.desired["digits"] == fleet.v2 for d in reg.list_devices())
    kinds = [e.kind for e in reg.events() if e.kind.startswith("rollout.")]
    assert kinds == ["rollout.started", "rollout.step", "rollout.step", "rollout.succeeded"]
    entries = reg.audit_log()
    assert [e.action for e in entries] == kinds
    assert entries[0].actor == "alice"
    assert entries[-1].actor == "controller"
    assert verify_chain(entries, reg.audit_head()) == []
    view = rollout_json(runner.get(state.spec.id))
    assert view["state"] == "succeeded"
    assert [s["verdict"] for s in view["steps"]] == [
        "passed"] * 3
    assert "SUCCEEDED" in rollout_text(view)


def test_a_disagreeing_model_halts_at_the_canary(reg: Registry, clock: Clock) -> None:
    fleet = Bridge(reg, clock, 60, Behaviour(agreement=0.7))
    runner = _runner(reg, clock, [])
    state = runner.create(fleet.v2.bundle_sha256, Selection(group="lab"),
                          RolloutOptions(bake_s=120.0), actor="alice")
    assert fleet.run(runner, state.spec.id, 3000.0) == "halted"
    halted = next(e for e in reg.events() if e.kind == "rollout.halted")
    assert halted.detail["gate"] == "agreement>=0.98"
    assert halted.detail["step"] == "5%"
    assert halted.detail["n"] > 0
    assert halted.detail["value"] < 0.9  # 70% agreement, on few pairs
    fleet.follow()
    fleet.sim.advance(60)
    assert fleet.sim.exposed_to(2) == set(state.exposed)
    assert all(d.version == 1 for d in fleet.sim.devices.values())
    assert all(d.desired["digits"] == fleet.v1 for d in reg.list_devices())
    view = rollout_json(runner.get(state.spec.id))
    gate = next(g for g in view["gates"] if g["metric"] == "agreement")
    assert gate["status"] == "fail"
    assert gate["threshold"] == 0.98
    assert gate["n"] > 0


def test_abort_rolls_back_what_was_installed(reg: Registry, clock: Clock) -> None:
    fleet = Bridge(reg, clock, 20, None)
    runner = _runner(reg, clock, [])
    state = runner.create(fleet.v2.bundle_sha256, Selection(tag=None, profile="arm64-neon"),
                          RolloutOptions(steps=(50.0, 100.0), bake_s=60.0), actor="alice")
    fleet.run(runner, state.spec.id, 90.0)
    runner.command(state.spec.id, "pause", "bob")
    with pytest.raises(RolloutError, match="paused already"):
        runner.command(state.spec.id, "pause", "bob")
    aborted = runner.command(state.spec.id, "abort", "bob", "wrong bundle")
    assert aborted.status == "aborted"
    assert all(reg.get_device(d).desired["digits"] == fleet.v1  # type: ignore[union-attr]
               for d in aborted.exposed)
    last = reg.audit_log()[-1]
    assert (last.actor, last.action, last.reason) == ("bob", "rollout.aborted",
                                                      "wrong bundle")


def test_a_save_from_a_stale_revision_is_refused(reg: Registry, clock: Clock, db_url: str,
                                                 tmp_path: Path) -> None:
    """Two servers (here: two runners on two connections) read revision N; the first to
    save wins, the second is refused and changes nothing."""
    fleet = Bridge(reg, clock, 10, None)
    runner = _runner(reg, clock, [])
    state = runner.create(fleet.v2.bundle_sha256, Selection(group="lab"),
                          RolloutOptions(bake_s=60.0), actor="alice")
    with open_registry(db_url, blob_dir=tmp_path / "blobs", clock=clock) as other:
        second = _runner(other, clock, [])
        stale = second.get(state.spec.id)
        runner.command(state.spec.id, "pause", "alice")
        with pytest.raises(RegistryError, match="changed since it was read"):
            second._commit(stale, [], "bob", "rollout.pause", "")
        assert second.get(state.spec.id).status == "paused"
        assert second.tick_all() == 0  # paused: nothing moves, and no error escapes


def test_a_command_applies_again_to_what_another_process_saved_meanwhile(
        reg: Registry, clock: Clock, db_url: str, tmp_path: Path) -> None:
    """An operator's abort through one process while the leader (another process) saves
    the rollout between the abort's read and its save: the abort is applied again to
    what the leader saved, not refused."""
    fleet = Bridge(reg, clock, 10, None)
    leader = _runner(reg, clock, [])
    state = leader.create(fleet.v2.bundle_sha256, Selection(group="lab"),
                          RolloutOptions(bake_s=60.0), actor="alice")
    moved: list[str] = []

    def clock_of_a_race() -> float:
        if not moved:  # between the follower's read and its save, once
            moved.append(leader.command(state.spec.id, "pause", "alice").status)
        return clock.now

    with open_registry(db_url, blob_dir=tmp_path / "blobs", clock=clock) as other:
        follower = RolloutRunner(other, publish=lambda ids: None,
                                 online=lambda d, now: True, clock=clock_of_a_race)
        aborted = follower.command(state.spec.id, "abort", "bob", "wrong bundle")
    assert moved == ["paused"]
    assert aborted.status == "aborted"
    assert [e.action for e in reg.audit_log()][-2:] == ["rollout.paused", "rollout.aborted"]


class _CountingClock:
    """The test clock, counting reads: a runner reads it once per rollout it ticks."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.reads = clock, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.clock.now


def _wait(condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.integration
def test_only_the_leader_ticks_commands_work_anywhere_and_the_other_takes_over(
        clock: Clock, tmp_path: Path) -> None:
    """Two server processes (two registries, leaderships and runners on one PostgreSQL
    schema): only the leader's runner ticks the rollout; a rollout started and paused
    through the other works (it writes the registry; the leader acts on it); when the
    leader stops, the other takes over the running rollout from the registry."""
    fleet_name = f"f{time.monotonic_ns()}"  # a leadership lock of this test's own
    with postgres_schema() as (url, _), contextlib.ExitStack() as stack:
        registries = [stack.enter_context(open_registry(url, blob_dir=tmp_path / "blobs",
                                                        clock=clock)) for _ in "ab"]
        fleet = Bridge(registries[0], clock, 6, None)
        leaders = [AdvisoryLeadership(url, fleet_name, interval_s=0.05) for _ in "ab"]
        clocks = [_CountingClock(clock) for _ in "ab"]
        published: list[list[str]] = [[], []]
        runners = [RolloutRunner(reg, publish=sent.extend, online=lambda d, now: True,
                                 clock=counting, tick_s=0.05, is_leader=leader.is_leader)
                   for reg, sent, counting, leader in zip(registries, published, clocks,
                                                          leaders, strict=True)]
        for leader, runner in zip(leaders, runners, strict=True):
            stack.callback(leader.stop)
            stack.callback(runner.stop)
        leaders[0].start()
        _wait(leaders[0].is_leader, "a to lead")
        leaders[1].start()
        for runner in runners:
            runner.start()
        a, b = runners

        state = b.create(fleet.v2.bundle_sha256, Selection(group="lab"),
                         RolloutOptions(bake_s=3600.0), actor="alice")
        assert published[1] == sorted(state.exposed)  # the command's own step, sent by b
        b_reads = clocks[1].reads
        a_reads = clocks[0].reads
        _wait(lambda: clocks[0].reads >= a_reads + 10, "a to tick the rollout")
        assert clocks[1].reads == b_reads  # b did not tick
        assert not leaders[1].is_leader()

        assert b.command(state.spec.id, "pause", "bob").status == "paused"
        assert a.get(state.spec.id).status == "paused"
        b.command(state.spec.id, "resume", "bob")

        leaders[0].stop()  # a clean stop hands over
        _wait(leaders[1].is_leader, "b to take over")
        b_reads = clocks[1].reads
        _wait(lambda: clocks[1].reads >= b_reads + 10, "b to tick the rollout")
        a_reads = clocks[0].reads
        _wait(lambda: clocks[1].reads >= b_reads + 20, "b to go on ticking")
        assert clocks[0].reads == a_reads  # a no longer ticks
        assert b.get(state.spec.id).status == "running"
        assert published[0] == []  # a's ticks changed no device (a bake of an hour)
