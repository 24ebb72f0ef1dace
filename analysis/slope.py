"""Per-stage slope of decode time against KV depth, in ms per 1,000 KV tokens, with a 95 % interval.

The slope is the least-squares line through each depth's mean stage ms/token (calibrated when the
run has calibration tokens). The interval is a percentile bootstrap over *rounds*, not tokens:
tokens in a row are not independent, and a round holds one token of every depth, so resampling
rounds keeps depths paired (drift within a round hits every depth alike). Several runs of a group
are pooled with a stratified bootstrap: each run's rounds are resampled within that run.

    from analysis.slope import run_slopes
    slopes = run_slopes(run)   # index: stage (+ "decode", the plain pass); columns: SLOPE_COLUMNS
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness import columns, stats, store
from harness.stages import STAGES

NEEDED_COLUMNS = [columns.CONTEXT, columns.DEPTH, columns.ROUND, columns.STAGE, columns.TIME_US]
DECODE = "decode"  # the plain pass's ms/token
SLOPE_COLUMNS = ["slope_ms_per_1k", "ci95_low_ms_per_1k", "ci95_high_ms_per_1k", "intercept_ms", "n_rounds",
                 "n_depths"]


def _per_depth(rd: stats.RoundData, rows: np.ndarray, cost_ms: float) -> np.ndarray:
    """(D, S + 1) mean ms/token per depth over the given round indices: stages (calibrated), then decode."""
    st = stats.calibrated(rd, cost_ms)[rows]
    with np.errstate(all="ignore"):
        return np.concatenate([np.nanmean(st, axis=0), np.nanmean(rd.plain[rows], axis=0)[:, None]], axis=1)


def _fit(depths: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope (per token) and intercept of every column of y (D, K) against depths (D,)."""
    ok = ~np.isnan(y).any(axis=1)
    x, y = depths[ok].astype(float), y[ok]
    if len(np.unique(x)) < 2:
        nan = np.full(y.shape[1], np.nan)
        return nan, nan
    xc = x - x.mean()
    slope = (xc[:, None] * (y - y.mean(axis=0))).sum(axis=0) / (xc**2).sum()
    return slope, y.mean(axis=0) - slope * x.mean()


def pooled_slopes(runs: list[stats.RoundData], n_boot: int = stats.N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Slopes of the per-depth means pooled over runs (mean over the runs that measured a depth)."""
    names = [*STAGES, DECODE]
    depths = np.array(sorted({d for rd in runs for d in rd.depths}))
    costs = [stats.split_cost_ms(rd.calib_delta, rd.calib_extra) for rd in runs]

    def curve(picks: list[np.ndarray]) -> np.ndarray:
        acc = np.zeros((len(depths), len(names)))
        cnt = np.zeros((len(depths), 1))
        for rd, rows, c in zip(runs, picks, costs, strict=True):
            pos = np.searchsorted(depths, rd.depths)
            acc[pos] += np.nan_to_num(_per_depth(rd, rows, c))
            cnt[pos] += 1
        with np.errstate(all="ignore"):
            return acc / cnt

    slope, intercept = _fit(depths, curve([np.arange(len(rd.rounds)) for rd in runs]))
    rng = np.random.default_rng(seed)
    boot = np.array([_fit(depths, curve([rng.integers(0, len(rd.rounds), len(rd.rounds)) for rd in runs]))[0]
                     for _ in range(n_boot)]) if len(depths) >= 2 else np.full((1, len(names)), np.nan)
    lo, hi = stats.interval(boot) if len(depths) >= 2 else (boot[0], boot[0])
    n_rounds = sum(len(rd.rounds) for rd in runs)
    df = pd.DataFrame({"slope_ms_per_1k": slope * 1000, "ci95_low_ms_per_1k": lo * 1000,
                       "ci95_high_ms_per_1k": hi * 1000, "intercept_ms": intercept, "n_rounds": n_rounds,
                       "n_depths": len(depths)}, index=pd.Index(names, name=columns.STAGE))
    return df[SLOPE_COLUMNS]


def run_slopes(run: store.Run, n_boot: int = stats.N_BOOT) -> pd.DataFrame:
    """Slopes of one run (needs its op table's NEEDED_COLUMNS and its token table)."""
    return pooled_slopes([stats.round_data(run.ops, run.tokens)], n_boot)
