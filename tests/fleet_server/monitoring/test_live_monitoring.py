"""Monitoring end to end on a real service (Mosquitto, SQLite and PostgreSQL): devices
publish telemetry in the contract's format over MQTT (a fake device: the device is outside
the server under test), and the drift alert reaches a real webhook, ``fleet metrics``,
``fleet device show``, the API and ``/metrics`` (checked by promtool when installed, else
by prometheus_client's parser)."""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet_server.api import ApiServer, load_admin_token
from fleet_server.cli import main
from fleet_server.monitoring.config import AlertRule, MonitoringConfig, Webhook
from fleet_server.service import FleetService, ServiceConfig
from protocol import messages
from tests.fleet_server.monitoring.receiver import Receiver, receiver
from tests.fleet_server.server_env import SimDevice, enroll, wait_until

pytestmark = pytest.mark.integration

#: The drift alert must reach the webhook within this many seconds of the drifting sample
#: (evaluation every 0.5 s here; the default is 15 s).
ALERT_WITHIN_S = 10.0
SCRAPE_TOKEN = "scrape-" + "x" * 32


def drifting_metrics(psi: float, *, requests: int = 40, errors: int = 0) -> dict[str, Any]:
    """A sample as an agent with the monitor sends it (MONITOR_CONTRACT.md)."""
    return {"interval_s": 30.0, "latency_buckets_ms": [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                                       25, 50, 100, 250, 1000],
            "models": {"digits": {
                "version": 1, "state": "serving", "requests": requests, "errors": errors,
                "p50_ms": 0.7, "p99_ms": 2.0,
                "latency_hist": [0, 0, 0, 0, requests - 4, 4, 0, 0, 0, 0, 0, 0, 0, 0],
                "monitor": {"version": 1, "sampled": requests,
                            "inputs": {"input": {"counts": [1] * 10, "psi": psi,
                                                 "ks": psi / 3}},
                            "outputs": {"logits": {"kind": "classes", "counts": [4] * 10,
                                                   "confidence_mean": 0.9,
                                                   "entropy_mean": 0.2, "psi": 0.01}},
                            "drift": {"psi": psi, "ks": psi / 3, "worst": "input:input"}}}}}


@pytest.fixture
def hook() -> Iterator[Receiver]:
    with receiver() as r:
        yield r


@pytest.fixture
def monitored(config: ServiceConfig, hook: Receiver, tmp_path: Path,
              ) -> Iterator[tuple[FleetService, ApiServer]]:
    monitoring = MonitoringConfig(
        evaluate_every_s=0.5, webhooks=(Webhook(hook.url, timeout_s=2, backoff_s=0.1),),
        rules=(AlertRule("drift", psi=0.25, devices=1, window_s=300),
               AlertRule("error_rate", rate=0.2, min_requests=20)))
    with FleetService(replace(config, monitoring=monitoring)) as service:
        token = load_admin_token(service.config.data_dir / "admin.token")
        with ApiServer(service, token, service.api_identity(),
                       scrape_token=SCRAPE_TOKEN) as api:
            yield service, api


def get(api: ApiServer, path: str, token: str) -> tuple[int, str, bytes]:
    host, port = api.url.removeprefix("https://").split(":")
    context = ssl.create_default_context(cafile=str(api.service.ca.cert_path))
    conn = http.client.HTTPSConnection(host, int(port), timeout=10, context=context)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def publish(device: SimDevice, seq: int, metrics: dict[str, Any], recorder: Any) -> None:
    recorder.publish(device.topic("telemetry"), messages.encode(
        messages.Telemetry(seq=seq, at=time.time(), metrics=metrics)))


