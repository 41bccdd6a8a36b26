"""Run `r4b-edge` with every model's backend forward slowed by $R4B_TEST_DELAY seconds (tests only):
`python tests/apps/slow_cli.py chat ...`. Lets a subprocess test stop or signal a reply mid-way."""
from __future__ import annotations

import os
import sys

import r4b_edge
from r4b_edge.apps.cli import main
from r4b_edge.testing import slow_down

_load = r4b_edge.load


def _slow_load(*args, **kwargs):
    model = _load(*args, **kwargs)
    slow_down(model.backend, float(os.environ.get("R4B_TEST_DELAY", "0.02")))
    return model


r4b_edge.load = _slow_load

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
