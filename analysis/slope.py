"""Per-stage slope of decode time against KV depth, in ms per 1,000 KV tokens, with a 95 % interval.

The slope is the least-squares line through each depth's mean stage ms/token. The interval is a
percentile bootstrap over *rounds*, not tokens: tokens in a row are not independent, and a round
holds one token of every depth, so resampling rounds keeps depths paired (drift within a round
hits every depth alike). Several runs of a group are pooled with a stratified bootstrap (each
run's rounds are resampled within that run) into one slope within runs: each run's depths and
means are centred on its own, so runs at different levels that measured different depths do not
make a slope of their levels. With one set of depths this is the line through the per-depth
means pooled over runs. The same resamples give each stage a JOINT_LEVEL (99 %) interval: the five
depth-invariant stages are judged off 0 together (``off_zero``), at 95 % for the five.

- ``run_slopes(run)``: one run, calibrated stage ms plus the plain pass (``decode``);
- ``long_slopes(long, group_of_run)``: many groups at once from per-round stage sums (what
  ``analysis.compare`` reads with pandas or DuckDB). These are the op tables' stage times: the
  split-cost calibration subtracts the same amount at every depth, so it does not move a slope.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness import checks, columns, stats, store
from harness.errors import InputError
from harness.stages import STAGES

NEEDED_COLUMNS = [columns.CONTEXT, columns.DEPTH, columns.ROUND, columns.STAGE, columns.TIME_US]
RUN = "run"  # which run a row of pooled per-round sums belongs to
DECODE = "decode"  # the plain pass's ms/token
JOINT_LEVEL = 1 - 0.05 / len(checks.INVARIANT_STAGES)  # Bonferroni: the invariant stages judged together at 95 %
SLOPE_COLUMNS = ["slope_ms_per_1k", "ci95_low_ms_per_1k", "ci95_high_ms_per_1k", "intercept_ms", "n_rounds",
                 "n_depths", "joint_low_ms_per_1k", "joint_high_ms_per_1k"]  # joint: each stage at JOINT_LEVEL
Sample = tuple[np.ndarray, np.ndarray]  # (depths (D,), ms per token (R, D, K)): one run


CHUNK = 256  # runs of one shape bootstrapped together (bounds the (runs, resamples, rounds) count array)
CELLS = 4_000_000  # resampled means held at once on the general path (runs x resamples x depths x columns)
Bucket = tuple[np.ndarray, np.ndarray, np.ndarray]  # runs of one shape: ms (n, R, D, K), depths (n, D), group (n,)


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


def _within(buckets: list[Bucket], n_groups: int, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Within-run sums per group, resample (row 0: the data) and column, each (G, n_boot + 1, K): ``sxy`` and
    ``sxx`` (depths centred on each run's own mean over the depths it has data at) and, for the intercept, the
    sums over runs of each run's mean depth ``sx`` and mean ms ``sy`` and the number of runs ``n``. A resample
    that draws none of a cell's valid rounds leaves that cell out, as for a run that did not measure it."""
    k = buckets[0][0].shape[3]
    out = {name: np.zeros((n_groups, n_boot + 1, k)) for name in ("sxy", "sxx", "sx", "sy", "n")}
    rng = np.random.default_rng(seed)
    for ys, ds, gs in buckets:
        n_all, r, d = ys.shape[:3]
        step = max(1, min(CHUNK, CELLS // ((n_boot + 1) * d * k)))
        for a in range(0, n_all, step):
            y = ys[a:a + step].reshape(-1, r, d * k)
            ok = ~np.isnan(y)
            counts = _counts(rng, len(y), r, n_boot)
            with np.errstate(all="ignore"):  # NaN where a resample has no data
                m = ((counts @ np.where(ok, y, 0.0)) / (counts @ ok.astype(float))).reshape(len(y), n_boot + 1, d, k)
                has = ~np.isnan(m)
                x = np.where(has, ds[a:a + step, None, :, None].astype(float), 0.0)
                n = has.sum(axis=2)
                xbar, ybar = x.sum(axis=2) / n, np.where(has, m, 0.0).sum(axis=2) / n
                xc = np.where(has, x - xbar[:, :, None, :], 0.0)
            run = {"sxy": (xc * np.where(has, m, 0.0)).sum(axis=2), "sxx": (xc * xc).sum(axis=2),
                   "sx": np.where(n > 0, xbar, 0.0), "sy": np.where(n > 0, ybar, 0.0), "n": (n > 0).astype(float)}
            for name, v in run.items():
                _add_rows(out[name], gs[a:a + step], v)
    return out


def _clean_slopes(buckets: list[Bucket], sxx: np.ndarray, n_boot: int, seed: int, k: int) -> np.ndarray:
    """Bootstrap slopes (G, n_boot + 1, K) of groups whose runs have no missing cell (``sxx``: each group's
    within-run sum of squares of depth, ``_within``'s). The within-run slope is linear in each run's per-depth
    means, so each run's rounds are first folded over its depths with its weights (its centred depths over
    ``sxx``) and only (rounds x stages) per run are resampled: a depth-fold less work than ``_within``."""
    slopes = np.zeros((len(sxx), n_boot + 1, k))
    rng = np.random.default_rng(seed)
    for ys, ds, gs in buckets:
        n_all, r = ys.shape[:2]
        with np.errstate(all="ignore"):  # a group with one depth has no slope
            weight = np.nan_to_num((ds - ds.mean(axis=1, keepdims=True)) / sxx[gs][:, None]) / r
        z = np.einsum("nrdk,nd->nrk", ys, weight)  # each round folded over depths
        for a in range(0, n_all, CHUNK):
            zc = z[a:a + CHUNK]
            _add_rows(slopes, gs[a:a + CHUNK], _counts(rng, len(zc), r, n_boot) @ zc)
    return slopes


def _slopes(buckets: list[Bucket], n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """SLOPE_COLUMNS per group and column (arrays of shape (G, K)). A group's slope is the least-squares slope
    within its runs (each run's depths and ms centred on its own means), so runs that measured different
    depths do not turn their difference in level into a slope; with one set of depths it is the slope of the
    per-depth means pooled over runs. Groups whose runs all have every cell take the folded fast path."""
    n_groups, k = max(int(g.max()) for _, _, g in buckets) + 1, buckets[0][0].shape[3]
    dirty = np.zeros(n_groups, bool)
    for ys, _, gs in buckets:
        dirty[gs[np.isnan(ys).any(axis=(1, 2, 3))]] = True
    data = {name: v[:, 0] for name, v in _within(buckets, n_groups, 0, seed).items()}
    with np.errstate(all="ignore"):
        slope = np.where(data["sxx"] > 0, data["sxy"] / data["sxx"], np.nan)
        intercept = (data["sy"] - slope * data["sx"]) / data["n"]
    boot = np.full((n_groups, n_boot, k), np.nan)
    if n_boot and not dirty.all():
        boot[~dirty] = _clean_slopes(buckets, data["sxx"][:, 0], n_boot, seed, k)[~dirty, 1:]  # every column alike
    if n_boot and dirty.any():  # every resample's per-run means, for those groups only (renumbered 0..)
        renum = np.cumsum(dirty) - 1
        sub = [(ys[m], ds[m], renum[gs[m]]) for ys, ds, gs in buckets if (m := dirty[gs]).any()]
        w = _within(sub, int(dirty.sum()), n_boot, seed)
        with np.errstate(all="ignore"):
            boot[dirty] = np.where(w["sxx"] > 0, w["sxy"] / w["sxx"], np.nan)[:, 1:]
    boot = np.where((data["sxx"] > 0)[:, None, :], boot, np.nan)  # no spread in depth within runs: no slope
    lo, hi = stats.interval(boot, axis=1) if n_boot else (slope, slope)
    j_lo, j_hi = stats.interval(boot, axis=1, level=JOINT_LEVEL) if n_boot else (slope, slope)
    key = np.unique(np.concatenate([((gs[:, None].astype(np.int64) << 32) + ds.astype(np.int64)).ravel()
                                    for _, ds, gs in buckets]))
    rounds = np.zeros(n_groups)
    for ys, _, gs in buckets:
        np.add.at(rounds, gs, ys.shape[1])
    return {"slope_ms_per_1k": slope * 1000, "ci95_low_ms_per_1k": lo * 1000, "ci95_high_ms_per_1k": hi * 1000,
            "intercept_ms": intercept, "n_rounds": np.broadcast_to(rounds[:, None], slope.shape),
            "n_depths": np.broadcast_to(np.bincount(key >> 32, minlength=n_groups)[:, None], slope.shape),
            "joint_low_ms_per_1k": j_lo * 1000, "joint_high_ms_per_1k": j_hi * 1000}


def pool_runs(y: np.ndarray, strict: bool = True) -> np.ndarray:
    """Per-depth means pooled over runs, (n_runs, D, ...) -> (D, ...), NaN where a run did not measure a depth.
    With one set of depths, the mean over runs. Otherwise y = run level + depth curve is fitted by least squares
    (for each pattern of measured cells; the levels sum to 0, so the curve sits at the runs' mean level), and
    runs at different levels that measured different depths do not make a shape of their levels. Runs that share
    no depth, directly or through other runs, have no common level: InputError (``strict``), else NaN."""
    if not np.isnan(y).any():
        return y.mean(axis=0)
    n, d = y.shape[:2]
    flat = y.reshape(n * d, -1)
    out = np.full((d, flat.shape[1]), np.nan)
    patterns, which = np.unique(~np.isnan(flat.T), axis=0, return_inverse=True)
    for k, seen in enumerate(patterns):
        cells = np.flatnonzero(seen)
        if not len(cells):
            continue
        runs, deps = np.unique(cells // d), np.unique(cells % d)
        r, c = np.searchsorted(runs, cells // d), np.searchsorted(deps, cells % d)
        x = np.zeros((len(cells) + 1, len(runs) + len(deps)))
        x[np.arange(len(cells)), r], x[np.arange(len(cells)), len(runs) + c], x[-1, :len(runs)] = 1.0, 1.0, 1.0
        cols = np.flatnonzero(which.ravel() == k)
        if np.linalg.matrix_rank(x) < x.shape[1]:
            if strict:
                raise InputError("these runs share no depth, directly or through other runs: no common level to "
                                 "pool them")
            continue
        rhs = np.vstack([flat[np.ix_(cells, cols)], np.zeros((1, len(cols)))])
        out[np.ix_(deps, cols)] = np.linalg.lstsq(x, rhs, rcond=None)[0][len(runs):]
    return out.reshape(d, *y.shape[2:])


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
    """A depth-invariant stage (``checks.INVARIANT_STAGES``) whose slope excludes 0 with those stages judged
    together: its JOINT_LEVEL interval (a row of SLOPE_COLUMNS). Each stage's own 95 % interval would put one of
    five off 0 by chance in ~23 % of runs with no effect of depth at all (bench/NOTES.md §39)."""
    return stage in checks.INVARIANT_STAGES and (row["joint_low_ms_per_1k"] > 0 or row["joint_high_ms_per_1k"] < 0)


def invariant_off_zero(sl: pd.DataFrame, contexts) -> dict[str, tuple[float, float]]:
    """Depth-invariant stages (``checks.INVARIANT_STAGES``: their bytes do not depend on depth) whose slope
    excludes 0, judged together (``off_zero``): {stage: (ms, % of the stage's mean ms) that the slope amounts to
    over the run's depths}. An interval over rounds does not hold a context's own offset nor a device's small real
    effect of depth on time (bench/NOTES.md §12, §17c-d), so such a slope is said out loud, not read as a trend."""
    ctxs = sorted(contexts, key=lambda c: c.depth)
    span_k, out = (ctxs[-1].depth - ctxs[0].depth) / 1000, {}
    for s in checks.INVARIANT_STAGES:
        r, ms = sl.loc[s], float(np.mean([c.stage(s) for c in ctxs]))
        if ms > 0 and off_zero(s, r):
            out[s] = (float(r["slope_ms_per_1k"]) * span_k, 100 * float(r["slope_ms_per_1k"]) * span_k / ms)
    return out


FLEET_N_BOOT = 400  # compare's resamples: a fleet of 10,000 runs stays within bench/NOTES.md §10's 10 s


def long_slopes(long: pd.DataFrame, group_of_run: np.ndarray, n_boot: int = FLEET_N_BOOT) -> pd.DataFrame:
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
