"""The invariance check's estimator against the one it replaced, on kept runs (bench/NOTES.md §17b).

    python bench/estimators.py KEPT/*.parquet     # runs kept with robust.py --keep (two or more depths)

For every run and judged stage (ffn, lm_head, attn_proj, gemma3n_extra) it takes each depth's value two ways:
- unpaired: the 20 % trimmed mean over rounds of the depth's calibrated stage ms (the check before §17b);
- paired: ``checks.depth_values``, each round divided by its median over depths first (the check now);
and prints their spread across depths and their noise floor (95th percentile of the spread with each round's
depths shuffled, 300 permutations), the mean per stage over the runs, and per run the largest spread of each
(target <= 2 %). The floors decided the change; the spreads are printed beside them. Saved as JSON in
bench/results/. Nothing is asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from across import save_results  # noqa: E402

from harness import checks, stats  # noqa: E402
from harness.cli import ArgParser, run_cli  # noqa: E402
from harness.errors import InputError  # noqa: E402
from harness.store import read_run  # noqa: E402

JUDGED = ("ffn", "lm_head", "attn_proj", "gemma3n_extra")
N_PERM = 300


def unpaired(x: np.ndarray) -> np.ndarray:
    return stats.trimmed_mean(x, checks.TRIM)


ESTIMATORS = {"unpaired": unpaired, "paired": checks.depth_values}


def floor_pct(x: np.ndarray, f) -> float:
    rng = np.random.default_rng(0)
    return float(np.percentile([checks.spread_pct(f(rng.permuted(x, axis=1))) for _ in range(N_PERM)], 95))


def one_run(path: Path) -> dict:
    run = read_run(path)
    if run.ops.empty:
        raise InputError(f"the run's op table has no rows: no stage timings to compare: {path}")
    rd = stats.round_data(run.ops, run.tokens)
    if len(rd.depths) < 2:
        raise InputError(f"one depth, nothing to compare across depths: {path}")
    cal = stats.calibrated(rd, stats.split_cost_ms(rd.calib_delta, rd.calib_extra))
    out = {"run": str(path), "depths": list(rd.depths), "stages": {}}
    for s in JUDGED:
        x = cal[:, :, stats.S[s]]
        out["stages"][s] = {name: {"spread_pct": float(checks.spread_pct(f(x))), "floor_pct": floor_pct(x, f)}
                            for name, f in ESTIMATORS.items()}
    return out


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="estimators.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="kept runs (Parquet), two or more depths each")
    a = ap.parse_args(argv)
    res = [one_run(p) for p in a.runs]  # InputError, one line, for a run that cannot be read or compared
    print(f"{len(res)} runs; mean over them, unpaired -> paired:")
    for s in JUDGED:
        m = {k: {n: np.mean([r["stages"][s][n][k] for r in res]) for n in ESTIMATORS}
             for k in ("floor_pct", "spread_pct")}
        print(f"  {s:14s} floor {m['floor_pct']['unpaired']:.2f} -> {m['floor_pct']['paired']:.2f} %   "
              f"spread {m['spread_pct']['unpaired']:.2f} -> {m['spread_pct']['paired']:.2f} %")
    worst = {n: [max(r["stages"][s][n]["spread_pct"] for s in JUDGED) for r in res] for n in ESTIMATORS}
    for n, w in worst.items():
        print(f"  largest spread per run, {n}: {', '.join(f'{v:.2f}' for v in w)} %; "
              f"within 2 % in {sum(v <= 2 for v in w)} of {len(w)}")
    save_results("estimators", {"runs": res})
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("estimators.py", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
