"""Process memory for benchmarks: re-exports `lp.memory` (current and peak RSS, resettable peak)."""

from lp.memory import peak_rss_mb, reset_peak_rss, rss_mb

__all__ = ["peak_rss_mb", "reset_peak_rss", "rss_mb"]
