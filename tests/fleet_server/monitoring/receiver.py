"""A real HTTP webhook receiver for the alert tests: http.server on a free local port."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """Records every JSON body POSTed to it; answers ``fail_first`` requests with 500.

    While ``answering`` is clear, a request is counted in ``arrived`` and then held
    unanswered until it is set again."""

    def __init__(self, fail_first: int = 0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        self.arrived = 0
        self.fail_first = fail_first
        self.answering = threading.Event()
        self.answering.set()
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._changed:
                    receiver.arrived += 1
                    receiver._changed.notify_all()
                receiver.answering.wait()
                with receiver._changed:
                    receiver.attempts += 1
                    failing = receiver.attempts <= receiver.fail_first
                    if not failing:
                        receiver.bodies.append(json.loads(data))
                    receiver._changed.notify_all()
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def wait_arrived(self, count: int, timeout: float = 30.0) -> None:
        """Wait until ``count`` requests arrived (answered or held); AssertionError after
        ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.arrived >= count, timeout):
                raise AssertionError(f"{self.arrived} request(s) reached the webhook, not "
                                     f"{count}, within {timeout} s")

    def wait_for(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The bodies once there are at least ``count``; AssertionError after ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.bodies) >= count, timeout):
                raise AssertionError(f"the webhook got {len(self.bodies)} notice(s), not "
                                     f"{count}, within {timeout} s: {self.bodies}")
            return list(self.bodies)


@contextmanager
def receiver(fail_first: int = 0) -> Iterator[Receiver]:
    """A running receiver, shut down afterwards."""
    r = Receiver(fail_first)
    thread = threading.Thread(target=r._server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield r
    finally:
        r.answering.set()  # nothing held keeps shutdown waiting
        r._server.shutdown()
        r._server.server_close()
        thread.join()
