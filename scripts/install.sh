#!/usr/bin/env bash
# Installs edgefleet from scratch into ./.venv: the Mosquitto broker (Debian package) if its
# binary is missing, then the project with every extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages whose binary is missing: mosquitto (the embedded broker), chromium (the
# dashboard's browser tests, driven by Playwright), prometheus (promtool checks /metrics),
# nginx (the static bundle mirror of the scale benchmark's --mirror nginx and its test).
MISSING=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || MISSING+=(mosquitto)
command -v chromium >/dev/null 2>&1 || MISSING+=(chromium)
command -v promtool >/dev/null 2>&1 || MISSING+=(prometheus)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || MISSING+=(nginx-light)
if [ "${#MISSING[@]}" -gt 0 ]; then
    echo "== installing ${MISSING[*]} (apt-get)"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${MISSING[@]}"
    # The packages enable system-wide services (a broker, a Prometheus, a web server);
    # edgefleet's tests start their own instances and only use promtool.
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
echo "== installing edgefleet[all] into .venv"
# The venv's own pip (ensurepip's) installs the project editable as it is; upgrading pip
# first cost every CI run a download and a reinstall.
.venv/bin/python -m pip install --quiet -e '.[all]'
echo "== installed: $(.venv/bin/edge-agent --version), $(.venv/bin/edge-compress --version), $(.venv/bin/fleet --version)"
