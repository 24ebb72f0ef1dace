"""Per-stage slope of decode time against KV depth, in ms per 1,000 KV tokens, with a 95 % interval.

The slope is the least-squares line through each depth's mean stage ms/token. The interval is a
percentile bootstrap over *rounds*, not tokens: tokens in a row are not independent, and a round
holds one token of every depth, so resampling rounds keeps depths paired (drift within a round
hits every depth alike). Several runs of a group are pooled with a stratified bootstrap: each
run's rounds are resampled within that run, and a depth's mean is the mean over the runs that
measured it.

- ``run_slopes(run)``: one run, calibrated stage ms plus the plain pass (``decode``);
- ``long_slopes(long, group_of_run)``: many groups at once from per-round stage sums (what
  ``analysis.compare`` reads with pandas or DuckDB). These are the op tables' stage times: the
  split-cost calibration subtracts the same amount at every depth, so it does not move a slope.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness import columns, stats, store
from harness.stages import STAGES

NEEDED_COLUMNS = [columns.CONTEXT, columns.DEPTH, columns.ROUND, columns.STAGE, columns.TIME_US]
RUN = "run"  # which run a row of pooled per-round sums belongs to
DECODE = "decode"  # the plain pass's ms/token
SLOPE_COLUMNS = ["slope_ms_per_1k", "ci95_low_ms_per_1k", "ci95_high_ms_per_1k", "intercept_ms", "n_rounds",
                 "n_depths"]
Sample = tuple[np.ndarray, np.ndarray]  # (depths (D,), ms per token (R, D, K)): one run


def _fit(depths: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope and intercept against depths (D,) of y (..., D, K), per leading index and column."""
    ok = ~np.isnan(y)
    w = ok.astype(float)
    n = w.sum(axis=-2)
    x = np.broadcast_to(depths.astype(float)[:, None], y.shape)
    y0 = np.where(ok, y, 0.0)
    with np.errstate(all="ignore"):
        xm, ym = (w * x).sum(axis=-2) / n, y0.sum(axis=-2) / n
        xc = np.where(ok, x - xm[..., None, :], 0.0)
        sxx = (xc**2).sum(axis=-2)
        slope = np.where(sxx > 0, (xc * (y0 - ym[..., None, :])).sum(axis=-2) / sxx, np.nan)
    return slope, ym - slope * xm


def pooled_slopes(samples: list[Sample], names: list[str], n_boot: int = stats.N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Slopes of the per-depth means pooled over runs; interval from a stratified bootstrap over rounds."""
    depths = np.array(sorted({int(d) for dep, _ in samples for d in dep}))
    rng = np.random.default_rng(seed)
    acc = np.zeros((n_boot + 1, len(depths), len(names)))
    cnt = np.zeros((1, len(depths), len(names)))
    for dep, y in samples:
        r = y.shape[0]
        counts = np.vstack([np.ones(r), rng.multinomial(r, np.full(r, 1.0 / r), size=n_boot)])  # row 0: the data
        ok = ~np.isnan(y)
        flat, mask = np.where(ok, y, 0.0).reshape(r, -1), ok.reshape(r, -1).astype(float)
        with np.errstate(all="ignore"):
            means = (counts @ flat) / (counts @ mask)  # resampled means, NaN where a resample has no data
        pos = np.searchsorted(depths, dep)
        means = means.reshape(n_boot + 1, len(dep), len(names))
        acc[:, pos] += np.nan_to_num(means)
        cnt[:, pos] += ~np.isnan(means[:1])
    with np.errstate(all="ignore"):
        curve = np.where(cnt > 0, acc / cnt, np.nan)
    slope, intercept = _fit(depths, curve)
    lo, hi = stats.interval(slope[1:]) if n_boot else (slope[0], slope[0])
    df = pd.DataFrame({"slope_ms_per_1k": slope[0] * 1000, "ci95_low_ms_per_1k": lo * 1000,
                       "ci95_high_ms_per_1k": hi * 1000, "intercept_ms": intercept[0],
                       "n_rounds": sum(y.shape[0] for _, y in samples), "n_depths": len(depths)},
                      index=pd.Index(names, name=columns.STAGE))
    return df[SLOPE_COLUMNS]


def round_data_sample(rd: stats.RoundData) -> Sample:
    """One run's sample: calibrated stage ms and the plain pass (last column, ``decode``)."""
    cost = stats.split_cost_ms(rd.calib_delta, rd.calib_extra)
    return np.array(rd.depths), np.concatenate([stats.calibrated(rd, cost), rd.plain[:, :, None]], axis=2)


def run_slopes(run: store.Run, n_boot: int = stats.N_BOOT) -> pd.DataFrame:
    """Slopes of one run (needs its op table's NEEDED_COLUMNS and its token table)."""
    return pooled_slopes([round_data_sample(stats.round_data(run.ops, run.tokens))], [*STAGES, DECODE], n_boot)


def long_slopes(long: pd.DataFrame, group_of_run: np.ndarray, n_boot: int = 400) -> pd.DataFrame:
    """Slopes of every group from per-round stage sums (columns RUN, context, depth, round, stage, ms; group
    ``group_of_run[run]``). Columns: group, stage, SLOPE_COLUMNS; only stages with time in the group."""
    cols = ["group", columns.STAGE, *SLOPE_COLUMNS]
    if long.empty:
        return pd.DataFrame(columns=cols)
    present = set(long[columns.STAGE])
    shown = [s for s in STAGES if s in present] + sorted(present - set(STAGES))
    wide = long.pivot_table(index=[RUN, columns.DEPTH, columns.ROUND], columns=columns.STAGE, values="ms",
                            aggfunc="sum", fill_value=0.0).reindex(columns=shown, fill_value=0.0)
    keys = wide.index.to_frame(index=False)
    runs = keys[RUN].to_numpy()
    starts = np.flatnonzero(np.r_[True, runs[1:] != runs[:-1]])
    by_group: dict[int, list[Sample]] = {}
    values = wide.to_numpy()
    for a, b in zip(starts, [*starts[1:], len(runs)], strict=True):
        dep, rnd = keys[columns.DEPTH].to_numpy()[a:b], keys[columns.ROUND].to_numpy()[a:b]
        ud, ur = np.unique(dep), np.unique(rnd)
        y = np.full((len(ur), len(ud), len(shown)), np.nan)
        y[np.searchsorted(ur, rnd), np.searchsorted(ud, dep)] = values[a:b]
        by_group.setdefault(int(group_of_run[runs[a]]), []).append((ud, y))
    out = []
    for g, samples in sorted(by_group.items()):
        fit = pooled_slopes(samples, shown, n_boot).reset_index()
        fit = fit[fit["slope_ms_per_1k"].notna()]
        out.append(fit.assign(group=g))
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)
