"""Capture overhead and attribution of the sweep on a model, in both capture modes.

    python bench/overhead.py [--model GGUF] [--contexts short,medium,long] [--tokens 8] [--repeats 3]

Runs the real sweep once per mode (stages, ops). Within each run the plain and profiled passes
are interleaved token by token, so each overhead figure is a ratio measured in the same run:
mean of per-token (profiled / plain) with a 95 % interval over tokens. Also prints the share of
profiled wall time covered by ops, the attributed share (host included), and the stage split.
Figures are printed and saved under bench/results/; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import schema  # noqa: E402
from harness.store import read_run  # noqa: E402


def ratio_ci(tokens, context: str) -> tuple[float, float, int]:
    t = tokens[tokens[schema.CONTEXT] == context]
    plain = t[t[schema.PASS] == "plain"].set_index([schema.REPEAT, schema.STEP])[schema.WALL_US]
    prof = t[t[schema.PASS] == "profiled"].set_index([schema.REPEAT, schema.STEP])[schema.WALL_US]
    r = (prof / plain).dropna().tolist()
    mean = statistics.fmean(r)
    half = 1.96 * statistics.stdev(r) / math.sqrt(len(r)) if len(r) > 1 else float("nan")
    return mean, half, len(r)


def sweep(model: str | None, mode: str, a, out: Path) -> Path:
    cmd = [sys.executable, "-m", "harness.sweep", "--mode", mode, "-c", a.contexts, "-n", str(a.tokens),
           "-r", str(a.repeats), "--out", str(out), "--label", f"bench-{mode}"]
    if model:
        cmd += ["--model", model]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    print(f"[{mode}] sweep took {time.perf_counter() - t0:.1f} s", flush=True)
    return max(out.glob(f"*bench-{mode}*.parquet"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the E4B Q4_K_M twin)")
    ap.add_argument("--contexts", default="short,medium,long")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    results = {"model": a.model or "models/gemma-3n-e4b-q4.gguf", "modes": {}}
    with tempfile.TemporaryDirectory() as d:
        for mode in ("stages", "ops"):
            run = read_run(sweep(a.model, mode, a, Path(d)))
            rows = []
            for c in run.meta["contexts"]:
                mean, half, n = ratio_ci(run.tokens, c["context"])
                rows.append({"context": c["context"], "depth": c["depth"], "plain_ms": c["plain_ms"],
                             "overhead": mean, "overhead_ci95": half, "n_pairs": n,
                             "covered_pct": c["covered_pct"], "attributed_pct": c["attributed_pct"],
                             "syncs_per_token": c["syncs_per_token"], "stage_pct": c["stage_pct"]})
            results["modes"][mode] = rows
            results["device"] = run.meta["device"]
    print(f"\n{'mode':7} {'context':8} {'depth':>5} {'plain ms':>9} {'overhead':>17} {'syncs':>6} "
          f"{'ops %':>6} {'attrib %':>8}  stage shares %")
    for mode, rows in results["modes"].items():
        for r in rows:
            shares = " ".join(f"{k}={v:.1f}" for k, v in r["stage_pct"].items() if v >= 0.05)
            print(f"{mode:7} {r['context']:8} {r['depth']:5d} {r['plain_ms']:9.2f} "
                  f"x{r['overhead']:.3f} ± {r['overhead_ci95']:.3f} {r['syncs_per_token']:6d} "
                  f"{r['covered_pct']:6.2f} {r['attributed_pct']:8.2f}  {shares}")
    out = ROOT / "bench" / "results" / f"overhead-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nsaved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
