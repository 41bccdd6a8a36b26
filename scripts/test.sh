#!/usr/bin/env bash
# Set up a virtual environment with every extra and run the whole test suite.
# Used by the README quick start and by .ci/run. Re-running reuses .venv.
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast lane (the tests
# marked slow left out: ~3 min on 2 cores instead of ~10); `-h` prints this and pytest's help.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
    echo
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch is pinned to the CPU build that pip takes from the local disk.
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[all,dev]'
export QT_QPA_PLATFORM=offscreen
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
