"""The web dashboard's files: plain HTML, JS and CSS shipped as package data (no build).

``fleet serve`` serves them at ``/dashboard`` without a token: they hold no fleet data.
Every figure the page shows comes from the operator API, which needs the operator token;
the page asks for it on its sign-in form (docs/monitoring.md, "Dashboard").
"""

from __future__ import annotations

from importlib import resources

__all__ = ["HEADERS", "asset"]

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
#: Sent with every file: no inline script or foreign origin may run in the page, it may not
#: be framed (clickjacking), and the token never leaves in a Referer.
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
           "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
           "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def asset(name: str) -> tuple[str, bytes] | None:
    """The content type and bytes of the dashboard file ``name`` (``index.html`` for
    the page itself), or None if there is no such file."""
    suffix = name[name.rfind("."):] if "." in name else ""
    if suffix not in _TYPES or "/" in name or "\\" in name or name.startswith("."):
        return None
    file = resources.files(__name__).joinpath(name)
    if not file.is_file():
        return None
    return _TYPES[suffix], file.read_bytes()
