"""Peak memory per pipeline stage: GPU memory allocated by torch (per visible device) and the
process's peak resident set (Linux `VmHWM`, resettable through `/proc/self/clear_refs`).

`StageMemory.start()` resets the peaks, `stop()` returns `{"rss_peak_mb", "cuda_peak_mb"}` for the
work in between (cuda only where a GPU is visible; `rss_peak_reset: false` where the kernel refused
the reset, so the figure is the process's peak since it started).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch


def _status_mb(key: str) -> float | None:
    try:
        m = re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return round(int(m.group(1)) / 1024, 1) if m else None


def rss_mb() -> float | None:
    """Current resident set size (MB), None off Linux."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float | None:
    """Peak resident set size (MB) since the process started or the last reset, None off Linux."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StageMemory:
    """Peak memory of one stage (see module docstring)."""

    def start(self) -> None:
        self.reset = reset_peak_rss()
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)

    def stop(self) -> dict:
        out = {"rss_peak_mb": peak_rss_mb()}
        if not self.reset:
            out["rss_peak_reset"] = False
        if torch.cuda.is_available():
            out["cuda_peak_mb"] = {f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / 2**20, 1)
                                   for i in range(torch.cuda.device_count())}
        return out