def test_drift_alert_reaches_webhook_cli_api_and_prometheus(
        monitored: tuple[FleetService, ApiServer], hook: Receiver, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    service, api = monitored
    admin = load_admin_token(service.config.data_dir / "admin.token")
    steady = enroll(service, tmp_path, "gw-1")
    shifted = enroll(service, tmp_path, "gw-2")
    clients = {d.id: d.client() for d in (steady, shifted)}
    try:
        for seq in (1, 2):
            publish(steady, seq, drifting_metrics(0.02), clients["gw-1"])
            publish(shifted, seq, drifting_metrics(0.03), clients["gw-2"])
        # A hostile sample: stored, its unusable fields ignored, nothing breaks.
        publish(shifted, 3, {"models": {"digits": {"requests": "lots", "monitor": {
            "drift": {"psi": "NaN"}}, "latency_hist": [1] * 500}}}, clients["gw-2"])
        wait_until(lambda: sum(t.samples for t in service.monitor.totals(600, ())) == 5,
                   "the samples in the time series")
        time.sleep(1.5)  # a few evaluations: nothing fires on steady data
        assert hook.bodies == []

        started = time.monotonic()
        publish(shifted, 4, drifting_metrics(0.8), clients["gw-2"])
        (alert,) = hook.wait_for(1, timeout=ALERT_WITHIN_S)
        took = time.monotonic() - started
        assert took < ALERT_WITHIN_S
        assert (alert["status"], alert["kind"], alert["key"]) == ("firing", "drift", "digits")
        assert alert["detail"]["worst"] == [{"device": "gw-2", "psi": 0.8}]
        time.sleep(1.5)
        assert len(hook.bodies) == 1  # still firing: grouped, not sent again
        events = [e for e in service.registry.events() if e.kind == "alert.firing"]
        assert [e.detail["key"] for e in events] == ["digits"]

        # The API.
        status, _, body = get(api, "/api/metrics?by=device,model&window=600", admin)
        assert status == 200
        by_device = {t["device"]: t for t in json.loads(body)["totals"]}
        assert by_device["gw-2"]["drift"]["psi_max"] == 0.8
        assert by_device["gw-1"]["requests"] == 80
        assert by_device["gw-1"]["latency_ms"]["p50"] == pytest.approx(0.5 + 0.5 * 40 / 72,
                                                                       abs=1e-3)
        status, _, body = get(api, "/api/overview", admin)
        overview = json.loads(body)
        assert overview["groups"]["lab"]["devices"] == 2
        assert [a["key"] for a in overview["alerts_firing"]] == ["digits"]
        assert get(api, "/api/metrics?by=color", admin)[0] == 400
        assert get(api, "/api/metrics/series?step=61", admin)[0] == 400

        # Prometheus: the scrape token reads /metrics and nothing else.
        assert get(api, "/metrics", "wrong")[0] == 401
        assert get(api, "/api/devices", SCRAPE_TOKEN)[0] == 401
        status, content_type, text = get(api, "/metrics", SCRAPE_TOKEN)
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        psi = {tuple(s.labels.values()): s.value
               for s in families["edgefleet_model_drift_psi_max"].samples}
        assert psi == {("digits", "1"): 0.8}
        assert families["edgefleet_devices"].samples[0].value == 2
        # Enrolled, never reported: not converged.
        assert families["edgefleet_convergence_ratio"].samples[0].value == 0
        firing = {s.labels["kind"]: s.value for s in families["edgefleet_alerts_firing"].samples}
        assert firing == {"drift": 1, "error_rate": 0, "offline": 0, "rollout_halted": 0}
        assert families["edgefleet_rollouts"].samples == []  # no rollout yet
        promtool = shutil.which("promtool")
        if promtool is not None:
            check = subprocess.run([promtool, "check", "metrics"], input=text,
                                   capture_output=True, check=False)
            assert check.returncode == 0, check.stdout + check.stderr

        # The CLI.
        monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", admin)
        monkeypatch.setenv("EDGEFLEET_SERVER_CA", str(service.ca.cert_path))
        assert main(["metrics", "--server", api.url, "--group", "lab"]) == 0
        out = capsys.readouterr().out
        assert "DRIFT PSI" in out
        assert "0.800" in out
        assert "ALERT drift digits" in out
        assert main(["metrics", "--server", api.url, "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
        by_version = {t["version"]: t for t in answer["totals"]}
        assert by_version[1]["devices"] == 2
        assert by_version[0]["requests"] == 0  # the hostile sample: no version, no counts
        assert main(["device", "show", "gw-2", "--server", api.url]) == 0
        out = capsys.readouterr().out
        assert "digits v1: 120 requests" in out
        assert "drift PSI 0.800 (max)" in out
    finally:
        for client in clients.values():
            client.close()
