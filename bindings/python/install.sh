#!/usr/bin/env bash
# install.sh <build-dir> — build the sluice extension against <build-dir>/libsluice.a and
# install it into the venv <build-dir>/python-venv (created with Debian's /usr/bin/python3,
# --system-site-packages so that setuptools and wheel come from Debian; no network).
# What `make python` and the ctest fixture `python_install` run.
set -euo pipefail
BUILD=$(cd "${1:?usage: install.sh <build-dir>}" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${SLUICE_PYTHON:-/usr/bin/python3}
VENV=$BUILD/python-venv

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV" ||
        { echo "install.sh: '$PY -m venv' failed (make deps installs python3-venv)" >&2; exit 1; }
fi
SLUICE_BUILD_DIR=$BUILD PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    "$VENV/bin/python" -m pip install -q --no-build-isolation --no-index "$HERE"
# nothing generated may stay in the source tree (setup.py points setuptools at $BUILD)
rm -rf "$HERE/build" "$HERE"/*.egg-info
"$VENV/bin/python" -c 'import sluice; print("sluice", sluice.__version__, "installed in '"$VENV"'")'
