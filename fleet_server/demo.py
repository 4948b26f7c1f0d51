"""``fleet demo``: the product's main job, end to end, on this machine.

The demo drives the real command-line tools as separate processes, exactly as an operator
and devices would run them, so it exercises the installed product rather than library
internals (and keeps ``fleet_server`` free of imports of the agent or the compressor):

1. probe this host, pick its firmware profile and a second one;
2. compress the reference model for both profiles (measured, accuracy-gated);
3. create the fleet's keys and sign bundles v1 and v2 from the compressor's output;
4. start ``fleet serve`` (embedded Mosquitto with mutual TLS and per-device ACLs);
5. enroll three agents with one-time tokens and start them (separate processes, state
   directories and API ports; the third on the other profile, so it runs another variant);
6. publish v1 to the group, wait until every device reports it committed, and serve
   inferences through each agent's local API;
7. publish v2: every agent fetches, verifies, self-tests and hot-swaps it;
8. a v3 tampered after signing, planted in the server's bundle store as a compromised
   server would: every agent fetches it, rejects it with the reason, and keeps serving v2;
9. roll the desired state back (a server-signed re-release of v2's contents, v4);
10. a rollout of v5, the same model with two output classes swapped (it passes its own
    self-test: its golden outputs are swapped too), while every agent serves a stream of
    requests: the canary keeps v4 loaded and compares answers, the agreement gate halts the
    rollout, the canary is back on v4 at once, and the other devices never received v5;
11. a rollout of v6 (v2's artifacts again): shadow on the canary, then canary, then 100%,
    succeeded; the audit log verified.

Steps 10 and 11 need agents that report ``previous`` and ``shadow`` comparisons in their
telemetry (docs/rollouts.md, "What the agent reports"): when the canary runs v5, its bake is
over and no comparison has arrived, the demo says so, aborts the rollout, verifies the audit
log and ends there.

With ``--drift`` (docs/monitoring.md, "The drift demo"), after step 6:

- steady traffic of the digits evaluation images on every agent: ``fleet metrics`` shows
  requests, latency and a low drift PSI, and no alert fires;
- gw-1 starts receiving inverted images (``1 - x``): its agent's monitor reports the
  input drift, the server's drift rule fires, and the alert reaches a webhook (a local
  receiver the demo runs) within :data:`DRIFT_ALERT_S` seconds of the first shifted
  request, shows in ``fleet metrics`` and in what the dashboard reads.

The fleet table is printed after each step. Exit 0 when every expectation held.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .api_client import ServerClient, locate
from .errors import FleetError
from .registry import open_registry

__all__ = ["DRIFT_ALERT_S", "DRIFT_PSI", "DemoError", "DriftWatch", "run_demo"]

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
_GROUP = "demo"
_DEVICES = ("gw-1", "gw-2", "gw-3")
_WAIT_S = 60.0
#: The drift demo's alert threshold: a PSI above this on one device fires the alert. The
#: digits inputs the model was calibrated on score well below it; inverted images far above.
DRIFT_PSI = 0.25
#: The drift alert reaches the webhook within this many seconds of the first shifted
#: request: the agent reports every 2 s, the server evaluates its rules every second, and
#: the rest is slack for a loaded machine.
DRIFT_ALERT_S = 60.0


class DemoError(FleetError):
    """A demo step did not behave as the demo expects."""


def _tool(name: str) -> str:
    """The console script installed beside this interpreter (the demo's own venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class _Demo:
    def __init__(self, workdir: Path, models: Path) -> None:
        self.workdir = workdir
        self.models = models
        self.step = 0
        self.started = time.monotonic()
        self.processes: list[subprocess.Popen[bytes]] = []

    def title(self, text: str) -> None:
        self.step += 1
        print(f"\n[{self.step}] {text}", flush=True)

    def run(self, argv: list[str], *, expect_success: bool = True, show: bool = True,
            ) -> subprocess.CompletedProcess[str]:
        print(f"    $ {shlex.join([Path(argv[0]).name, *argv[1:]])}", flush=True)
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        for line in (result.stdout + result.stderr if show else result.stderr).splitlines():
            print(f"    {line}")
        if (result.returncode == 0) != expect_success:
            raise DemoError(f"step {self.step}: `{shlex.join(argv)}` exited "
                            f"{result.returncode}, which the demo did not expect; see above")
        return result

    def start(self, argv: list[str], log: Path, ready: Callable[[], bool], what: str) -> None:
        """Start a long-running process and wait until ``ready``."""
        print(f"    $ {shlex.join([Path(argv[0]).name, *argv[1:]])} &  (log: {log.name})",
              flush=True)
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        self.wait(lambda: process.poll() is None and ready(), what,
                  lambda: f"its log {log} says:\n{log.read_text(errors='replace')[-2000:]}")

    def wait(self, condition: Callable[[], bool], what: str,
             explain: Callable[[], str] = lambda: "", timeout: float = _WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.2)
        raise DemoError(f"step {self.step}: timed out after {timeout:.0f} s waiting for "
                        f"{what}. {explain()}")

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass(frozen=True)
class _Agent:
    device: str
    profile: str
    state_dir: Path


def run_demo(workdir: Path | None = None, models: Path = REPO_MODELS, *,
             drift: bool = False) -> int:
    """Run the demo in ``workdir`` (a fresh temporary directory by default); 0 on success.
    ``drift`` adds the monitoring steps (module docstring)."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
            return run_demo(Path(tmp), models, drift=drift)
    workdir.mkdir(parents=True, exist_ok=True)
    model, data = models / "digits_cnn.onnx", models / "digits_data.npz"
    for needed in (model, data):
        if not needed.is_file():
            raise DemoError(f"{needed} is missing; run the demo from a full checkout of the "
                            "repository (the reference models are committed there).")
    demo = _Demo(workdir, models)
    watch = DriftWatch() if drift else None
    try:
        if watch is not None:
            watch.start()
            watch.write_config(workdir / "server")
        _main(demo, model, data, watch)
    finally:
        demo.stop_all()
        if watch is not None:
            watch.stop()
    print(f"\ndemo passed: {demo.step} steps in {time.monotonic() - demo.started:.1f} s")
    return 0


def _main(demo: _Demo, model: Path, data: Path, watch: DriftWatch | None) -> None:
    profile, other, bundles = _prepare(demo, model, data)
    api, fleet, agents = _start_fleet(demo, profile, other)
    x = demo.workdir / "digits.npy"
    _write_samples(data, x)

    demo.title("Publish v1 to the group; every agent fetches, verifies and installs it")
    demo.run([_tool("fleet"), "publish", str(bundles[1]), "--group", _GROUP, *fleet])
    _converged(demo, api, 1)
    _table(demo, fleet)
    demo.title("Serve inferences through each agent's local API (Open Inference Protocol)")
    for agent in agents:
        _predict(demo, agent, x)
    if watch is not None:
        # Before the next step's load, which repeats one image: drift by design.
        _drift(demo, api, fleet, agents, data, watch=watch)

    demo.title("Publish v2 while gw-1 serves a steady stream of requests: each agent "
               "hot-swaps it (self-tested), no request dropped")
    load = _Load(demo, agents[0], x)
    demo.run([_tool("fleet"), "publish", str(bundles[2]), "--group", _GROUP, *fleet])
    _converged(demo, api, 2)
    load.finish()
    _table(demo, fleet)

    _tampered(demo, api, fleet, bundles[3])
    demo.title("v2 keeps serving on every agent")
    for agent in agents:
        status = demo.run([_tool("edge-agent"), "status", "--json", "--state-dir",
                           str(agent.state_dir)], show=False)
        served = json.loads(status.stdout)["models"][0]
        if served["version"] != 2:
            raise DemoError(f"{agent.device} serves v{served['version']}, not v2")
        _predict(demo, agent, x)

    _rollouts(demo, api, fleet, agents, bundles=bundles, data=data)


def _prepare(demo: _Demo, model: Path, data: Path) -> tuple[str, str, dict[int, Path]]:
    """Profiles, compressed artifacts, keys and signed bundles v1..v3."""
    workdir = demo.workdir
    demo.title("Probe this host and match it to a firmware profile")
    probe = demo.run([_tool("edge-agent"), "probe", "--json"], show=False)
    profile = json.loads(probe.stdout)["best_profile"]
    if profile is None:
        raise DemoError("no firmware profile fits this host (run 'edge-agent probe' to see "
                        "why); the demo needs one to target its bundles at")
    other = "x86-64-avx2" if profile != "x86-64-avx2" else "x86-64-vnni"
    print(f"    this host: {profile}; the third device will claim {other}")

    artifacts, keys = workdir / "artifacts", workdir / "keys"
    demo.title(f"Compress the reference model for {profile} and {other} "
               "(every candidate measured here, accuracy-gated)")
    demo.run([_tool("edge-compress"), str(model), "--profile", profile, "--profile", other,
              "--calibration", str(data), "--eval", str(data), "--out", str(artifacts)])

    demo.title("Create the fleet's keys and sign bundles v1, v2 (and a v3 to tamper with)")
    demo.run([_tool("fleet"), "keys", "init", "--dir", str(keys)])
    bundles = {}
    for version in (1, 2, 3):
        bundles[version] = workdir / f"digits-{version}.efb"
        demo.run([_tool("fleet"), "bundle", "build", "--name", "digits", "--version",
                  str(version), "--artifacts", str(artifacts), "--keys", str(keys), "--out",
                  str(bundles[version])], show=version == 1)
    return profile, other, bundles


def _start_fleet(demo: _Demo, profile: str, other: str,
                 ) -> tuple[ServerClient, list[str], list[_Agent]]:
    """``fleet serve`` and three enrolled, running agents."""
    workdir = demo.workdir
    server_dir = workdir / "server"
    demo.title("Start the fleet server (embedded Mosquitto, mutual TLS, per-device ACLs)")
    demo.start([_tool("fleet"), "serve", "--data", str(server_dir), "--keys",
                str(workdir / "keys"), "--fleet", "demo", "--port", "0", "--mqtt-port", "0",
                "--rollout-tick", "1"],
               workdir / "server.log", (server_dir / "server.json").exists,
               "fleet serve to start")
    api = locate(None, server_dir)
    fleet = ["--data", str(server_dir)]

    demo.title("Enroll three agents with one-time tokens and start them")
    agents = [_Agent(device, other if index == 2 else profile, workdir / device)
              for index, device in enumerate(_DEVICES)]
    for agent in agents:
        token = demo.run([_tool("fleet"), "enroll-token", "--group", _GROUP, *fleet],
                         show=False).stdout.strip()
        demo.run([_tool("edge-agent"), "enroll", "--server", api.url, "--token", token,
                  "--device-id", agent.device, "--state-dir", str(agent.state_dir),
                  "--profile", agent.profile, "--port", "0", "--probation", "2",
                  "--telemetry-interval", "2"])
        demo.start([_tool("edge-agent"), "run", "--config",
                    str(agent.state_dir / "agent.toml")], workdir / f"{agent.device}.log",
                   (agent.state_dir / "agent.json").exists, f"agent {agent.device} to start")

    def online() -> bool:
        devices = _devices(api)
        return len(devices) == len(agents) and all(d["online"] for d in devices)

    demo.wait(online, "all three devices to come online")
    _table(demo, fleet)
    return api, fleet, agents


def _tampered(demo: _Demo, api: ServerClient, fleet: list[str], bundle: Path) -> None:
    demo.title("A compromised server stores and publishes v3 tampered after signing")
    tampered = bytearray(bundle.read_bytes())
    tampered[len(tampered) // 2] ^= 0x01
    sha = _plant(demo.workdir / "server", bytes(tampered))
    print(f"    planted digits v3 (sha256 {sha[:16]}) in the server's bundle store, "
          "bypassing the upload check")
    api.post("/api/publish", {"bundle_sha256": sha, "group": _GROUP})

    def rejected() -> bool:
        return all(_install_of(d).get("state") == "failed"
                   and _install_of(d).get("bundle_sha256") == sha for d in _devices(api))

    demo.wait(rejected, "every agent to reject v3",
              lambda: json.dumps([_install_of(d) for d in _devices(api)], indent=1))
    for device in _devices(api):
        install = _install_of(device)
        print(f"    {device['id']}: v3 {install['state']}: {install['reason']}")
    _table(demo, fleet)


def _predict(demo: _Demo, agent: _Agent, x: Path) -> None:
    result = demo.run([_tool("edge-agent"), "predict", "digits", "--input", str(x),
                       "--state-dir", str(agent.state_dir)], show=False)
    print(f"    {agent.device}: {result.stdout.splitlines()[0]}")


# A closed loop of requests through one agent's API, as an app on the device would send them,
# run with the agent's own client in its own process; it stops when the stop file appears
# and prints what it saw as JSON.
_LOAD_SCRIPT = """
import json, pathlib, sys, time
import numpy
from agent.daemon import find_running
state, x_file, stop = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
pause = float(sys.argv[4])
x = numpy.load(x_file)
ok = failed = 0
versions = []
with find_running(state).client(timeout=10) as client:
    while not stop.exists():
        try:
            client.infer("digits", {"input": x[(ok + failed) % len(x)][None]})
            ok += 1
        except Exception:
            failed += 1
        time.sleep(pause)
        if (ok + failed) % 50 == 0:
            version = client.model_metadata("digits")["versions"][0]
            if not versions or versions[-1] != version:
                versions.append(version)
print(json.dumps({"ok": ok, "failed": failed, "versions": versions}))
"""


class _Load:
    """Requests to one agent for as long as a step takes."""

    def __init__(self, demo: _Demo, agent: _Agent, x: Path, pause_s: float = 0.0) -> None:
        """A closed loop of requests, ``pause_s`` apart (0: as fast as the agent answers)."""
        self.demo, self.agent = demo, agent
        self.stop = demo.workdir / f"load-{agent.device}.stop"
        self.stop.unlink(missing_ok=True)  # an earlier load's
        self.process = subprocess.Popen(
            [sys.executable, "-c", _LOAD_SCRIPT, str(agent.state_dir), str(x), str(self.stop),
             str(pause_s)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(self) -> None:
        self.stop.touch()
        out, _ = self.process.communicate(timeout=30)
        try:
            seen = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise DemoError(f"the load on {self.agent.device} failed: {out[-2000:]}") from None
        print(f"    {self.agent.device} answered {seen['ok']} requests during the rollout, "
              f"{seen['failed']} failed; versions serving: "
              f"{' -> '.join('v' + v for v in seen['versions'])}")
        if seen["failed"]:
            raise DemoError(f"{seen['failed']} requests failed during the hot-swap")


def _devices(api: ServerClient) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = api.get("/api/devices", {"group": _GROUP})["devices"]
    return devices


def _install_of(device: dict[str, Any]) -> dict[str, Any]:
    installs: dict[str, Any] = (device.get("reported") or {}).get("installs", {})
    install: dict[str, Any] = installs.get("digits", {})
    return install


def _converged(demo: _Demo, api: ServerClient, version: int) -> None:
    def done() -> bool:
        devices = _devices(api)
        return bool(devices) and all(
            d["converged"] and d["desired"]["digits"]["version"] == version for d in devices)

    demo.wait(done, f"every device to report v{version} committed",
              lambda: json.dumps([(d["id"], d.get("reported")) for d in _devices(api)]))


def _table(demo: _Demo, fleet: list[str]) -> None:
    demo.run([_tool("fleet"), "devices", *fleet])


def _plant(server_dir: Path, data: bytes) -> str:
    """Store ``data`` as digits v3 directly in the server's registry, as an attacker with
    write access to the server would (the API would have refused it)."""
    with open_registry(server_dir / "fleet.db", blob_dir=server_dir / "bundles") as registry:
        return registry.put_bundle(data, "digits", 3).sha256


def _write_samples(data: Path, out: Path, count: int = 3) -> None:
    """``count`` eval images as a .npy file, without importing numpy into the server."""
    subprocess.run([sys.executable, "-c", "import numpy, sys; numpy.save(sys.argv[2], "
                    "numpy.load(sys.argv[1])['eval_x'][:int(sys.argv[3])])", str(data),
                    str(out), str(count)], check=True)


# The digits model with output classes 0 and 1 swapped, in every ONNX artifact of an
# edge-compress output directory, and in its golden self-test outputs: a model that passes
# its own self-test and answers differently. Run as a process (the server imports no onnx).
_SWAP_SCRIPT = """
import base64, json, pathlib, shutil, sys
import numpy, onnx
from onnx import helper, numpy_helper
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
shutil.copytree(src, dst)
report = json.loads((dst / "report.json").read_text())
perm = numpy.arange(10, dtype=numpy.int64)
perm[[0, 1]] = perm[[1, 0]]
for variant in report["variants"]:
    if variant["format"] != "onnx":
        continue
    path = dst / variant["file"]
    model = onnx.load(path)
    graph = model.graph
    for out in graph.output:
        raw = out.name + "_unswapped"
        for node in graph.node:
            node.output[:] = [raw if o == out.name else o for o in node.output]
        graph.initializer.append(numpy_helper.from_array(perm, out.name + "_perm"))
        graph.node.append(helper.make_node("Gather", [raw, out.name + "_perm"], [out.name],
                                           axis=1))
    onnx.save(model, path)
for case in report.get("self_test", []):
    for tensor in case["expected_outputs"].values():
        a = numpy.frombuffer(base64.b64decode(tensor["data"]), dtype=tensor["dtype"])
        a = a.reshape(tensor["shape"])[:, perm]
        tensor["data"] = base64.b64encode(numpy.ascontiguousarray(a).tobytes()).decode()
(dst / "self_test.npz").unlink(missing_ok=True)
(dst / "report.json").write_text(json.dumps(report))
"""


def _rollouts(demo: _Demo, api: ServerClient, fleet: list[str], agents: list[_Agent], *,
              bundles: dict[int, Path], data: Path) -> None:
    """Steps 9-11 (module docstring): a halted and a successful rollout."""
    workdir = demo.workdir
    keys = ["--keys", str(workdir / "keys"), *fleet]
    demo.title("Roll the group back to v2 (re-released by the server as v4)")
    demo.run([_tool("fleet"), "rollback", "--group", _GROUP, *fleet])
    _converged(demo, api, 4)
    demo.title("Build v5: the same model with classes 0 and 1 swapped (its self-test "
               "passes), and v6: the good model again")
    subprocess.run([sys.executable, "-c", _SWAP_SCRIPT, str(workdir / "artifacts"),
                    str(workdir / "artifacts-swapped")], check=True)
    for version, artifacts in ((5, "artifacts-swapped"), (6, "artifacts")):
        bundles[version] = workdir / f"digits-{version}.efb"
        demo.run([_tool("fleet"), "bundle", "build", "--name", "digits", "--version",
                  str(version), "--artifacts", str(workdir / artifacts), "--out",
                  str(bundles[version]), *keys])
    x = workdir / "digits-stream.npy"
    _write_samples(data, x, 540)
    # Every agent answers a stream of app requests (a few hundred a second, leaving the
    # two cores room for installs): the compared requests the agreement gate counts.
    loads = [_Load(demo, agent, x, pause_s=0.004) for agent in agents]
    try:
        # A few telemetry samples under load first: each device's latency before the
        # rollout, which the p99_ratio gate compares the new version's with.
        time.sleep(6)
        demo.title("Roll out v5 (canary 34% -> 100%): the agreement gate halts it at the "
                   "canary and the canary goes back to v4")
        rollout = demo.run([_tool("fleet"), "rollout", "start", str(bundles[5]), "--group",
                            _GROUP, "--steps", "34,100", "--bake", "20s", *fleet],
                           show=False).stdout.strip()
        print(f"    rollout {rollout} started")
        view = _rollout_end(demo, api, rollout)
        if view is None:
            _skip(demo, rollout, fleet)
            return
        _halted_at_canary(demo, api, view, agents)
        demo.title("Roll out v6: shadow on the canary, then canary, then 100%")
        rollout = demo.run([_tool("fleet"), "rollout", "start", str(bundles[6]), "--group",
                            _GROUP, "--shadow", "10s", "--steps", "34,100", "--bake", "8s",
                            *fleet], show=False).stdout.strip()
        view = _rollout_end(demo, api, rollout)
        if view is None or view["state"] != "succeeded":
            raise DemoError(f"rollout {rollout} of a good version did not succeed: "
                            f"{view and view['reason']}")
        _converged(demo, api, 6)
    finally:
        for load in loads:
            load.finish()
    demo.run([_tool("fleet"), "rollout", "status", rollout, *fleet])
    demo.title("The audit log: who did what, when and why; its hash chain verified")
    demo.run([_tool("fleet"), "audit", "verify", *fleet])


def _halted_at_canary(demo: _Demo, api: ServerClient, view: dict[str, Any],
                      agents: list[_Agent]) -> None:
    reason = view["reason"] or {}
    print(f"    {view['state']}: {reason.get('text')}")
    if view["state"] != "halted" or view["step"] != "34%":
        raise DemoError(f"rollout {view['id']} ended {view['state']} at {view['step']}, "
                        "not halted at the canary")
    if reason.get("gate") != "agreement>=0.98":
        # A canary can also roll the model back itself (its probation) before enough
        # answers were compared; the halt is then the install gate's. Still a halt.
        print("    (the canary's own probation rolled v5 back before the agreement gate "
              "had its evidence)")
    canary = set(view["steps"][0]["devices"])
    _converged(demo, api, 4)
    never = [a.device for a in agents if a.device not in canary]
    for device in _devices(api):
        if device["id"] in never and _install_of(device).get("version") == 5:
            raise DemoError(f"{device['id']} was outside the canary and still got v5")
    print(f"    canary {', '.join(sorted(canary))} back on v4; "
          f"{', '.join(never)} never received v5")


def _skip(demo: _Demo, rollout: str, fleet: list[str]) -> None:
    """The agents do not report comparisons: say so, abort, and end the demo there."""
    print("    the agents report no `previous` comparisons (models.digits.previous in "
          "their telemetry; docs/rollouts.md), so the agreement gate cannot judge: this "
          "agent predates the monitoring contract. Aborting the rollout; the model-aware "
          "rollout steps are skipped.")
    demo.run([_tool("fleet"), "rollout", "abort", rollout, "--reason",
              "agents report no comparisons", *fleet])
    demo.title("The audit log: who did what, when and why; its hash chain verified")
    demo.run([_tool("fleet"), "audit", "verify", *fleet])


def _rollout_end(demo: _Demo, api: ServerClient, rollout: str) -> dict[str, Any] | None:
    """Wait until the rollout is final, or None when its step waits for agreement data that
    the agents never send (every device reporting, the bake over, no pairs compared)."""
    views: list[dict[str, Any]] = []

    def final() -> bool:
        views.append(api.get(f"/api/rollouts/{rollout}"))
        view = views[-1]
        step: dict[str, Any] = next(
            (s for s in view["steps"] if s["name"] == view["step"]), {})
        agreement = next((g for g in view["gates"] if g["metric"] == "agreement"), None)
        stuck = (step.get("verdict") == "waiting" and agreement is not None
                 and agreement["n"] == 0 and step.get("reporting") == step.get("required"))
        return stuck or view["state"] in ("halted", "succeeded", "aborted")

    demo.wait(final, f"rollout {rollout} to end", lambda: (
        f"it is {views[-1]['state']} at {views[-1]['step']}, waiting for: "
        f"{[s.get('waiting_for') for s in views[-1]['steps']]}"), timeout=120)
    return views[-1] if views[-1]["state"] in ("halted", "succeeded", "aborted") else None



# --- fleet demo --drift --------------------------------------------------------------------

class DriftWatch:
    """The webhook the drift demo's alerts go to: a local HTTP receiver in the demo's
    process, and the server config (``DATA/server.toml``) that points the server at it."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        watch = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = min(int(self.headers.get("Content-Length", "0")), 1 << 20)
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    body = None
                self.send_response(204)
                self.end_headers()
                if isinstance(body, dict):
                    with watch._changed:
                        watch.alerts.append(body)
                        watch._changed.notify_all()

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,),
                                        name="demo-webhook", daemon=True)

    def start(self) -> None:
        """Listen."""
        self._thread.start()

    def stop(self) -> None:
        """Stop listening."""
        self._server.shutdown()
        self._server.server_close()

    def write_config(self, server_dir: Path) -> Path:
        """Write the server config the demo's ``fleet serve`` reads: the drift rule, a
        fast evaluation and this webhook."""
        server_dir.mkdir(parents=True, exist_ok=True)
        path = server_dir / "server.toml"
        path.write_text(f"""# fleet demo --drift: alerts to the demo's local webhook
[monitoring]
evaluate_every_s = 1

[[monitoring.webhook]]
url = "{self.url}"
timeout_s = 2

[[monitoring.alert]]
kind = "drift"
psi = {DRIFT_PSI}
devices = 1
window_s = 120
""", encoding="utf-8")
        return path

    def wait(self, kind: str, key: str, timeout: float) -> dict[str, Any] | None:
        """The first firing notice of (kind, key), waiting up to ``timeout`` seconds."""
        def found() -> dict[str, Any] | None:
            return next((a for a in self.alerts if (a.get("status"), a.get("kind"),
                                                    a.get("key")) == ("firing", kind, key)),
                        None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None, timeout)
            return found()


