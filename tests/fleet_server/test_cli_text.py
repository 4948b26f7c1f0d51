"""What the fleet commands print for the operator API's answers (pure)."""

from __future__ import annotations

from fleet_server.cli_text import reported_text


def test_an_install_without_a_version_reads_without_one() -> None:
    """Issue 10 item 9: `fleet devices` printed 'vNone downloading 47%'."""
    reported = {"models": {"digits": {"version": 1, "state": "committed"}},
                "installs": {"digits": {"version": None, "state": "downloading",
                                        "progress": 0.47}}}
    assert reported_text(reported) == "digits v1 committed [downloading 47%]"
