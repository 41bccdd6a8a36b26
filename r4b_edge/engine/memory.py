"""Process memory measurement (peak resident set size)."""
from __future__ import annotations

import sys


def peak_rss_mb() -> float:
    """Peak RSS of this process in MiB (0.0 where the OS does not say).

    Linux: VmHWM from /proc/self/status (ru_maxrss is inherited across fork,
    so a child would report its parent's peak)."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
