"""docs/apps.md cannot drift: its curl, Python and JavaScript examples are taken from the
document and run, as they stand, against a real agent (over TCP and its Unix socket, with
its token), each checked for the text its ``<!-- test: expects "..." -->`` comment names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agent.bundles import DIGITS, PROFILE

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "apps.md"
_RUNNERS = {"sh": ["bash", "-euo", "pipefail", "-c"], "python": [sys.executable, "-c"],
            "js": ["node", "-e"]}
_BLOCK = re.compile(r"(?:<!-- test: expects (?P<expects>\".*?\") -->\n)?"
                    r"```(?P<lang>\w*)\n(?P<code>.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Example:
    lang: str
    code: str
    expects: str
    line: int

    def __str__(self) -> str:
        return f"apps.md:{self.line}:{self.lang}"


def _examples() -> list[Example]:
    text = DOC.read_text()
    found = []
    for match in _BLOCK.finditer(text):
        if match["lang"] not in _RUNNERS:
            continue
        line = text.count("\n", 0, match.start("code"))
        assert match["expects"], f"apps.md line {line}: a runnable example needs a " \
                                 "'<!-- test: expects \"...\" -->' comment above it"
        found.append(Example(match["lang"], match["code"], json.loads(match["expects"]),
                             line))
    return found


EXAMPLES = _examples()


def test_every_language_that_can_run_here_is_run() -> None:
    assert {e.lang for e in EXAMPLES} == set(_RUNNERS)
    # TCP and the Unix socket for each
    for lang in _RUNNERS:
        codes = [e.code for e in EXAMPLES if e.lang == lang]
        assert any("AGENT_SOCKET" in c for c in codes), lang
        assert any("AGENT_URL" in c for c in codes), lang


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("apps")
    socket_path = tmp / "agent.sock"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "edge-agent"), "serve", "--model", str(DIGITS),
         "--name", "digits", "--state-dir", str(tmp / "state"), "--port", "0",
         "--unix-socket", str(socket_path), "--profile", PROFILE],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    url = re.search(r"http://[0-9.]+:[0-9]+", line)
    assert url is not None, line
    yield {**os.environ, "AGENT_URL": url.group(0), "AGENT_SOCKET": str(socket_path),
           "AGENT_TOKEN_FILE": str(tmp / "state" / "api-token")}
    process.terminate()
    process.wait(timeout=30)
    process.stdout.close()


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_the_example_runs(example: Example, agent: dict[str, str]) -> None:
    runner = _RUNNERS[example.lang]
    if shutil.which(runner[0]) is None and not Path(runner[0]).exists():
        pytest.fail(f"{runner[0]} is not installed; the {example.lang} examples need it")
    result = subprocess.run([*runner, example.code], env=agent, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert example.expects in result.stdout, result.stdout