# Requests of the evaluation images (inverted with "invert") through one agent's API, one
# at a time, until the stop file appears; prints how many as JSON.
_TRAFFIC_SCRIPT = """
import json, pathlib, sys, time
import numpy
from agent.daemon import find_running
state, data, invert, stop = (pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1",
                             pathlib.Path(sys.argv[4]))
x = numpy.load(data)["eval_x"]
if invert:
    x = (1.0 - x).astype(x.dtype)
sent = failed = 0
with find_running(state).client(timeout=10) as client:
    while not stop.exists():
        try:
            client.infer("digits", {"input": x[sent % len(x)][None]})
        except Exception:
            failed += 1
        sent += 1
print(json.dumps({"sent": sent, "failed": failed}))
"""


class _Traffic:
    """Requests to several agents, each from its own process, until :meth:`finish`."""

    def __init__(self, demo: _Demo, agents: list[_Agent], data: Path, *,
                 inverted: tuple[str, ...] = ()) -> None:
        self.stop = demo.workdir / f"traffic-{time.monotonic_ns()}.stop"
        self.processes = {a.device: subprocess.Popen(
            [sys.executable, "-c", _TRAFFIC_SCRIPT, str(a.state_dir), str(data),
             "1" if a.device in inverted else "0", str(self.stop)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for a in agents}

    def finish(self) -> None:
        self.stop.touch()
        for device, process in self.processes.items():
            out, _ = process.communicate(timeout=30)
            try:
                seen = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                raise DemoError(f"the traffic to {device} failed: {out[-2000:]}") from None
            print(f"    {device}: {seen['sent']} requests, {seen['failed']} failed")


def _drift(demo: _Demo, api: ServerClient, fleet: list[str], agents: list[_Agent],
           data: Path, *, watch: DriftWatch) -> None:
    demo.title("Steady traffic on every agent (the digits evaluation images): requests, "
               "latency and a low drift PSI in `fleet metrics`, no alert")
    traffic = _Traffic(demo, agents, data)
    time.sleep(8)  # four telemetry intervals
    traffic.finish()
    demo.wait(lambda: any(t["requests"] for t in api.get(
        "/api/metrics", {"window": 120, "model": "digits"})["totals"]),
        "the traffic to show in the metrics")
    demo.run([_tool("fleet"), "metrics", "--window", "120", *fleet])
    if watch.alerts:
        raise DemoError(f"an alert fired on steady traffic: {watch.alerts}")

    demo.title(f"gw-1 starts receiving inverted images: the drift alert (PSI > {DRIFT_PSI}) "
               f"reaches the webhook within {DRIFT_ALERT_S:.0f} s, shows in `fleet "
               "metrics` and on the dashboard")
    started = time.monotonic()
    traffic = _Traffic(demo, agents, data, inverted=(agents[0].device,))
    try:
        alert = watch.wait("drift", "digits", DRIFT_ALERT_S)
    finally:
        traffic.finish()
    took = time.monotonic() - started
    if alert is None:
        raise DemoError(
            f"no drift alert reached the webhook within {DRIFT_ALERT_S:.0f} s of gw-1's "
            "first inverted image. The agents must report models.digits.monitor.drift.psi "
            "in their telemetry (MONITOR_CONTRACT.md); what the server has: "
            + json.dumps(api.get("/api/metrics", {"window": 120, "by": "device,model"})))
    worst = [w["device"] for w in alert["detail"].get("worst", [])]
    print(f"    webhook {watch.url} got after {took:.1f} s: {alert['summary']}")
    if worst[:1] != [agents[0].device]:
        raise DemoError(f"the alert names {worst}, not {agents[0].device}, as drifting")
    demo.run([_tool("fleet"), "metrics", "--window", "120", *fleet])
    firing = api.get("/api/overview")["alerts_firing"]  # what the dashboard shows
    if not any((a["kind"], a["key"]) == ("drift", "digits") for a in firing):
        raise DemoError(f"the dashboard's overview does not show the alert: {firing}")
    print(f"    dashboard: {api.url}/dashboard (sign in with {demo.workdir / 'server'}/"
          "admin.token) shows the alert and gw-1's drift chart")
