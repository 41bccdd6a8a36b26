"""The JSONL metrics log every stage writes (`metrics.jsonl`: one line per logged step, with the
wall-clock seconds since the log was opened; `train/pipeline.py` sums them when a stage has no timer)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .dist import is_main


class Metrics:
    """Append-only JSONL metrics log (rank 0) with wall-clock time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.t0 = time.time()

    def log(self, **kv: Any) -> None:
        """Write one line."""
        if is_main():
            kv["time"] = round(time.time() - self.t0, 3)
            with open(self.path, "a") as f:
                f.write(json.dumps(kv) + "\n")
