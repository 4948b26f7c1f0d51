"""Delivering alert notices to webhooks: JSON POSTs with bounded time, retries, back-off.

One thread and one bounded queue per webhook, so a slow or dead receiver delays only its
own notices, and :meth:`Notifier.send` never waits (whoever raises an alert, the ingest
path included, is never held up by a webhook). A notice still undelivered after its
retries, or pushed out of a full queue, is logged and counted (``failed``, ``dropped``);
the event log has every alert regardless.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from fleet_server import __version__

from .alerts import Notice
from .config import Webhook

__all__ = ["QUEUE", "Notifier"]

log = logging.getLogger(__name__)

#: Notices waiting per webhook, at most; the oldest is dropped beyond.
QUEUE = 1000
#: The longest wait between two attempts.
_MAX_BACKOFF_S = 60.0
#: How long stopping waits for a webhook POST under way.
_STOP_WAIT_S = 2.0


class Notifier:
    """Sends notices to every configured webhook from background threads."""

    def __init__(self, webhooks: tuple[Webhook, ...], *,
                 sleep: Callable[[float], bool] | None = None) -> None:
        self._stop = threading.Event()
        # Waiting between retries ends early when the notifier stops.
        self._sleep = sleep or self._stop.wait
        self._queues = [(hook, queue.Queue[Notice | None](QUEUE)) for hook in webhooks]
        self._threads: list[threading.Thread] = []
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start one delivery thread per webhook."""
        for i, (hook, inbox) in enumerate(self._queues):
            thread = threading.Thread(target=self._loop, args=(hook, inbox),
                                      name=f"fleet-webhook-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop: retries are cut short, and a POST under way is waited for at most
        :data:`_STOP_WAIT_S` (its thread is a daemon: a webhook that never answers must not
        hold the server's shutdown). Idempotent."""
        self._stop.set()
        for _, inbox in self._queues:
            self._put(inbox, None)
        deadline = time.monotonic() + _STOP_WAIT_S
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s is still waiting on its webhook; not waited for",
                            thread.name)
        self._threads = []

    def send(self, notice: Notice) -> None:
        """Queue ``notice`` for every webhook; never blocks."""
        for _, inbox in self._queues:
            self._put(inbox, notice)

    def _put(self, inbox: queue.Queue[Notice | None], item: Notice | None) -> None:
        while True:
            try:
                inbox.put_nowait(item)
                return
            except queue.Full:
                try:
                    inbox.get_nowait()
                except queue.Empty:
                    continue
                with self._lock:
                    self.dropped += 1
                log.warning("webhook queue full: dropped the oldest alert notice")

    def _loop(self, hook: Webhook, inbox: queue.Queue[Notice | None]) -> None:
        while not self._stop.is_set():
            notice = inbox.get()
            if notice is None:
                return
            ok = self._deliver(hook, notice)
            with self._lock:
                if ok:
                    self.delivered += 1
                else:
                    self.failed += 1

    def _deliver(self, hook: Webhook, notice: Notice) -> bool:
        body = json.dumps(notice.to_json(), sort_keys=True).encode("utf-8")
        headers = {"Content-Type": "application/json",
                   "User-Agent": f"edgefleet/{__version__}", **hook.headers}
        delay = hook.backoff_s
        for attempt in range(hook.retries + 1):
            request = urllib.request.Request(hook.url, data=body, method="POST",
                                             headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=hook.timeout_s) as response:
                    response.read(1024)
                log.info("alert %s %s/%s delivered to %s", notice.alert.state,
                         notice.alert.kind, notice.alert.key, hook.url)
                return True
            except urllib.error.HTTPError as exc:
                why = f"HTTP {exc.code}"
                exc.close()
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    log.warning("webhook %s refused alert %s/%s (%s); not retried",
                                hook.url, notice.alert.kind, notice.alert.key, why)
                    return False
            except (urllib.error.URLError, OSError, ValueError) as exc:
                why = str(getattr(exc, "reason", exc))
            if attempt < hook.retries:
                log.debug("webhook %s: attempt %d failed (%s); retrying in %.1f s", hook.url,
                          attempt + 1, why, delay)
                if self._sleep(delay):
                    break  # stopping
                delay = min(delay * 2, _MAX_BACKOFF_S)
        log.warning("could not deliver alert %s/%s to %s after %d attempt(s) (%s); it is in "
                    "the event log", notice.alert.kind, notice.alert.key, hook.url,
                    attempt + 1, why)
        return False
