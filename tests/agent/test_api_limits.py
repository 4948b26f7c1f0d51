"""A real ``edge-agent serve`` process under pressure: out of file descriptors, a huge batch.

Regressions for issue 9: 1,100 idle connections against a 1,024 file limit killed the
accept thread for good, silently (item 7); one 64 MiB binary infer grew the agent from
108 MB to 3.6 GB (item 8).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.client import AgentClient
from tests.agent.bundles import DIGITS, PROFILE, samples

pytestmark = pytest.mark.integration

# Sets the file limit, then becomes `python -m agent ARGS...` (the limit survives exec).
_WITH_FILE_LIMIT = ("import os, resource, sys; limit = int(sys.argv[1]); "
                    "resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)); "
                    "os.execv(sys.executable, [sys.executable, '-m', 'agent', *sys.argv[2:]])")


@dataclass
class Served:
    process: subprocess.Popen[str]
    url: str
    token_file: Path
    stderr: Path

    def client(self) -> AgentClient:
        return AgentClient(self.url, token_file=self.token_file, timeout=20)

    def peak_rss(self) -> int:
        """The process's peak resident memory so far, in bytes (Linux VmHWM)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)
        assert match is not None
        return int(match.group(1)) * 1024


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(file_limit: int | None = None) -> Served:
        state = tmp_path / f"state{len(started)}"
        args = ["serve", "--model", str(DIGITS), "--name", "digits", "--state-dir", str(state),
                "--profile", PROFILE, "--port", "0"]
        command = ([sys.executable, "-c", _WITH_FILE_LIMIT, str(file_limit), *args]
                   if file_limit else [sys.executable, "-m", "agent", *args])
        stderr = tmp_path / f"stderr{len(started)}.txt"
        with stderr.open("w") as err:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
        assert process.stdout is not None
        with process.stdout:
            banner = process.stdout.readline()
        match = re.search(r"on (http://\S+); token in (\S+);", banner)
        assert match, f"{banner!r} {stderr.read_text()}"
        served = Served(process, match.group(1), Path(match.group(2)), stderr)
        started.append(served)
        return served

    yield start
    for served in started:
        served.process.terminate()
        served.process.wait(timeout=30)


def test_out_of_file_descriptors_the_api_keeps_answering(serve: Callable[..., Served]) -> None:
    agent = serve(file_limit=64)
    host, port = agent.url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(150)]
    try:
        with agent.client() as client:
            assert client.live()
            logits = client.infer("digits", {"input": samples(2)})["logits"]
            assert logits.shape == (2, 10)
    finally:
        for sock in idle:
            sock.close()
    with agent.client() as client:  # and after the flood, as before it
        assert client.status()["models"][0]["requests"] == 1
    assert agent.process.poll() is None
    assert "cannot accept a connection (Too many open files" in agent.stderr.read_text()


def test_a_huge_batch_is_refused_before_it_costs_memory(serve: Callable[..., Served]) -> None:
    agent = serve()
    with agent.client() as client:
        client.infer("digits", {"input": samples(1)})  # warm: the figure below is the batch's
    before = agent.peak_rss()
    batch = np.zeros((200_000, 1, 8, 8), np.float32)  # 51 MB: under the 64 MiB body limit
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                   "shape": list(batch.shape),
                                   "parameters": {"binary_data_size": batch.nbytes}}]}).encode()
    token = agent.token_file.read_text().strip()
    host, port = agent.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                     + f"Authorization: Bearer {token}\r\n"
                       f"Inference-Header-Content-Length: {len(head)}\r\n"
                       f"Content-Length: {len(head) + batch.nbytes}\r\n\r\n".encode()
                     + head + batch.tobytes())
        response = sock.recv(65536)
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    assert b"batch of 200000 is over this agent's limit of 64" in response
    grown = agent.peak_rss() - before
    # The body itself is read (once, into one buffer); nothing is computed on it.
    assert grown < batch.nbytes + 32 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB"
    with agent.client() as client:
        assert client.infer("digits", {"input": samples(1)})["logits"].shape == (1, 10)


def test_an_announced_body_costs_only_what_arrives(serve: Callable[..., Served]) -> None:
    """Four uploads each announcing 500 MB and sending 1 KB took the agent from 114 MB to
    2 GB: the body's buffer was allocated from the Content-Length alone."""
    agent = serve()
    with agent.client() as client:
        client.infer("digits", {"input": samples(1)})
    before = agent.peak_rss()
    token = agent.token_file.read_text().strip()
    host, port = agent.url.removeprefix("http://").split(":")
    announced = 500 * 2**20  # under max_bundle_bytes (512 MiB)
    held = []
    try:
        for _ in range(4):
            sock = socket.create_connection((host, int(port)), timeout=20)
            sock.sendall(b"POST /v2/edgefleet/install HTTP/1.1\r\nHost: x\r\n"
                         + f"Authorization: Bearer {token}\r\n"
                           f"Content-Length: {announced}\r\n\r\n".encode() + b"x" * 1024)
            held.append(sock)
        with agent.client() as client:  # the agent answers meanwhile
            assert client.infer("digits", {"input": samples(1)})["logits"].shape == (1, 10)
        grown = agent.peak_rss() - before
        assert grown < 64 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB"
    finally:
        for sock in held:
            sock.close()
