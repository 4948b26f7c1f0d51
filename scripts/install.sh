#!/usr/bin/env bash
# Installs edgefleet from scratch into ./.venv: the Mosquitto broker (Debian package) if its
# binary is missing, then the project with every extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "== installing mosquitto (apt-get)"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto
    # The package enables a system-wide broker; edgefleet starts its own instances.
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
echo "== installing edgefleet[all] into .venv"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[all]'
echo "== installed: $(.venv/bin/edge-agent --version), $(.venv/bin/edge-compress --version), $(.venv/bin/fleet --version)"
