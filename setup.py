"""edgefleet: edge ML inference runtime and fleet agent.

Three packages ship from this one distribution; each extra installs what one of them needs,
so a gateway can install the agent without the server's or the compressor's dependencies.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup

# Shared by every part: the bundle format and device profiles are pure Python on top of these.
# zstandard: weight-level deltas (bundle/delta/), made on the server, applied on devices.
_CORE = ["numpy>=1.26", "cryptography>=42", "tuf>=6,<8", "zstandard>=0.22",
         "tomli>=2; python_version < '3.11'"]
# ai-edge-litert is the maintained LiteRT runtime; tflite-runtime is only an import fallback
# (see docs/architecture.md, "TFLite runtime").
_RUNTIMES = ["onnxruntime>=1.20", "ai-edge-litert>=2.0"]

# What the agent needs besides a runtime. tomli-w: agent.toml is written with a TOML writer
# (edge-agent enroll); prometheus-client (pure Python, about 0.3 MB): the optional local
# /metrics endpoint ([monitor] prometheus).
_AGENT = [*_CORE, "paho-mqtt>=2.0", "psutil>=5.9", "tomli-w>=1.0", "prometheus-client>=0.20"]

EXTRAS = {
    # Both runtimes; a gateway that knows its fleet ships one format installs one of the two
    # below instead (installed size and RSS of each: docs/agent.md, docs/benchmarks.md).
    "agent": [*_AGENT, *_RUNTIMES],
    "agent-onnx": [*_AGENT, _RUNTIMES[0]],
    "agent-litert": [*_AGENT, _RUNTIMES[1]],
    # KServe v2 gRPC beside HTTP (api.grpc_port), added to one of the above: grpcio, and the
    # service's generated messages as tritonclient publishes them (agent/grpc_api.py).
    "agent-grpc": ["grpcio>=1.60", "tritonclient[grpc]>=2.40"],
    # sympy: onnxruntime's symbolic shape inference, run before quantization.
    "compressor": [*_CORE, *_RUNTIMES, "onnx>=1.17", "sympy>=1.12"],
    # psycopg and its pool: PostgreSQL for the registry (fleet serve --db postgresql://...);
    # SQLite is stdlib. Why not SQLAlchemy: docs/registry.md, "Database layer".
    # prometheus-client: the /metrics exposition (docs/monitoring.md).
    "server": [*_CORE, "paho-mqtt>=2.0", "psycopg[binary]>=3.1", "psycopg-pool>=3.2",
               "prometheus-client>=0.20"],
    # tritonclient: an existing Open Inference Protocol client, to prove the agent's API.
    # h11: only benchmarks/http_parse_bench.py, which measures it against the agent's parser.
    # jsonschema: tests/agent/test_openapi.py checks answers against the agent's OpenAPI document.
    # bsdiff4: only benchmarks/delta_bench.py, which measures it against edgefleet's deltas.
    # playwright: the dashboard's browser tests, driving the system's Chromium (install.sh).
    # pytest-xdist: the suite runs on every core (pyproject's addopts: -n auto).
    "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6", "mypy>=1.11", "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",
            "tritonclient[http,grpc]>=2.40", "h11>=0.14", "jsonschema>=4.18", "bsdiff4>=1.2",
            "playwright>=1.40"],
}
# TFLite artifacts in the compressor (compressor/passes/tflite.py): onnx2tf turns the ONNX model
# into a TensorFlow SavedModel, TensorFlow's converter makes the .tflite variants. Pinned
# together because onnx2tf follows TensorFlow's internals closely; tf-keras, onnx-graphsurgeon,
# sng4onnx and psutil are what onnx2tf imports without declaring them; onnxsim folds shape
# arithmetic (exported attention's) that onnx2tf cannot convert otherwise; tf2onnx translates a
# .tflite model given to edge-compress into ONNX. About 2 GB installed but about 40 s to
# install, so "all" (what CI installs) includes it (docs/compressor.md).
EXTRAS["tflite"] = [*EXTRAS["compressor"], "tensorflow==2.21.0", "tf-keras==2.21.0",
                    "onnx2tf==1.28.8", "onnx-graphsurgeon==0.6.1", "sng4onnx==2.0.1",
                    "onnxsim==0.8.1", "tf2onnx==1.17.0", "psutil>=5.9"]
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})
# Only for regenerating the committed reference models (scripts in models/); not part of "all"
# because torch is large and nothing at run or test time needs it.
EXTRAS["models"] = ["torch==2.13.0", "scikit-learn>=1.4", "onnx>=1.17", "onnxscript>=0.1"]

setup(
    name="edgefleet",
    version="0.1.0",
    description="Compress, sign, distribute and serve ML models on fleets of edge devices",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["agent*", "compressor*", "fleet_server*", "bundle*",
                                    "firmware_profiles*", "protocol*", "transport*",
                                    "common*", "stats*", "experiments*"]),
    package_data={"firmware_profiles": ["profiles/*.toml", "py.typed"],
                  # The web dashboard: plain files, no build step (docs/monitoring.md).
                  "fleet_server.monitoring.dashboard": ["*.html", "*.js", "*.css"]},
    install_requires=[],
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "edge-agent=agent.cli:main",
            "edge-compress=compressor.cli:main",
            "fleet=fleet_server.cli:main",
        ]
    },
)
