"""HTTP request handling cost: the agent's strict parser against h11, per request, one run.

The local API's target is an HTTP p50 within 0.3 ms of the in-process call (agent_bench.py
measures it end to end). This measures what choosing h11 instead of agent/http_parse.py
would add to every request: the server side of one keep-alive exchange, as the agent's own
client sends it (an infer with binary tensors) and as the server answers it, parsed and
framed by each, timed interleaved in rounds. Nothing else differs (no socket, no model).

Run::

    .venv/bin/python benchmarks/http_parse_bench.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from http import HTTPStatus
from importlib.metadata import version

import h11
import numpy as np

from agent.http_parse import parse_head, split_head
from agent.http_server import Response, _encode

_BODY = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,8,8],"parameters":' \
        b'{"binary_data_size":256}}],"parameters":{"binary_data_output":true}}' + bytes(256)
_REQUEST = (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: " + str(len(_BODY)).encode() + b"\r\n"
            b"Authorization: Bearer 0123456789abcdef0123456789abcdef0123456789a\r\n"
            b"Inference-Header-Content-Length: " + str(len(_BODY) - 256).encode() + b"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + _BODY)
_ANSWER = b'{"model_name":"digits","model_version":"1","outputs":[{"name":"logits",' \
          b'"datatype":"FP32","shape":[1,10],"parameters":{"binary_data_size":40}}]}' + bytes(40)
_RESPONSE_HEADERS = {"Inference-Header-Content-Length": str(len(_ANSWER) - 40)}


def ours() -> bytes:
    """The agent's server: find the head, parse it, take the body, frame the answer."""
    found = split_head(_REQUEST, 32 * 1024)
    assert found is not None
    head_bytes, rest = found
    head = parse_head(head_bytes, 100)
    body = rest[:head.length]
    assert len(body) == head.length
    return _encode(Response(HTTPStatus.OK, _ANSWER, "application/octet-stream",
                            _RESPONSE_HEADERS), "edgefleet-agent/0.1.0", close=False)


_H11 = h11.Connection(h11.SERVER, max_incomplete_event_size=32 * 1024)


def with_h11() -> bytes:
    """The same exchange through one kept-alive h11 connection."""
    connection = _H11
    connection.receive_data(_REQUEST)
    request = connection.next_event()
    assert isinstance(request, h11.Request)
    body = connection.next_event()
    assert isinstance(body, h11.Data)
    assert isinstance(connection.next_event(), h11.EndOfMessage)
    out = connection.send(h11.Response(status_code=200, headers=[
        ("Server", "edgefleet-agent/0.1.0"), ("Content-Type", "application/octet-stream"),
        ("Content-Length", str(len(_ANSWER))), *_RESPONSE_HEADERS.items()]))
    assert out is not None
    data = connection.send(h11.Data(data=_ANSWER))
    end = connection.send(h11.EndOfMessage())
    connection.start_next_cycle()
    return out + (data or b"") + (end or b"")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=5000)
    args = parser.parse_args()
    calls: dict[str, Callable[[], bytes]] = {"agent/http_parse.py": ours, "h11": with_h11}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up
        for _ in range(1000):
            call()
    for _ in range(args.rounds):
        for name, call in calls.items():
            for _ in range(args.iterations):
                start = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - start)
    print(f"server side of one infer exchange, {args.rounds} rounds x {args.iterations} "
          f"calls each, interleaved (h11 {version('h11')})")
    print(f"  {'parser':22} {'p50 us':>8} {'p99 us':>8}")
    p50s = {}
    for name, times in samples.items():
        p50, p99 = np.percentile(np.array(times) * 1e6, [50, 99])
        p50s[name] = p50
        print(f"  {name:22} {p50:8.2f} {p99:8.2f}")
    print(f"  h11 adds {p50s['h11'] - p50s['agent/http_parse.py']:.2f} us per request at p50 "
          f"({p50s['h11'] / p50s['agent/http_parse.py']:.1f}x)")


if __name__ == "__main__":
    main()
