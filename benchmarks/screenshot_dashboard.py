"""Screenshot a sweep dashboard with headless chromium (and report JS console errors).

    python benchmarks/screenshot_dashboard.py <sweep_dir>/dashboard.html /tmp/dashboard.png [--width 1400]

Needs ``chromium`` on PATH (``apt-get install -y chromium``). Exit status 1 when chromium fails or the
page logs console errors, so it doubles as a rendering check.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path


def page_height(text: str, width: int) -> int:
    """Rough full-page height of an lp dashboard (headless --screenshot only grabs the window)."""
    px = {"pt": 4 / 3, "": 1.0, "px": 1.0}  # matplotlib writes sizes in pt
    svgs = [(int(float(w) * px[u]), int(float(h) * px[v]))
            for w, u, h, v in re.findall(r'<svg[^>]*width="([\d.]+)(pt|px|)" height="([\d.]+)(pt|px|)"', text)]
    per_row = max(1, (width - 60) // (max((w for w, _ in svgs), default=520) + 14))
    charts = sum(h + 14 for _, h in svgs) / per_row
    rows = text.count("<tr") * 23 + text.count("<h2") * 75 + text.count("<h3") * 60 + text.count("<pre") * 90
    return int(min(30000, max(800, charts + rows + 300)))


def screenshot(html: Path, png: Path, width: int = 1400, height: int = 0) -> list[str]:
    """Render ``html`` to ``png``; returns the console error lines chromium logged."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        raise FileNotFoundError("chromium not found: apt-get install -y chromium")
    if not height:
        height = page_height(html.read_text(errors="replace"), width)
    png.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--enable-logging=stderr",
         "--v=1", f"--window-size={width},{height}", f"--screenshot={png.resolve()}",
         html.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not png.exists():
        raise RuntimeError(f"chromium failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=0, help="0: estimate from the page size")
    args = ap.parse_args(argv)
    errors = screenshot(args.html, args.png, args.width, args.height)
    print(f"wrote {args.png}")
    for e in errors:
        print("console:", e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
