"""The psutil adapter: reads the system into a :class:`~agent.metrics.SystemReading`.

The only telemetry module that imports psutil (lazily, so the agent starts without paying
for it until a fleet link samples). Whatever a platform cannot tell, or fails to tell, is
left out of the reading rather than raised: a sample is never lost for want of a sensor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .metrics import SystemReading

__all__ = ["SystemProbe"]

_T = TypeVar("_T")


def _read_system(process: Any, disk: Path | None) -> SystemReading:
    """Read the system with psutil; ``process`` is a ``psutil.Process`` kept between calls
    (CPU percentages are measured since its previous call), ``disk`` a path on the file
    system to report (None: none). Never raises."""
    import psutil

    def attempt(read: Callable[[], _T]) -> _T | None:
        try:
            return read()
        except (psutil.Error, OSError, AttributeError, NotImplementedError):
            return None

    load = attempt(psutil.getloadavg)
    memory = attempt(psutil.virtual_memory)
    rss = attempt(lambda: process.memory_info().rss)
    usage = None if disk is None else attempt(lambda: psutil.disk_usage(str(disk)))
    return SystemReading(
        cpu_percent=attempt(lambda: psutil.cpu_percent(interval=None)),
        process_cpu_percent=attempt(lambda: process.cpu_percent(interval=None)),
        rss_bytes=rss, memory_percent=None if memory is None else memory.percent,
        load_avg=None if load is None else (load[0], load[1], load[2]),
        temperatures_c=attempt(_temperatures),
        disk_free_bytes=None if usage is None else usage.free,
        disk_percent=None if usage is None else usage.percent)


class SystemProbe:
    """Reads this process and the system; CPU percentages count from the previous read
    (the first from construction). ``disk``: a path whose file system's free space is
    reported (the agent's state directory: where bundles and models must fit)."""

    def __init__(self, disk: Path | None = None) -> None:
        import psutil

        self._process = psutil.Process()
        self._disk = disk
        self.read()  # CPU percentages count from here

    def read(self) -> SystemReading:
        """The system now; never raises."""
        return _read_system(self._process, self._disk)


def _temperatures() -> dict[str, float]:
    import psutil

    sensors = getattr(psutil, "sensors_temperatures", None)  # absent on some platforms
    found: dict[str, float] = {}
    for chip, entries in (sensors() if sensors else {}).items():
        for number, entry in enumerate(entries):
            if entry.current is not None:
                found[f"{chip}/{entry.label or number}"] = float(entry.current)
    return found
