"""Render an ``analysis.report`` page in headless Chromium to a PNG (and optionally a PDF, to check print).

The browser gets no network (every host name resolves to nothing), so a page that needed one would
show it. The screenshot is taken in a tall window and the blank space below the page is cropped.

    python bench/report_screenshot.py report.html -o report.png [--width 1280] [--pdf report.pdf]

Needs Chromium (``apt-get install chromium``; or set CHROMIUM=/path/to/chrome).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
MAX_HEIGHT = 16000


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return env if shutil.which(env) else None
    return next((p for p in map(shutil.which, NAMES) if p), None)


def chromium(exe: str, url: str, *args: str) -> None:
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
               "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}", *args, url]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        raise SystemExit(f"chromium failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")


def crop_bottom(png: Path, margin: int = 24) -> tuple[int, int]:
    img = Image.open(png).convert("RGB")
    rows = np.asarray(img).min(axis=(1, 2)) < 250  # rows with anything darker than near-white
    last = int(np.nonzero(rows)[0].max()) if rows.any() else 0
    img.crop((0, 0, img.width, min(img.height, last + margin))).save(png)
    return img.width, min(img.height, last + margin)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--pdf", type=Path, default=None, help="also print the page to this PDF (print CSS)")
    a = ap.parse_args()
    exe = find_chromium()
    if exe is None:
        print("report_screenshot: error: Chromium not found (apt-get install chromium, or set CHROMIUM=/path)",
              file=sys.stderr)
        return 2
    if not a.html.is_file():
        print(f"report_screenshot: error: no such file: {a.html}", file=sys.stderr)
        return 2
    url = a.html.resolve().as_uri()
    chromium(exe, url, f"--window-size={a.width},{MAX_HEIGHT}", f"--screenshot={a.out.resolve()}")
    w, h = crop_bottom(a.out)
    print(f"{a.out}: {w} x {h} px{' (page taller than the window: cut)' if h >= MAX_HEIGHT else ''}")
    if a.pdf:
        chromium(exe, url, "--no-pdf-header-footer", f"--print-to-pdf={a.pdf.resolve()}")
        print(f"{a.pdf}: {a.pdf.stat().st_size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
