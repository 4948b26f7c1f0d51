"""A Python client for the agent's local API (Open Inference Protocol v2 + edgefleet's own).

Keeps one HTTP/1.1 connection open and sends tensors with the binary tensor extension, so a
call costs little more than the inference itself::

    with AgentClient("http://127.0.0.1:8470", token_file=Path(".../api-token")) as client:
        outputs = client.infer("digits", {"input": x})
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from protocol.defaults import AGENT_API_PORT

from .errors import AgentError
from .tensors import DATATYPE_OF, DTYPE_OF

__all__ = ["AgentClient", "ApiError"]

_BINARY_HEADER = "Inference-Header-Content-Length"


class ApiError(AgentError):
    """The agent answered with an error; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class _Transport:
    """One keep-alive HTTP/1.1 connection. Each request goes out in a single send: with
    http.client the head and the body leave in two, and the server's second wake-up costs
    more than a small model's inference."""

    def __init__(self, address: str | tuple[str, int], timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""

    def request(self, method: str, path: str, headers: Mapping[str, str],
                body: bytes) -> tuple[int, dict[str, str], bytes]:
        head = [f"{method} {path} HTTP/1.1", "Host: localhost",
                f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
        data = "\r\n".join(head).encode("latin-1") + b"\r\n\r\n"
        # With Expect: 100-continue the body goes only once the server agreed to read it,
        # so a refusal (too large, no token) arrives as an answer, not as a reset.
        expect = any(k.lower() == "expect" for k in headers)
        if not expect:
            data += body
        for attempt in (1, 2):
            fresh = self._sock is None
            try:
                sock = self._connect()
                sock.sendall(data)
                if expect:
                    status, answer_headers, answer = self._response()
                    if status != 100:
                        self.close()  # the body was never read: the connection is done
                        return status, answer_headers, answer
                    sock.sendall(body)
                return self._response()
            except (ConnectionError, _Closed):
                # A kept-alive connection the server closed meanwhile: retry on a new one.
                self.close()
                if fresh or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _connect(self) -> socket.socket:
        if self._sock is None:
            if isinstance(self.address, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(self.address)
            else:
                sock = socket.create_connection(self.address, timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        return self._sock

    def _response(self) -> tuple[int, dict[str, str], bytes]:
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            self._recv()
        head, self._buffer = self._buffer[:end].decode("latin-1"), self._buffer[end + 4:]
        status_line, *lines = head.split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self._buffer) < length:
            self._recv()
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(status_line.split(" ", 2)[1]), headers, body

    def _recv(self) -> None:
        assert self._sock is not None
        chunk = self._sock.recv(256 * 1024)
        if not chunk:
            raise _Closed
        self._buffer += chunk


class _Closed(Exception):
    """The server closed the connection."""


class AgentClient:
    """Talks to one agent at ``url`` (``http://host:port``) or over ``unix_socket``."""

    def __init__(self, url: str = f"http://127.0.0.1:{AGENT_API_PORT}", *, token: str | None = None,
                 token_file: Path | None = None, unix_socket: Path | None = None,
                 timeout: float = 30.0) -> None:
        if token is None and token_file is not None:
            try:
                token = token_file.read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise AgentError(f"cannot read the agent's API token from {token_file} "
                                 f"({exc}); run as the agent's user") from exc
        self._headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        if unix_socket is not None:
            self._transport = _Transport(str(unix_socket), timeout)
            self.where = str(unix_socket)
        else:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise AgentError(f"agent URL {url!r} must look like "
                                 f"http://127.0.0.1:{AGENT_API_PORT}")
            self._transport = _Transport((parts.hostname, parts.port or 80), timeout)
            self.where = url

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._transport.close()

    # -- Open Inference Protocol -----------------------------------------------------------

    def live(self) -> bool:
        """Whether the agent process answers."""
        return self._request("GET", "/v2/health/live", check=False)[0] == 200

    def ready(self) -> bool:
        """Whether the agent serves at least one model."""
        return self._request("GET", "/v2/health/ready", check=False)[0] == 200

    def server_metadata(self) -> dict[str, Any]:
        return self._json("GET", "/v2")

    def model_metadata(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/v2/models/{name}")

    def infer(self, name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run model ``name``; tensors travel as binary data both ways."""
        blobs, described = [], []
        for input_name, value in inputs.items():
            array = np.ascontiguousarray(value)
            blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            datatype = DATATYPE_OF.get(array.dtype.name)
            if datatype is None:
                raise AgentError(f"input {input_name}: dtype {array.dtype} has no Open "
                                 "Inference Protocol datatype")
            described.append({"name": input_name, "datatype": datatype,
                              "shape": list(array.shape),
                              "parameters": {"binary_data_size": len(blob)}})
            blobs.append(blob)
        head = json.dumps({"inputs": described,
                           "parameters": {"binary_data_output": True}}).encode()
        _, headers, body = self._request(
            "POST", f"/v2/models/{name}/infer", head + b"".join(blobs),
            {_BINARY_HEADER: str(len(head)), "Content-Type": "application/octet-stream"})
        json_length = int(headers.get(_BINARY_HEADER.lower(), len(body)))
        response = json.loads(body[:json_length])
        outputs, offset = {}, json_length
        for out in response["outputs"]:
            dtype = np.dtype(DTYPE_OF[out["datatype"]])
            size = out.get("parameters", {}).get("binary_data_size")
            if size is None:
                outputs[out["name"]] = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
                continue
            outputs[out["name"]] = np.frombuffer(
                body, dtype=dtype.newbyteorder("<"), count=size // dtype.itemsize,
                offset=offset).astype(dtype).reshape(out["shape"])
            offset += size
        return outputs

    # -- edgefleet extension ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Models, their request figures, recent installs."""
        return self._json("GET", "/v2/edgefleet/status")

    def install(self, bundle: Path) -> dict[str, Any]:
        """Send a bundle file to the running agent to install; the install record."""
        try:
            data = bundle.read_bytes()
        except OSError as exc:
            raise AgentError(f"cannot read bundle {bundle} ({exc.strerror})") from exc
        status, _, body = self._request("POST", "/v2/edgefleet/install", data,
                                        {"Content-Type": "application/octet-stream",
                                         "Expect": "100-continue"}, check=False)
        record: dict[str, Any] = json.loads(body)
        if status not in (200, 422):
            raise ApiError(status, record.get("error", body.decode(errors="replace")))
        return record

    # -- plumbing ----------------------------------------------------------------------------

    def _json(self, method: str, path: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._request(method, path)[2])
        return result

    def _request(self, method: str, path: str, body: bytes = b"",
                 headers: Mapping[str, str] | None = None, *, check: bool = True,
                 ) -> tuple[int, dict[str, str], bytes]:
        try:
            status, response_headers, data = self._transport.request(
                method, path, {**self._headers, **(headers or {})}, body)
        except (OSError, _Closed) as exc:
            self._transport.close()
            reason = str(exc) or "the connection was closed"
            raise AgentError(f"cannot reach the agent at {self.where} ({reason}); is "
                             "`edge-agent serve` running?") from exc
        if check and status >= 400:
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = data.decode(errors="replace")
            raise ApiError(status, message)
        return status, response_headers, data
