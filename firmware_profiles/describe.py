"""Human- and machine-readable views of profiles, hosts and matches, for the command lines."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .host import HostCapabilities
from .matching import ProfileMatch

__all__ = ["host_summary", "host_to_json", "match_to_json", "matches_table"]


def matches_table(matches: list[ProfileMatch]) -> str:
    """One row per profile, in ``matches`` order; ``*`` marks the best fit for the host."""
    rows = [("", "PROFILE", "ARCH", "ACCELERATORS", "FORMATS", "DTYPES", "MODEL MB", "FITS")]
    best = matches[0].profile.name if matches and matches[0].fits else None
    for match in matches:
        profile = match.profile
        rows.append((
            "*" if profile.name == best else "",
            profile.name,
            profile.cpu.arch,
            ",".join(f"{a.name}" for a in profile.accelerators) or "-",
            ",".join(profile.formats),
            ",".join(profile.dtypes),
            str(profile.model_budget_mb),
            "yes" if match.fits else "no: " + match.reasons[0],
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def host_summary(host: HostCapabilities) -> str:
    """A few lines describing what probing found on this host."""
    return "\n".join([
        f"arch:        {host.arch}",
        f"ISA:         {' '.join(sorted(host.features)) or '(unknown)'}",
        f"memory:      {host.memory_mb} MB",
        f"onnxruntime: {', '.join(host.onnxruntime_providers) or 'not installed'}",
        *(f"  {provider}: devices {', '.join(found) or 'none'}"
          for provider, found in host.devices.items()),
        f"LiteRT:      {host.litert_runtime or 'not installed'}"
        + (f" (delegates: {', '.join(host.litert_delegates)})" if host.litert_runtime else ""),
    ])


def match_to_json(match: ProfileMatch) -> dict[str, Any]:
    """A JSON-ready view of one match."""
    return {"profile": match.profile.name, "fits": match.fits, "score": match.score,
            "reasons": list(match.reasons),
            "available_accelerators": list(match.available_accelerators),
            "description": match.profile.description, "arch": match.profile.cpu.arch,
            "formats": list(match.profile.formats), "dtypes": list(match.profile.dtypes),
            "model_budget_mb": match.profile.model_budget_mb}


def host_to_json(host: HostCapabilities) -> dict[str, Any]:
    """A JSON-ready view of the probed host."""
    data = asdict(host)
    data["features"] = sorted(host.features)
    data["devices"] = {provider: list(found) for provider, found in host.devices.items()}
    return data
