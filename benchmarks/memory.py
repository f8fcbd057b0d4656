"""Process memory for benchmarks (Linux /proc): the current and peak resident set size of this process.

The peak (VmHWM) can be reset, so `reset_peak_rss(); work(); peak_rss_mb()` is the exact peak RSS of
`work` (plus what was resident before it), with no sampling thread.
"""

import re
from pathlib import Path


def _status_mb(key: str) -> float:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def rss_mb() -> float:
    """Current resident set size (MB)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size (MB) since the process started or the last `reset_peak_rss()`."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
