"""The web dashboard in a real browser (Playwright, headless Chromium from the system's
``chromium`` package: scripts/install.sh installs it) against a real service: sign-in with
the operator token (nothing shown before), the overview, a device's charts, alerts and
events, live updates without a reload, sign-out. Screenshots of each page go to
``$EDGEFLEET_SCREENSHOTS`` when set (docs/img is made that way), else to tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fleet_server.api import ApiServer, load_admin_token
from fleet_server.monitoring.config import AlertRule, MonitoringConfig
from fleet_server.service import FleetService, ServiceConfig
from protocol import messages
from tests.bundle.repo import Repo, spec
from tests.fleet_server.monitoring.test_live_monitoring import drifting_metrics
from tests.fleet_server.server_env import enroll, service_config, wait_until, write_keys

pytestmark = pytest.mark.integration

playwright = pytest.importorskip("playwright.sync_api", reason="pip install 'edgefleet[dev]'")


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("the dashboard tests need Chromium: run scripts/install.sh (it installs "
                    "Debian's chromium package)")
    return path


@pytest.fixture
def fleet(tmp_path: Path, repo: Any) -> Iterator[tuple[FleetService, ApiServer, str]]:
    config: ServiceConfig = service_config(tmp_path / "server",
                                           write_keys(tmp_path / "keys", repo),
                                           f"sqlite:///{tmp_path / 'fleet.db'}")
    monitoring = MonitoringConfig(evaluate_every_s=0.5, rules=(
        AlertRule("drift", psi=0.25, window_s=900), AlertRule("rollout_halted")))
    with FleetService(replace(config, monitoring=monitoring)) as service:
        token = load_admin_token(service.config.data_dir / "admin.token")
        with ApiServer(service, token, service.api_identity()) as api:
            yield service, api, token


def populate(service: FleetService, tmp_path: Path) -> dict[str, Any]:
    """Two devices that report v1 of digits, 15 minutes of telemetry and an install."""
    devices, clients = {}, {}
    for name in ("gw-1", "gw-2"):
        device = enroll(service, tmp_path, name)
        client = device.client()
        devices[name], clients[name] = device, client
        client.publish(device.topic("reported"), messages.encode(messages.Reported(
            profile="x86_64-avx2", agent_version="0.1.0",
            models={"digits": messages.ModelReport(1, None, "committed")}, at=time.time())))
        client.publish(device.topic("events"), messages.encode(messages.Event(
            "install.committed", time.time() - 900, {"model": "digits", "version": 1},
            seq=100)))
        now = time.time()
        for k in range(15):
            metrics = drifting_metrics(0.02 + 0.01 * (k % 3), requests=40 + 3 * k,
                                       errors=k % 4)
            client.publish(device.topic("telemetry"), messages.encode(
                messages.Telemetry(seq=k + 1, at=now - (15 - k) * 60, metrics=metrics)))
    wait_until(lambda: sum(t.samples for t in service.monitor.totals(3600, ())) == 30,
               "the samples in the time series")
    return {"devices": devices, "clients": clients}


def test_dashboard_pages_live_and_behind_the_token(
        fleet: tuple[FleetService, ApiServer, str], tmp_path: Path, repo: Repo) -> None:
    service, api, token = fleet
    shots = Path(os.environ.get("EDGEFLEET_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    sim = populate(service, tmp_path)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True)
        try:
            # The server's certificate is from the fleet CA, which this browser does not
            # know; the test checks the page, not TLS (tests/fleet_server/test_api.py does).
            context = browser.new_context(ignore_https_errors=True,
                                          viewport={"width": 1280, "height": 900})
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            page.goto(api.url + "/dashboard")
            page.wait_for_selector("#login:not([hidden])")
            assert page.inner_text("#page") == ""  # nothing of the fleet before sign-in
            page.screenshot(path=str(shots / "dashboard-login.png"))
            page.fill("#token", "not-the-token")
            page.click("button[type=submit]")
            page.wait_for_selector("#login-error:has-text('refused')")

            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_selector("h1:has-text('Fleet')")
            page.wait_for_selector("td:has-text('gw-2')")
            assert "v1\u00d72" in page.inner_text("#page")  # both run digits v1
            assert page.locator("[data-alert]").count() == 0
            page.screenshot(path=str(shots / "dashboard-overview.png"), full_page=True)

            # Live: a drifting sample turns into an alert on the open page, no reload.
            gw2 = sim["devices"]["gw-2"]
            sim["clients"]["gw-2"].publish(gw2.topic("telemetry"), messages.encode(
                messages.Telemetry(seq=50, at=time.time(), metrics=drifting_metrics(0.9))))
            page.wait_for_selector("[data-alert='drift/digits']", timeout=20_000)
            assert "gw-2 (PSI 0.90)" in page.inner_text("[data-alert='drift/digits']")

            page.click("a:has-text('gw-2')")
            page.wait_for_selector("h1:has-text('Device gw-2')")
            page.wait_for_selector("[data-chart='Drift'] polyline")
            for title in ("Latency (ms)", "Requests and errors per minute", "Drift"):
                points = page.get_attribute(f"[data-chart='{title}'] polyline", "points")
                assert len((points or "").split()) >= 10, title
            assert "install.committed" in page.inner_text("#page")
            page.screenshot(path=str(shots / "dashboard-device.png"), full_page=True)

            page.click("nav a:has-text('Alerts')")
            page.wait_for_selector("td:has-text('input drift on model digits')")
            page.screenshot(path=str(shots / "dashboard-alerts.png"), full_page=True)
            page.click("nav a:has-text('Events')")
            page.wait_for_selector("td:has-text('alert.firing')")
            page.screenshot(path=str(shots / "dashboard-events.png"), full_page=True)

            # A rollout started through the API, as `fleet rollout start` does: its steps
            # and gates on the Rollouts page, its start (and the upload) in the audit log.
            auth = {"Authorization": f"Bearer {token}"}
            stored = page.request.post(api.url + "/api/bundles", headers=auth,
                                       data=repo.build(spec(version=2)))
            assert stored.status == 201, stored.text()
            started = page.request.post(
                api.url + "/api/rollouts", headers={**auth, "Content-Type": "application/json"},
                data=json.dumps({"bundle_sha256": stored.json()["sha256"], "group": "lab",
                                 "bake_s": 600}))
            assert started.status == 201, started.text()
            rollout = started.json()["id"]
            page.click("nav a:has-text('Rollouts')")
            page.wait_for_selector(f"[data-rollout='{rollout}'] td:has-text('error_rate')")
            assert "running" in page.inner_text(f"[data-rollout='{rollout}'] h2")
            page.screenshot(path=str(shots / "dashboard-rollouts.png"), full_page=True)
            paused = page.request.post(
                api.url + f"/api/rollouts/{rollout}/pause",
                headers={**auth, "Content-Type": "application/json"},
                data=json.dumps({"reason": "dashboard test"}))
            assert paused.status == 200, paused.text()
            page.wait_for_selector(f"[data-rollout='{rollout}'] span:has-text('paused')")
            page.click("nav a:has-text('Audit')")
            page.wait_for_selector("td:has-text('bundle.upload')")
            page.wait_for_selector("td:has-text('dashboard test')")
            head = page.request.get(api.url + "/api/audit?limit=1", headers=auth).json()
            page.wait_for_selector(f"[data-audit-head='{head['head']['hash']}']")
            page.screenshot(path=str(shots / "dashboard-audit.png"), full_page=True)

            page.click("#logout")
            page.wait_for_selector("#login:not([hidden])")
            assert page.inner_text("#page") == ""
            assert errors == []
            # The files carry headers that keep other origins' scripts and frames out.
            response = page.request.get(api.url + "/dashboard")
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
            assert page.request.get(api.url + "/dashboard/..%2Fapi.py").status == 404
            # With the slash a bookmark or a proxy adds: the same page.
            slashed = page.request.get(api.url + "/dashboard/")
            assert (slashed.status, slashed.body()) == (200, response.body())
            assert page.request.get(api.url + "/api/overview").status == 401
        finally:
            browser.close()
            for client in sim["clients"].values():
                client.close()
