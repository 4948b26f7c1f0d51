"""The publishing acts: v1 to the group and inferences through every agent
(:func:`publish_first`); v2 hot-swapped while gw-1 serves a stream of requests
(:func:`hot_swap`); a v3 tampered after signing, planted in the server's store, rejected by
every agent, which keeps serving v2 (:func:`tampered`)."""

from __future__ import annotations

import json
from pathlib import Path

from fleet_server.api_client import ServerClient
from fleet_server.registry import open_registry

from .harness import (
    GROUP,
    Agent,
    Demo,
    DemoError,
    converged,
    group_devices,
    install_of,
    predict,
    table,
    tool,
)
from .traffic import Load

__all__ = ["hot_swap", "publish_first", "tampered"]


def publish_first(demo: Demo, api: ServerClient, fleet: list[str], agents: list[Agent], *,
                  bundle: Path, x: Path) -> None:
    """Publish v1 to the group, wait until every device runs it, and predict on each."""
    demo.title("Publish v1 to the group; every agent fetches, verifies and installs it")
    demo.run([tool("fleet"), "publish", str(bundle), "--group", GROUP, *fleet])
    converged(demo, api, 1)
    table(demo, fleet)
    demo.title("Serve inferences through each agent's local API (Open Inference Protocol)")
    for agent in agents:
        predict(demo, agent, x)


def hot_swap(demo: Demo, api: ServerClient, fleet: list[str], agents: list[Agent], *,
             bundle: Path, x: Path) -> None:
    """Publish v2 while the first agent answers a closed loop of requests: none may fail."""
    demo.title("Publish v2 while gw-1 serves a steady stream of requests: each agent "
               "hot-swaps it (self-tested), no request dropped")
    load = Load(demo, agents[0], x)
    demo.run([tool("fleet"), "publish", str(bundle), "--group", GROUP, *fleet])
    converged(demo, api, 2)
    load.finish()
    table(demo, fleet)


def tampered(demo: Demo, api: ServerClient, fleet: list[str], agents: list[Agent], *,
             bundle: Path, x: Path) -> None:
    """Plant ``bundle`` with one bit flipped and publish it: every agent rejects it, and
    v2 keeps serving."""
    demo.title("A compromised server stores and publishes v3 tampered after signing")
    damaged = bytearray(bundle.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    sha = _plant(demo.workdir / "server", bytes(damaged))
    print(f"    planted digits v3 (sha256 {sha[:16]}) in the server's bundle store, "
          "bypassing the upload check")
    api.post("/api/publish", {"bundle_sha256": sha, "group": GROUP})

    def rejected() -> bool:
        return all(install_of(d).get("state") == "failed"
                   and install_of(d).get("bundle_sha256") == sha for d in group_devices(api))

    demo.wait(rejected, "every agent to reject v3",
              lambda: json.dumps([install_of(d) for d in group_devices(api)], indent=1))
    for device in group_devices(api):
        install = install_of(device)
        print(f"    {device['id']}: v3 {install['state']}: {install['reason']}")
    table(demo, fleet)

    demo.title("v2 keeps serving on every agent")
    for agent in agents:
        status = demo.run([tool("edge-agent"), "status", "--json", "--state-dir",
                           str(agent.state_dir)], show=False)
        served = json.loads(status.stdout)["models"][0]
        if served["version"] != 2:
            raise DemoError(f"{agent.device} serves v{served['version']}, not v2")
        predict(demo, agent, x)


def _plant(server_dir: Path, data: bytes) -> str:
    """Store ``data`` as digits v3 directly in the server's registry, as an attacker with
    write access to the server would (the API would have refused it)."""
    with open_registry(server_dir / "fleet.db", blob_dir=server_dir / "bundles") as registry:
        return registry.put_bundle(data, "digits", 3).sha256

