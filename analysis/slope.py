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

from harness import checks, columns, stats, store
from harness.stages import STAGES

NEEDED_COLUMNS = [columns.CONTEXT, columns.DEPTH, columns.ROUND, columns.STAGE, columns.TIME_US]
RUN = "run"  # which run a row of pooled per-round sums belongs to
DECODE = "decode"  # the plain pass's ms/token
SLOPE_COLUMNS = ["slope_ms_per_1k", "ci95_low_ms_per_1k", "ci95_high_ms_per_1k", "intercept_ms", "n_rounds",
                 "n_depths"]
Sample = tuple[np.ndarray, np.ndarray]  # (depths (D,), ms per token (R, D, K)): one run


CHUNK = 256  # runs of one shape bootstrapped together (bounds the (runs, resamples, rounds) count array)
Bucket = tuple[np.ndarray, np.ndarray, np.ndarray]  # runs of one shape: ms (n, R, D, K), depths (n, D), group (n,)


def _fit(depths: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope and intercept against depths (D,), or (..., 1, D) per group, of y (..., D, K), per
    leading index and column; NaN cells of y are left out."""
    ok = ~np.isnan(y)
    x = np.broadcast_to(depths.astype(float)[..., :, None], y.shape)
    x0, y0 = np.where(ok, x, 0.0), np.where(ok, y, 0.0)
    with np.errstate(all="ignore"):
        n = ok.sum(axis=-2)
        sx, sy = x0.sum(axis=-2), y0.sum(axis=-2)
        sxx, sxy = (x0 * x0).sum(axis=-2) - sx * sx / n, (x0 * y0).sum(axis=-2) - sx * sy / n
        slope = np.where(sxx > 0, sxy / sxx, np.nan)
        return slope, (sy - slope * sx) / n


def _counts(rng: np.random.Generator, n: int, r: int, n_boot: int) -> np.ndarray:
    """(n, n_boot + 1, r) how often each of r rounds is drawn, per run and resample; row 0 is the data itself."""
    return np.concatenate([np.ones((n, 1, r)), rng.multinomial(r, np.full(r, 1.0 / r), size=(n, n_boot))], axis=1)


def _add_rows(target: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """target[rows] += values, summing the values of repeated rows (unlike fancy-index +=)."""
    order = np.argsort(rows, kind="stable")
    rows, first = np.unique(rows[order], return_index=True)
    target[rows] += np.add.reduceat(values[order], first, axis=0)


def _buckets(samples: list[Sample], group: np.ndarray) -> list[Bucket]:
    """Samples stacked by shape (rounds, depths)."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (_, y) in enumerate(samples):
        by_shape.setdefault(y.shape[:2], []).append(i)
    return [(np.stack([samples[i][1] for i in idx]), np.stack([samples[i][0] for i in idx]), group[idx])
            for idx in by_shape.values()]


class _Depths:
    """Each group's depths (the union over its runs), as a 0-padded (G, Dmax) matrix, and where each run's
    depths sit in it (``cell``: row g * Dmax + position)."""

    def __init__(self, buckets: list[Bucket], n_groups: int):
        key = np.unique(np.concatenate([(gs[:, None].astype(np.int64) << 32) + ds.astype(np.int64).reshape(len(gs), -1)
                                        for _, ds, gs in buckets], axis=None))
        g, first = np.unique(key >> 32, return_index=True)
        pos = np.arange(len(key)) - np.repeat(first, np.diff(np.r_[first, len(key)]))
        self.n = np.bincount(key >> 32, minlength=n_groups)
        self.dmax = int(self.n.max())
        self.matrix = np.zeros((n_groups, self.dmax))
        self.matrix[key >> 32, pos] = key & 0xFFFFFFFF
        self._key, self._row = key, (key >> 32) * self.dmax + pos

    def cell(self, ds: np.ndarray, gs: np.ndarray) -> np.ndarray:
        """Rows (n, D) of the runs' depths ``ds`` (n, D) of groups ``gs`` (n,)."""
        return self._row[np.searchsorted(self._key, (gs[:, None].astype(np.int64) << 32) + ds.astype(np.int64))]


def _curves(buckets: list[Bucket], n_boot: int, seed: int, gd: _Depths | None = None):
    """Per group (0..G-1): its depths (G, Dmax; 0-padded), the per-depth mean curves of the data and of every
    resample (G, n_boot + 1, Dmax, K; NaN where no run measured a depth), its rounds and depths (G,). Each
    run's rounds are resampled within that run (a stratified bootstrap); runs of one shape together."""
    n_groups, k = max(int(g.max()) for _, _, g in buckets) + 1, buckets[0][0].shape[3]
    gd = gd or _Depths(buckets, n_groups)
    acc = np.zeros((n_groups * gd.dmax, (n_boot + 1) * k))
    cnt = np.zeros((n_groups * gd.dmax, k))
    rounds = np.zeros(n_groups)
    rng = np.random.default_rng(seed)
    for ys, ds, gs in buckets:
        n_all, r, d = ys.shape[:3]
        np.add.at(rounds, gs, r)
        for a in range(0, n_all, CHUNK):
            y, g = ys[a:a + CHUNK].reshape(-1, r, d * k), gs[a:a + CHUNK]
            ok = ~np.isnan(y)
            counts = _counts(rng, len(y), r, n_boot)
            with np.errstate(all="ignore"):  # NaN where a resample has no data
                means = (counts @ np.where(ok, y, 0.0)) / (counts @ ok.astype(float))
            means = means.reshape(len(y), n_boot + 1, d, k).transpose(0, 2, 1, 3).reshape(len(y) * d, -1)
            rows = gd.cell(ds[a:a + CHUNK], g).ravel()  # each run's depths, as rows of acc
            _add_rows(acc, rows, np.nan_to_num(means))
            _add_rows(cnt, rows, ~np.isnan(means[:, :k]))
    with np.errstate(all="ignore"):
        curve = (acc.reshape(n_groups, gd.dmax, n_boot + 1, k) / cnt.reshape(n_groups, gd.dmax, 1, k))
    return gd.matrix, curve.transpose(0, 2, 1, 3), rounds, gd.n


def _clean_slopes(buckets: list[Bucket], n_boot: int, seed: int, gd: _Depths, k: int):
    """Bootstrap slopes (G, n_boot + 1, K) of groups whose runs have no missing cell. A least-squares slope is
    linear in the per-depth means, so each run's rounds are first folded over depths with its group's
    weights, and only (rounds x stages) per run are resampled: a depth-fold less work than the curves."""
    n_groups = len(gd.n)
    cells = [gd.cell(ds, gs) for _, ds, gs in buckets]
    n_at = np.bincount(np.concatenate([c.ravel() for c in cells]), minlength=n_groups * gd.dmax)
    x = np.where(np.arange(gd.dmax) < gd.n[:, None], gd.matrix, np.nan)
    xc = x - np.nanmean(x, axis=1, keepdims=True)
    with np.errstate(all="ignore"):  # a group with one depth has no slope
        weight = np.nan_to_num(xc / np.nansum(xc**2, axis=1, keepdims=True)).ravel() / np.maximum(n_at, 1)
    slopes = np.zeros((n_groups, n_boot + 1, k))
    rng = np.random.default_rng(seed)
    for (ys, _, gs), cell in zip(buckets, cells, strict=True):
        n_all, r = ys.shape[:2]
        z = np.einsum("nrdk,nd->nrk", ys, weight[cell] / r)  # each round folded over depths
        for a in range(0, n_all, CHUNK):
            zc = z[a:a + CHUNK]
            _add_rows(slopes, gs[a:a + CHUNK], _counts(rng, len(zc), r, n_boot) @ zc)
    return slopes


def _slopes(buckets: list[Bucket], n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """SLOPE_COLUMNS per group and column (arrays of shape (G, K)). Groups whose runs all have every cell take
    the folded fast path for the bootstrap; the data's own slope and intercept come from the curves."""
    n_groups, k = max(int(g.max()) for _, _, g in buckets) + 1, buckets[0][0].shape[3]
    dirty = np.zeros(n_groups, bool)
    for ys, _, gs in buckets:
        dirty[gs[np.isnan(ys).any(axis=(1, 2, 3))]] = True
    gd = _Depths(buckets, n_groups)
    depths, curve, rounds, n_depths = _curves(buckets, 0, seed, gd)
    slope, intercept = _fit(depths[:, None, :], curve)
    boot = np.full((n_groups, n_boot, k), np.nan)
    if n_boot and not dirty.all():
        boot[~dirty] = _clean_slopes(buckets, n_boot, seed, gd, k)[~dirty, 1:]
    if n_boot and dirty.any():  # the curves of every resample, for those groups only (renumbered 0..)
        renum = np.cumsum(dirty) - 1
        sub = [(ys[m], ds[m], renum[gs[m]]) for ys, ds, gs in buckets if (m := dirty[gs]).any()]
        sub_depths, c_dirty, _, _ = _curves(sub, n_boot, seed)
        boot[dirty] = _fit(sub_depths[:, None, :], c_dirty)[0][:, 1:]
    lo, hi = stats.interval(boot, axis=1) if n_boot else (slope[:, 0], slope[:, 0])
    shape = slope[:, 0].shape
    return {"slope_ms_per_1k": slope[:, 0] * 1000, "ci95_low_ms_per_1k": lo * 1000, "ci95_high_ms_per_1k": hi * 1000,
            "intercept_ms": intercept[:, 0], "n_rounds": np.broadcast_to(rounds[:, None], shape),
            "n_depths": np.broadcast_to(n_depths[:, None], shape)}


def pooled_slopes(samples: list[Sample], names: list[str], n_boot: int = stats.N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Slopes of the per-depth means pooled over runs; interval from a stratified bootstrap over rounds."""
    fit = _slopes(_buckets(samples, np.zeros(len(samples), dtype=int)), n_boot, seed)
    return pd.DataFrame({c: v[0] for c, v in fit.items()}, index=pd.Index(names, name=columns.STAGE))[SLOPE_COLUMNS]


def round_data_sample(rd: stats.RoundData) -> Sample:
    """One run's sample: calibrated stage ms and the plain pass (last column, ``decode``)."""
    cost = stats.split_cost_ms(rd.calib_delta, rd.calib_extra)
    return np.array(rd.depths), np.concatenate([stats.calibrated(rd, cost), rd.plain[:, :, None]], axis=2)


def run_slopes(run: store.Run, n_boot: int = stats.N_BOOT, rd: stats.RoundData | None = None) -> pd.DataFrame:
    """Slopes of one run (needs its op table's NEEDED_COLUMNS and its token table; or ``rd``, its round data)."""
    rd = stats.round_data(run.ops, run.tokens) if rd is None else rd
    return pooled_slopes([round_data_sample(rd)], [*STAGES, DECODE], n_boot)


def off_zero(stage: str, row) -> bool:
    """A depth-invariant stage (``checks.INVARIANT_STAGES``) whose slope interval (a row of SLOPE_COLUMNS)
    excludes 0."""
    return stage in checks.INVARIANT_STAGES and (row["ci95_low_ms_per_1k"] > 0 or row["ci95_high_ms_per_1k"] < 0)


def invariant_off_zero(sl: pd.DataFrame, contexts) -> dict[str, tuple[float, float]]:
    """Depth-invariant stages (``checks.INVARIANT_STAGES``: their bytes do not depend on depth) whose slope
    interval excludes 0: {stage: (ms, % of the stage's mean ms) that the slope amounts to over the run's
    depths}. An interval over rounds does not hold a context's own offset nor a device's small real effect of
    depth on time (bench/NOTES.md §12, §17c-d), so such a slope is said out loud, not read as a trend."""
    ctxs = sorted(contexts, key=lambda c: c.depth)
    span_k, out = (ctxs[-1].depth - ctxs[0].depth) / 1000, {}
    for s in checks.INVARIANT_STAGES:
        r, ms = sl.loc[s], float(np.mean([c.stage(s) for c in ctxs]))
        if ms > 0 and off_zero(s, r):
            out[s] = (float(r["slope_ms_per_1k"]) * span_k, 100 * float(r["slope_ms_per_1k"]) * span_k / ms)
    return out


def long_slopes(long: pd.DataFrame, group_of_run: np.ndarray, n_boot: int = 400) -> pd.DataFrame:
    """Slopes of every group from per-round stage sums (columns RUN, context, depth, round, stage, ms; group
    ``group_of_run[run]``). Columns: group, stage, SLOPE_COLUMNS; only stages with time in the group."""
    cols = ["group", columns.STAGE, *SLOPE_COLUMNS]
    if long.empty:
        return pd.DataFrame(columns=cols)
    found, present = pd.factorize(long[columns.STAGE])
    present = list(present)
    shown = [s for s in STAGES if s in present] + sorted(set(present) - set(STAGES))
    st = np.array([shown.index(s) for s in present])[found]
    run_codes, runs = np.unique(long[RUN].to_numpy(), return_inverse=True)
    dep, rnd, ms = long[columns.DEPTH].to_numpy(), long[columns.ROUND].to_numpy(), long["ms"].to_numpy(float)
    # each run's depths and rounds, numbered 0.. within the run
    di = pd.Series(dep).groupby(runs).rank(method="dense").to_numpy(int) - 1
    ri = pd.Series(rnd).groupby(runs).rank(method="dense").to_numpy(int) - 1
    n_d, n_r = np.zeros(len(run_codes), int), np.zeros(len(run_codes), int)
    np.maximum.at(n_d, runs, di + 1)
    np.maximum.at(n_r, runs, ri + 1)
    k, group_ids, group = len(shown), *np.unique(group_of_run[run_codes], return_inverse=True)
    buckets: list[Bucket] = []
    for r, d in {(int(a), int(b)) for a, b in zip(n_r, n_d, strict=True)}:
        members = np.flatnonzero((n_r == r) & (n_d == d))
        slot = np.full(len(run_codes), -1)
        slot[members] = np.arange(len(members))
        sel = slot[runs] >= 0
        cell = (slot[runs[sel]] * r + ri[sel]) * d + di[sel]  # (run in bucket, round, depth)
        size = len(members) * r * d
        ys = np.bincount(cell * k + st[sel], weights=ms[sel], minlength=size * k)
        ys = ys.reshape(size, k)
        ys[np.bincount(cell, minlength=size) == 0] = np.nan  # a (round, depth) with no row was not measured
        depths = np.zeros((len(members), d))
        depths[slot[runs[sel]], di[sel]] = dep[sel]
        buckets.append((ys.reshape(len(members), r, d, k), depths, group[members]))
    fit = _slopes(buckets, n_boot, 0)
    df = pd.DataFrame({"group": np.repeat(group_ids, k), columns.STAGE: np.tile(shown, len(group_ids)),
                       **{c: np.asarray(v).ravel() for c, v in fit.items()}})
    return df[df["slope_ms_per_1k"].notna()].reset_index(drop=True)[cols]
