"""Render an ``analysis.report`` page in headless Chromium to a PNG (and optionally a PDF, to check print).

The browser gets no network (every host name resolves to nothing), so a page that needed one would
show it. The screenshot is taken in a tall window and the blank space below the page is cropped.

    python bench/report_screenshot.py report.html -o report.png [--width 1280] [--pdf report.pdf]

Needs Chromium (``apt-get install chromium``; or set CHROMIUM=/path/to/chrome).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from across import last_line  # noqa: E402

from harness.cli import ArgParser, run_cli  # noqa: E402
from harness.errors import HarnessError, InputError, OutputError, UsageError  # noqa: E402

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
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise HarnessError(f"cannot run chromium ({e}): {exe}") from None
    if r.returncode != 0:
        raise HarnessError(f"chromium failed ({r.returncode}): {last_line(r)}")


def check_output(path: Path, flag: str) -> None:
    """OutputError (before Chromium starts) unless ``path`` can be written: its folder exists and is writable."""
    if path.is_dir():
        raise UsageError(f"{flag}: a folder, not a file: {path}")
    folder = path.resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise OutputError(f"{flag}: cannot write there (no such folder, or not writable): {path}")


def crop_bottom(png: Path, margin: int = 24) -> tuple[int, int]:
    img = Image.open(png).convert("RGB")
    rows = np.asarray(img).min(axis=(1, 2)) < 250  # rows with anything darker than near-white
    last = int(np.nonzero(rows)[0].max()) if rows.any() else 0
    img.crop((0, 0, img.width, min(img.height, last + margin))).save(png)
    return img.width, min(img.height, last + margin)


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="report_screenshot.py", description=__doc__.split("\n")[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--pdf", type=Path, default=None, help="also print the page to this PDF (print CSS)")
    a = ap.parse_args(argv)
    if not 1 <= a.width <= MAX_HEIGHT:
        raise UsageError(f"--width must be between 1 and {MAX_HEIGHT} pixels, got {a.width}")
    if not a.html.is_file():
        raise InputError(f"no such file: {a.html}")
    check_output(a.out, "-o")
    if a.pdf:
        check_output(a.pdf, "--pdf")
    exe = find_chromium()
    if exe is None:
        raise HarnessError("Chromium not found (apt-get install chromium, or set CHROMIUM=/path)")
    url = a.html.resolve().as_uri()
    chromium(exe, url, f"--window-size={a.width},{MAX_HEIGHT}", f"--screenshot={a.out.resolve()}")
    if not a.out.is_file():
        raise OutputError(f"chromium wrote no screenshot: {a.out}")
    w, h = crop_bottom(a.out)
    print(f"{a.out}: {w} x {h} px{' (page taller than the window: cut)' if h >= MAX_HEIGHT else ''}")
    if a.pdf:
        chromium(exe, url, "--no-pdf-header-footer", f"--print-to-pdf={a.pdf.resolve()}")
        print(f"{a.pdf}: {a.pdf.stat().st_size / 1e3:.0f} kB")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("report_screenshot.py", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
