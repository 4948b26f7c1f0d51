"""The monitoring act of ``fleet demo --drift`` (docs/monitoring.md, "The drift demo"):
steady traffic and no alert, then inverted images on gw-1 and the drift alert at a webhook
(:class:`DriftWatch`, a local receiver) within :data:`DRIFT_ALERT_S` seconds, in ``fleet
metrics`` and in what the dashboard reads (:func:`watch_drift`)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fleet_server.api_client import ServerClient

from .harness import Agent, Demo, DemoError, tool
from .traffic import Traffic

__all__ = ["DRIFT_ALERT_S", "DRIFT_PSI", "DriftWatch", "watch_drift"]

#: The drift demo's alert threshold: a PSI above this on one device fires the alert. The
#: digits inputs the model was calibrated on score well below it; inverted images far above.
DRIFT_PSI = 0.25
#: The drift alert reaches the webhook within this many seconds of the first shifted
#: request: the agent reports every 2 s, the server evaluates its rules every second, and
#: the rest is slack for a loaded machine.
DRIFT_ALERT_S = 60.0


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


def watch_drift(demo: Demo, api: ServerClient, fleet: list[str], agents: list[Agent],
                data: Path, *, watch: DriftWatch) -> None:
    """Steady traffic and no alert, then inverted images on the first agent and the drift
    alert at ``watch`` in time, naming that device (module docstring)."""
    demo.title("Steady traffic on every agent (the digits evaluation images): requests, "
               "latency and a low drift PSI in `fleet metrics`, no alert")
    traffic = Traffic(demo, agents, data)
    time.sleep(8)  # four telemetry intervals
    traffic.finish()
    demo.wait(lambda: any(t["requests"] for t in api.get(
        "/api/metrics", {"window": 120, "model": "digits"})["totals"]),
        "the traffic to show in the metrics")
    demo.run([tool("fleet"), "metrics", "--window", "120", *fleet])
    if watch.alerts:
        raise DemoError(f"an alert fired on steady traffic: {watch.alerts}")

    demo.title(f"gw-1 starts receiving inverted images: the drift alert (PSI > {DRIFT_PSI}) "
               f"reaches the webhook within {DRIFT_ALERT_S:.0f} s, shows in `fleet "
               "metrics` and on the dashboard")
    started = time.monotonic()
    traffic = Traffic(demo, agents, data, inverted=(agents[0].device,))
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
    demo.run([tool("fleet"), "metrics", "--window", "120", *fleet])
    firing = api.get("/api/overview")["alerts_firing"]  # what the dashboard shows
    if not any((a["kind"], a["key"]) == ("drift", "digits") for a in firing):
        raise DemoError(f"the dashboard's overview does not show the alert: {firing}")
    print(f"    dashboard: {api.url}/dashboard (sign in with {demo.workdir / 'server'}/"
          "admin.token) shows the alert and gw-1's drift chart")

