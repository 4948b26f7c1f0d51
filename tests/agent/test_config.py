"""The agent's config file: one definition (agent/config.py) for the loader
(agent/config_load.py), the writer and the docs (agent/config_write.py), tested together
because what one writes the other must read back."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import fields, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cli import main
from agent.config import (
    AgentConfig,
    ApiConfig,
    ApiLimits,
    FleetSettings,
    MonitorConfig,
)
from agent.config_load import load_config
from agent.config_write import config_reference, config_to_toml, write_config
from agent.errors import AgentError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
FLEET = FleetSettings("factory-7", "gw-0042", "mqtts://fleet.example:8883",
                      Path("/s/keys/ca.crt"), Path("/s/keys/device.crt"),
                      Path("/s/keys/device.key"), "http://fleet.example:8780", 5.0)


def _load(tmp_path: Path, text: str | bytes) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return load_config(path)


def _refused(tmp_path: Path, text: str | bytes) -> str:
    with pytest.raises(AgentError) as refused:
        _load(tmp_path, text)
    message = str(refused.value)
    assert message.startswith(str(tmp_path / "agent.toml"))
    return message.removeprefix(str(tmp_path / "agent.toml"))


def test_a_path_with_any_character_round_trips(tmp_path: Path) -> None:
    """Regression (issue 11): the writer used json.dumps, whose \\ud83d\\ude00 escape of a
    character outside the BMP is not TOML."""
    config = AgentConfig(tmp_path / "état 😀 \"quoted\" \\ back", "rpi5",
                         ApiConfig(unix_socket=tmp_path / "a\tb.sock"), FLEET)
    write_config(tmp_path / "agent.toml", config)
    assert load_config(tmp_path / "agent.toml") == config


@pytest.mark.parametrize(("text", "message"), [
    ('state_dir = "/s"\nstate_dri = "/t"\n',
     ", line 2: unknown key state_dri; did you mean state_dir?"),
    ('state_dir = "/s"\n\n[api]\nport = 1\nthreds = 2\n',
     ", line 5: unknown key api.threds; did you mean api.threads?"),
    ('state_dir = "/s"\n[api.limits]\nmax_batch = 2\nzzz = 1\n',
     ", line 4: unknown key api.limits.zzz; known keys in [api.limits]: max_connections,"),
    ('state_dir = "/s"\napi.limits.max_btch = 3\n',
     ", line 2: unknown key api.limits.max_btch; did you mean api.limits.max_batch?"),
    ('state_dir = "/s"\napi = {port = 1, "hots" = "x"}\n',
     ", line 2: unknown key api.hots; did you mean api.host?"),
    ('state_dir = "/s"\n[telemetry]\ninterval = 3\n',
     ", line 2: unknown key telemetry; known keys: state_dir, profile, api, fleet"),
])
def test_unknown_keys_are_refused_with_name_and_line(tmp_path: Path, text: str,
                                                     message: str) -> None:
    """Regression (issue 11): unknown keys were ignored, so a typo silently used a default."""
    assert message in _refused(tmp_path, text)


_FLEET_TABLE = ('[fleet]\nname = "f"\ndevice_id = "d"\nbroker_url = "mqtts://b"\n'
                'ca_file = "a"\ncert_file = "b"\nkey_file = "c"\n')


@pytest.mark.parametrize(("text", "message"), [
    ('state_dir = "/s"\n[api]\nport = 99999\n',
     ", line 3: api.port = 99999 is out of range; use 0 to 65535"),
    ('state_dir = "/s"\n[api]\nport = true\n', ", line 3: api.port must be an integer, not True"),
    ('state_dir = "/s"\n[api]\nport = 8470.0\n', ", line 3: api.port must be an integer"),
    ('state_dir = "/s"\n[api]\nprobation_s = -1\n', "api.probation_s = -1 is out of range"),
    ('state_dir = "/s"\n[api.limits]\nidle_timeout_s = nan\n',
     "api.limits.idle_timeout_s must be a number, not nan"),
    ('state_dir = "/s"\n[api.limits]\nmax_batch = 0\n',
     "api.limits.max_batch = 0 is out of range; use 1 to 1,048,576"),
    ('state_dir = ""\n', ", line 1: state_dir must be a non-empty string"),
    ('state_dir = 3\n', ", line 1: state_dir must be a non-empty string, not 3"),
    ('profile = "x"\n', ": missing key state_dir"),
    ('state_dir = "/s"\napi = 3\n', ", line 2: api must be a table [api], not 3"),
    ('state_dir = "/s"\n' + _FLEET_TABLE.replace('"mqtts://b"', '"http://x"'),
     ", line 5: fleet.broker_url: broker URL 'http://x' is not mqtts://host[:port]"),
    ('state_dir = "/s"\n' + _FLEET_TABLE.replace('"mqtts://b"', '"mqtts://b:99999"'),
     "fleet.broker_url: broker URL 'mqtts://b:99999' has an invalid port"),
    ('state_dir = "/s"\n' + _FLEET_TABLE.replace('"d"', '"gw/1"'),
     ", line 4: fleet.device_id: invalid device id 'gw/1'"),
    ('state_dir = "/s"\n' + _FLEET_TABLE + 'server_url = "ftp://x"\n',
     "fleet.server_url: 'ftp://x' is not an http:// or https:// URL"),
    ('state_dir = "/s"\n' + _FLEET_TABLE.replace('key_file = "c"\n', ""),
     ", line 2: missing key fleet.key_file (this device's private key"),
    ('state_dir = "/s"\n' + _FLEET_TABLE + "telemetry_interval_s = 0\n",
     "fleet.telemetry_interval_s = 0 is out of range; use 0.1 to 86400"),
    ('state_dir = "/s"\n[monitor]\nprometheus = "yes"\n',
     ", line 3: monitor.prometheus must be true or false, not 'yes'"),
    ('state_dir = "/s"\n[monitor]\nsample_rate = 1.5\n',
     "monitor.sample_rate = 1.5 is out of range; use 0 to 1"),
    ('state_dir = "/s"\n[api]\ncors_origins = "http://a"\n',
     ", line 3: api.cors_origins must be a list of strings, not 'http://a'"),
    ('state_dir = "/s"\n[api]\ncors_origins = [3]\n',
     "api.cors_origins must be a list, each a non-empty string, not [3]"),
    ('state_dir = "/s"\n[api]\ncors_origins = ["*"]\n',
     ", line 3: api.cors_origins: '*' is not a web origin"),
    ("state_dir = \n", ": not valid TOML (Invalid value (at line 1, column 13))"),
    (b'state_dir = "/s"\n# caf\xe9\n', ", line 2: not UTF-8 text (byte 0xe9)"),
])
def test_bad_values_are_refused_with_key_and_line(tmp_path: Path, text: str | bytes,
                                                  message: str) -> None:
    """Regression (issue 10, item 8): port = 99999, a non-UTF-8 file and an http:// broker
    were accepted here and crashed the agent later with a traceback."""
    assert message in _refused(tmp_path, text)


def test_fleet_paths_are_relative_to_the_state_dir(tmp_path: Path) -> None:
    config = _load(tmp_path, 'state_dir = "/var/s"\n' + _FLEET_TABLE.replace(
        'key_file = "c"', 'key_file = "/etc/k"'))
    assert config.fleet is not None
    assert (config.fleet.ca_file, config.fleet.cert_file, config.fleet.key_file) == (
        Path("/var/s/a"), Path("/var/s/b"), Path("/etc/k"))


def test_defaults_are_the_definitions(tmp_path: Path) -> None:
    config = _load(tmp_path, 'state_dir = "/s"\n')
    assert config == AgentConfig(Path("/s"))
    assert config.api.limits == ApiLimits()


def test_the_writer_leaves_limits_at_their_defaults_out(tmp_path: Path) -> None:
    config = AgentConfig(Path("/s"), api=ApiConfig(limits=ApiLimits(max_batch=8)))
    write_config(tmp_path / "agent.toml", config)
    written = tomllib.loads((tmp_path / "agent.toml").read_text())
    assert written["api"]["limits"] == {"max_batch": 8}
    assert "profile" not in written  # unset keys are left out: TOML has no null
    assert load_config(tmp_path / "agent.toml") == config
    everything = tomllib.loads(config_to_toml(config))
    assert set(everything["api"]["limits"]) == {f.name for f in fields(ApiLimits)}


_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
_paths = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]),
                 min_size=1, max_size=30).map(lambda text: Path("/" + text))


@given(state_dir=_paths, profile=st.none() | _names, socket=st.none() | _paths,
       port=st.integers(0, 65535), batch=st.integers(1, 1 << 20),
       probation=st.floats(0, 7 * 86400), with_fleet=st.booleans(), device=_names,
       ca_file=_paths, origins=st.lists(st.sampled_from(
           ["http://localhost:3000", "https://app.local", "http://[::1]:5173"]), max_size=3))
def test_any_valid_config_round_trips(*, state_dir: Path, profile: str | None,
                                      socket: Path | None, port: int, batch: int,
                                      probation: float, with_fleet: bool, device: str,
                                      ca_file: Path, origins: list[str]) -> None:
    config = AgentConfig(
        state_dir, profile,
        ApiConfig(port=port, unix_socket=socket, probation_s=probation,
                  cors_origins=tuple(origins), limits=ApiLimits(max_batch=batch)),
        replace(FLEET, device_id=device, ca_file=ca_file) if with_fleet else None)
    text = config_to_toml(config, all_limits=False)
    assert tomllib.loads(text)  # valid TOML, whatever the characters
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.toml"
        path.write_text(text, encoding="utf-8")
        assert load_config(path) == config


def test_every_key_has_a_meaning_and_the_committed_reference_is_current() -> None:
    reference = config_reference()
    for table in (AgentConfig, ApiConfig, ApiLimits, FleetSettings, MonitorConfig):
        for f in fields(table):
            assert f.metadata["meaning"], f.name
            assert f"`{f.name}`" in reference or f.name in ("api", "limits", "fleet", "monitor")
    committed = (ROOT / "docs" / "agent-config.md").read_text(encoding="utf-8")
    assert committed == reference, ("docs/agent-config.md is out of date: run "
                                    "`edge-agent config --doc > docs/agent-config.md`")


def test_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--doc"]) == 0
    assert capsys.readouterr().out == config_reference()
    path = tmp_path / "agent.toml"
    path.write_text('state_dir = "/s"\n[api.limits]\nmax_batch = 4\n')
    assert main(["config", "--config", str(path)]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    assert shown["api"]["port"] == 8470
    assert shown["api"]["limits"]["max_batch"] == 4
    assert shown["api"]["limits"]["max_connections"] == 64
