"""Bundles over HTTP end to end: ``fleet serve --bundle-port`` with a mirror in front, and a
real ``edge-agent run``. A mirror that cuts the download is resumed where it broke; a
mirror sending wrong bytes is caught by the sha256 and the bundle comes from the server's
own endpoint; neither needs MQTT chunks."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.fleet_server.live_fleet import DIGITS, GROUP, converged, live_fleet

pytestmark = pytest.mark.integration


class HostileMirror:
    """Serves ``bundles`` by sha256: the first answer of each is cut at 40%, and bundles
    in ``corrupt`` come with every byte flipped."""

    def __init__(self) -> None:
        self.bundles: dict[str, bytes] = {}
        self.corrupt: set[str] = set()
        self.requests: list[tuple[str, int]] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                match = re.search(r"([0-9a-f]{64})\.efb$", self.path)
                data = mirror.bundles.get(match.group(1)) if match else None
                if match is None or data is None:
                    self.send_error(404)
                    return
                sha = match.group(1)
                ranged = re.fullmatch(r"bytes=(\d+)-\d*", self.headers.get("Range", ""))
                start = int(ranged.group(1)) if ranged else 0
                first = all(s != sha for s, _ in mirror.requests)
                mirror.requests.append((sha, start))
                if sha in mirror.corrupt:
                    data = bytes(b ^ 0xFF for b in data)
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if first:
                    self.wfile.write(data[:len(data) * 2 // 5])
                    self.close_connection = True  # cut mid-body
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def prefix(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror/"

    def add(self, bundle: Path) -> str:
        data = bundle.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        self.bundles[sha] = data
        return sha


@pytest.fixture
def mirror() -> Iterator[HostileMirror]:
    started = HostileMirror()
    yield started
    started.httpd.shutdown()
    started.httpd.server_close()


def test_bundles_come_over_http_resumed_and_checked(tmp_path: Path,
                                                    mirror: HostileMirror) -> None:
    with live_fleet(tmp_path, "--bundle-port", "0", "--bundle-mirror",
                    mirror.prefix) as fleet:
        state = fleet.state("gw-1")
        fleet.enroll("gw-1", fleet.token("--group", GROUP))
        fleet.run_agent("gw-1", state)
        v1 = fleet.build(1, DIGITS)
        sha1 = mirror.add(v1)
        fleet.fleet("publish", v1, "--group", GROUP, "--data", fleet.data)
        fleet.wait(converged(fleet, ["gw-1"], 1), "v1 from the mirror")
        cut = len(mirror.bundles[sha1]) * 2 // 5
        assert mirror.requests == [(sha1, 0), (sha1, cut)]  # resumed at the cut

        v2 = fleet.build(2, DIGITS)
        sha2 = mirror.add(v2)
        mirror.corrupt.add(sha2)
        fleet.fleet("publish", v2, "--group", GROUP, "--data", fleet.data)
        fleet.wait(converged(fleet, ["gw-1"], 2), "v2 from the server's endpoint")
        log = fleet.log("gw-1")
        assert f"bundle {sha2[:12]} arrived complete but hashes to" in log
        assert "over MQTT" not in log  # neither needed chunks
        events = fleet.api.get("/api/events?device=gw-1&limit=200")["events"]
        assert not [e for e in events if e["kind"] == "agent.fetch.failed"]
