"""The [monitoring] table: defaults, bounds, unknown keys refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_server.cli import main
from fleet_server.errors import MonitoringError
from fleet_server.monitoring.config import (
    MonitoringConfig,
    load_config,
    parse_config,
    scrape_token,
)


def test_full_config(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text("""
[monitoring]
evaluate_every_s = 5
scrape_token_file = "scrape.token"

[[monitoring.webhook]]
url = "http://127.0.0.1:9/hook"
retries = 2
headers = { Authorization = "Bearer x" }

[[monitoring.alert]]
kind = "drift"
psi = 0.3
devices = 2
model = "digits"

[[monitoring.alert]]
kind = "offline"
after_s = 120
""")
    config = load_config(path)
    assert config.evaluate_every_s == 5
    assert config.scrape_token_file == tmp_path / "scrape.token"
    assert config.webhooks[0].retries == 2
    assert config.webhooks[0].headers == {"Authorization": "Bearer x"}
    assert next((r.kind, r.psi, r.devices, r.model) for r in config.rules) == (
        "drift", 0.3, 2, "digits")
    assert config.rules[1].after_s == 120


def test_defaults_have_every_rule() -> None:
    assert {r.kind for r in parse_config({}).rules} == {
        "drift", "error_rate", "offline", "rollout_halted"}
    assert parse_config({}) == MonitoringConfig()


@pytest.mark.parametrize(("table", "message"), [
    ({"evaluate_every": 1}, "unknown key.*evaluate_every"),
    ({"evaluate_every_s": 0}, "outside"),
    ({"alert": [{"kind": "temperature"}]}, "kind must be one of"),
    ({"alert": [{"kind": "drift", "psi": "high"}]}, "psi must be a number"),
    ({"alert": [{"kind": "drift", "devices": 1.5}]}, "devices must be a number"),
    # A key of another kind of rule would be ignored, the rule left at its default.
    ({"alert": [{"kind": "error_rate", "psi": 0.3}]}, r"\(kind error_rate\).*psi"),
    ({"alert": [{"kind": "offline", "after_s": 600, "model": "digits"}]}, "model"),
    ({"alert": [{"kind": "rollout_halted", "window_s": 60}]}, "window_s"),
    ({"webhook": [{"url": "file:///etc/passwd"}]}, "http:// or https://"),
    ({"webhook": {"url": "http://x"}}, "array of tables"),
    ({"webhook": [{"url": "http://x", "timeout_s": 1e9}]}, "outside"),
])
def test_bad_config_names_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(MonitoringError, match=message):
        parse_config(table)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(MonitoringError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[monitoring\n")
    with pytest.raises(MonitoringError, match="not valid TOML"):
        load_config(bad)


def test_a_misspelt_table_is_refused_not_ignored(tmp_path: Path) -> None:
    typo = tmp_path / "server.toml"
    typo.write_text("[monitorin]\nevaluate_every_s = 1\n")
    with pytest.raises(MonitoringError, match=r"unknown key.*monitorin"):
        load_config(typo)


def test_scrape_token(tmp_path: Path) -> None:
    assert scrape_token(MonitoringConfig()) is None
    path = tmp_path / "scrape.token"
    path.write_text("short\n")
    with pytest.raises(MonitoringError, match="at least 16"):
        scrape_token(MonitoringConfig(scrape_token_file=path))
    path.write_text("s" * 32 + "\n")
    assert scrape_token(MonitoringConfig(scrape_token_file=path)) == "s" * 32
    with pytest.raises(MonitoringError, match="cannot read the scrape token"):
        scrape_token(MonitoringConfig(scrape_token_file=tmp_path / "missing"))


def test_fleet_serve_refuses_a_bad_config_at_once(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "server.toml"
    bad.write_text("[monitoring]\n[[monitoring.alert]]\nkind = \"temperature\"\n")
    assert main(["serve", "--data", str(tmp_path / "srv"), "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "alert 1: kind must be one of drift, error_rate, offline, rollout_halted" in err
    assert not (tmp_path / "srv" / "server.json").exists()
