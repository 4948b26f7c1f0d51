"""The acts before the first publish: probe this host and pick its profile, compress the
reference model, create the keys and sign bundles v1..v3 (:func:`prepare`); start ``fleet
serve`` and enroll and start three agents (:func:`start_fleet`)."""

from __future__ import annotations

import json
from pathlib import Path

from fleet_server.api_client import ServerClient, locate

from .harness import GROUP, Agent, Demo, DemoError, group_devices, table, tool

__all__ = ["prepare", "start_fleet"]

_DEVICES = ("gw-1", "gw-2", "gw-3")


def prepare(demo: Demo, model: Path, data: Path) -> tuple[str, str, dict[int, Path]]:
    """Profiles, compressed artifacts, keys and signed bundles v1..v3."""
    workdir = demo.workdir
    demo.title("Probe this host and match it to a firmware profile")
    probe = demo.run([tool("edge-agent"), "probe", "--json"], show=False)
    profile = json.loads(probe.stdout)["best_profile"]
    if profile is None:
        raise DemoError("no firmware profile fits this host (run 'edge-agent probe' to see "
                        "why); the demo needs one to target its bundles at")
    other = "x86-64-avx2" if profile != "x86-64-avx2" else "x86-64-vnni"
    print(f"    this host: {profile}; the third device will claim {other}")

    artifacts, keys = workdir / "artifacts", workdir / "keys"
    demo.title(f"Compress the reference model for {profile} and {other} "
               "(every candidate measured here, accuracy-gated)")
    demo.run([tool("edge-compress"), str(model), "--profile", profile, "--profile", other,
              "--calibration", str(data), "--eval", str(data), "--out", str(artifacts)])

    demo.title("Create the fleet's keys and sign bundles v1, v2 (and a v3 to tamper with)")
    demo.run([tool("fleet"), "keys", "init", "--dir", str(keys)])
    bundles = {}
    for version in (1, 2, 3):
        bundles[version] = workdir / f"digits-{version}.efb"
        demo.run([tool("fleet"), "bundle", "build", "--name", "digits", "--version",
                  str(version), "--artifacts", str(artifacts), "--keys", str(keys), "--out",
                  str(bundles[version])], show=version == 1)
    return profile, other, bundles


def start_fleet(demo: Demo, profile: str, other: str,
                 ) -> tuple[ServerClient, list[str], list[Agent]]:
    """``fleet serve`` and three enrolled, running agents."""
    workdir = demo.workdir
    server_dir = workdir / "server"
    demo.title("Start the fleet server (embedded Mosquitto, mutual TLS, per-device ACLs)")
    demo.start([tool("fleet"), "serve", "--data", str(server_dir), "--keys",
                str(workdir / "keys"), "--fleet", "demo", "--port", "0", "--mqtt-port", "0",
                "--rollout-tick", "1"],
               workdir / "server.log", (server_dir / "server.json").exists,
               "fleet serve to start")
    api = locate(None, server_dir)
    fleet = ["--data", str(server_dir)]

    demo.title("Enroll three agents with one-time tokens and start them")
    agents = [Agent(device, other if index == 2 else profile, workdir / device)
              for index, device in enumerate(_DEVICES)]
    for agent in agents:
        token = demo.run([tool("fleet"), "enroll-token", "--group", GROUP, *fleet],
                         show=False).stdout.strip()
        demo.run([tool("edge-agent"), "enroll", "--server", api.url, "--token", token,
                  "--device-id", agent.device, "--state-dir", str(agent.state_dir),
                  "--profile", agent.profile, "--port", "0", "--probation", "2",
                  "--telemetry-interval", "2"])
        demo.start([tool("edge-agent"), "run", "--config",
                    str(agent.state_dir / "agent.toml")], workdir / f"{agent.device}.log",
                   (agent.state_dir / "agent.json").exists, f"agent {agent.device} to start")

    def online() -> bool:
        devices = group_devices(api)
        return len(devices) == len(agents) and all(d["online"] for d in devices)

    demo.wait(online, "all three devices to come online")
    table(demo, fleet)
    return api, fleet, agents

