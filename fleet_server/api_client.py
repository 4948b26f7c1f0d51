"""A small client of the operator API, for the ``fleet`` commands that talk to a server.

:func:`locate` finds the server the way every such command does: ``--server URL`` (with the
admin token from ``$EDGEFLEET_ADMIN_TOKEN`` or the data directory's ``admin.token``), else
``DATA/server.json``, which ``fleet serve`` writes while it runs. Failures raise
:class:`~fleet_server.errors.ApiError` with the server's own message.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from .errors import ApiError

__all__ = ["ADMIN_TOKEN_ENV", "SERVER_CA_ENV", "SERVER_DIR_ENV", "ServerClient",
           "default_data_dir", "locate", "read_server_file"]

#: Where ``fleet serve`` keeps its data, and the other commands look for it.
SERVER_DIR_ENV = "EDGEFLEET_SERVER_DIR"
#: The admin token, for ``--server URL`` from another machine or account.
ADMIN_TOKEN_ENV = "EDGEFLEET_ADMIN_TOKEN"
#: The CA that issued the API's certificate (the fleet CA), for ``--server URL``.
SERVER_CA_ENV = "EDGEFLEET_SERVER_CA"
SERVER_FILE = "server.json"
ADMIN_TOKEN_FILE = "admin.token"


def default_data_dir() -> Path:
    """``$EDGEFLEET_SERVER_DIR``, else ``~/.local/share/edgefleet/server``."""
    env = os.environ.get(SERVER_DIR_ENV)
    return Path(env) if env else Path.home() / ".local" / "share" / "edgefleet" / "server"


@dataclass(frozen=True)
class ServerClient:
    """The API at ``url`` (``https://host:port``) with the admin ``token``; its certificate
    is checked against ``ca_file`` (None: the system's CAs)."""

    url: str
    token: str = field(repr=False)
    ca_file: Path | None = None
    timeout: float = 60.0

    def get(self, path: str, query: Mapping[str, Any] | None = None) -> Any:
        """GET ``path`` (query parameters whose value is None are left out)."""
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Any = None, *, data: bytes | None = None) -> Any:
        """POST a JSON ``body``, or raw ``data`` (application/octet-stream)."""
        return self.request("POST", path, body=body, data=data)

    def request(self, method: str, path: str, *, query: Mapping[str, Any] | None = None,
                body: Any = None, data: bytes | None = None) -> Any:
        """One request; the decoded JSON answer, or ApiError."""
        url = self.url.rstrip("/") + path
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urlencode(params)
        headers = {"Authorization": f"Bearer {self.token}"}
        if data is not None:
            headers["Content-Type"] = "application/octet-stream"
        elif body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            context = ssl.create_default_context(
                cafile=None if self.ca_file is None else str(self.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ApiError(f"cannot read the CA certificate {self.ca_file} ({exc}); point "
                           f"{SERVER_CA_ENV} or --data at the fleet server's") from None
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=context) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                message = _error_message(exc.read()) or exc.reason
            raise ApiError(f"the fleet server refused {method} {path}: {message}",
                           exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise ApiError(f"the fleet server at {self.url} is not the one the CA "
                               f"{self.ca_file or '(system)'} vouches for "
                               f"({reason.verify_message}); give --data DIR of that server, "
                               f"or {SERVER_CA_ENV} with its ca/ca.crt") from None
            raise ApiError(f"cannot reach the fleet server at {self.url} ({reason}); is "
                           "`fleet serve` running? (--server URL or --data DIR)") from None
        except ValueError:
            raise ApiError(f"the fleet server at {self.url} did not answer with JSON; check "
                           "that --server points at `fleet serve`") from None


def _error_message(raw: bytes) -> str | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return str(obj["error"]) if isinstance(obj, dict) and "error" in obj else None


def read_server_file(data_dir: Path) -> dict[str, Any]:
    """``DATA/server.json`` of a running ``fleet serve``; ApiError if there is none or its
    process has gone."""
    path = data_dir / SERVER_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        pid = int(info["pid"])
        str(info["api_url"])
    except FileNotFoundError:
        raise ApiError(f"no fleet server runs with data directory {data_dir} ({path} is "
                       "missing); start `fleet serve --data DIR`, or pass --data DIR or "
                       "--server URL") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ApiError(f"{path} is unreadable ({exc}); restart `fleet serve`") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ApiError(f"the fleet server recorded in {path} (pid {pid}) is not running; "
                       "start `fleet serve` again") from None
    except PermissionError:
        pass  # it runs, as another user
    return dict(info)


def locate(server: str | None, data_dir: Path | None) -> ServerClient:
    """The client for ``--server``/``--data`` (module docstring)."""
    directory = data_dir or default_data_dir()
    fleet_ca = directory / "ca" / "ca.crt"
    if server is not None:
        token = os.environ.get(ADMIN_TOKEN_ENV) or _read_token(directory / ADMIN_TOKEN_FILE)
        ca = os.environ.get(SERVER_CA_ENV)
        return ServerClient(server, token, Path(ca) if ca else
                            fleet_ca if fleet_ca.exists() else None)
    info = read_server_file(directory)
    token_file = Path(str(info.get("admin_token_file") or directory / ADMIN_TOKEN_FILE))
    return ServerClient(str(info["api_url"]), _read_token(token_file),
                        Path(str(info.get("ca_file") or fleet_ca)))


def _read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiError(f"cannot read the admin token {path} ({exc}); set "
                       f"{ADMIN_TOKEN_ENV}, or pass --data with the server's data "
                       "directory") from None
    if not token:
        raise ApiError(f"the admin token file {path} is empty; restart `fleet serve` to "
                       "make a new one")
    return token
