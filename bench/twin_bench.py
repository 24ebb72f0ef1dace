"""Time and peak RSS of twin generation, one subprocess per (preset, quant).

    python bench/twin_bench.py [--presets gemma-3n-e4b,gemma-3n-e2b] [--quants q4_k_m,q4_0] [--dir DIR]

Targets (issue 2): E4B Q4_K_M in <= 60 s and <= 4 GiB peak RSS on the 2-core dev machine, file
4.2-4.9 GB, loaded by llama.cpp as "gemma3n E4B" with ~6.87 B parameters, and it decodes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.cli import ArgParser, run_cli  # noqa: E402
from harness.errors import InputError, UsageError  # noqa: E402


def measure(preset: str, quant: str, out: Path) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "harness.twin", "--preset", preset, "--quant", quant, "-o", str(out)],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, status, usage = os.wait4(p.pid, 0)  # this child's own peak RSS
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (run_cli): the twin writer removes its partial file, then we go
        p.send_signal(signal.SIGTERM)
        p.wait()
        raise
    wall = time.perf_counter() - t0
    if status != 0:
        err = p.stderr.read().decode().strip().splitlines() or [f"exit status {status}"]
        raise InputError(f"twin generation failed ({preset}, {quant}): {err[-1]}")
    # load and decode in a fresh process so the twin's RSS is not mixed in
    check = subprocess.run([sys.executable, "-c", (
        "import sys,time\nfrom harness.engine import Model, Context, EngineConfig\n"
        "with Model(sys.argv[1]) as m, Context(m, EngineConfig(threads=2, n_ctx=64)) as c:\n"
        "    c.prefill(list(range(300, 308))); w=[c.step(400)/1e6 for _ in range(3)]\n"
        "    print(m.desc, m.n_params, *w)"), str(out)], cwd=ROOT, capture_output=True, text=True)
    desc = check.stdout.strip()
    return {"preset": preset, "quant": quant, "wall_s": round(wall, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "file_gb": round(out.stat().st_size / 1e9, 3), "llama_cpp": desc or check.stderr.strip()[-200:]}


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="twin_bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="gemma-3n-e4b")
    ap.add_argument("--quants", default="q4_k_m")
    ap.add_argument("--dir", default=None, help="where to write the twins (default: a temp dir)")
    a = ap.parse_args(argv)
    if a.dir is not None and not Path(a.dir).is_dir():
        raise UsageError(f"--dir: not a folder: {a.dir}")
    rows = []
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        for preset in a.presets.split(","):
            for quant in a.quants.split(","):
                out = Path(d) / f"{preset}-{quant}.gguf"
                rows.append(measure(preset, quant, out))
                out.unlink()
                print(json.dumps(rows[-1]), flush=True)
    print(f"{'preset':14} {'quant':7} {'wall s':>7} {'peak RSS GiB':>12} {'file GB':>8}"
          "  llama.cpp: desc, n_params, ms/token x3")
    for r in rows:
        print(f"{r['preset']:14} {r['quant']:7} {r['wall_s']:7} {r['peak_rss_gib']!s:>12} {r['file_gb']:8}"
              f"  {r['llama_cpp']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("twin_bench.py", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
