#!/usr/bin/env bash
# Set up a virtual environment with every extra and run the whole test suite.
# Used by the README quick start and by .ci/run. Re-running reuses .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch is pinned to the CPU build that pip takes from the local disk.
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[all,dev]'
export QT_QPA_PLATFORM=offscreen
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
