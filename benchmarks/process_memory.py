"""Peak resident memory of this process, shared by the benchmark scripts (each variant runs in its own
process, so the high-water mark belongs to that variant alone)."""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """Linux VmHWM (resettable through /proc/self/clear_refs), else getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
