"""Statistics of a round-robin sweep: per-round matrices, bootstrap intervals over rounds, split-cost
calibration (the checks on them: ``harness.checks``).

Samples are taken in rounds: every round decodes one token at every depth, plain and profiled, in
a rotating order. Tokens are not independent samples (the device drifts), rounds are the unit:
every interval is a percentile bootstrap over rounds, and every difference between depths is
paired by round (the same resampled rounds for all depths).

Calibration: the profiled pass pays one graph split per timed segment. Once per round one depth
also decodes a *calibration* token with k extra splits; the cost of one split is the wall difference
(calibration - profiled, same round and depth) / k, a 20 % trimmed mean over rounds. Calibrated stage ms
subtract segments x that cost; their sum is compared with the plain ms/token (``calibrated_sum_pct``). With every node
asked (the default), the calibration token is an ops-mode token: ``mode_diff`` compares its calibrated stage
shares with the same round's stages-mode token at that depth.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness import columns, stages

N_BOOT = 2000
S = {s: i for i, s in enumerate(stages.STAGES)}


@dataclass(frozen=True)
class RoundData:
    """One run's samples as (round x depth [x stage]) matrices of ms per token; NaN where missing."""

    labels: tuple[str, ...]
    depths: tuple[int, ...]
    rounds: np.ndarray  # (R,) round numbers
    plain: np.ndarray  # (R, D)
    profiled: np.ndarray  # (R, D)
    stage: np.ndarray  # (R, D, S) raw stage ms
    segs: np.ndarray  # (D, S) timed segments per token
    calib_delta: np.ndarray  # (R,) calibration - profiled wall ms at the round's calibration depth (NaN: none)
    calib_extra: np.ndarray  # (R,) extra splits of that calibration token
    ops_stage: np.ndarray | None = None  # (R, S) raw stage ms of the round's calibration token when it asked every
    ops_segs: np.ndarray | None = None  # node (an ops-mode token; NaN: none), and its (R, S) segments
    calib_depth: np.ndarray | None = None  # (R,) depth index of that token (-1: none)


def round_data(ops: pd.DataFrame, tokens: pd.DataFrame, calib: pd.DataFrame | None = None) -> RoundData:
    """Build the matrices from a run's op table and token table (and its calibration tokens per stage,
    columns.CALIB_STAGE_COLUMNS, when the run kept them)."""
    ctx = ops[[columns.CONTEXT, columns.DEPTH]].drop_duplicates()
    tk = tokens[[columns.CONTEXT, columns.DEPTH]].drop_duplicates()
    ctx = pd.concat([ctx, tk]).drop_duplicates(columns.CONTEXT).sort_values(columns.DEPTH)
    labels, depths = tuple(ctx[columns.CONTEXT].astype(str)), tuple(int(d) for d in ctx[columns.DEPTH])
    rounds = np.array(sorted(set(tokens[columns.ROUND]) | set(ops[columns.ROUND])), dtype=np.int64)
    ri = {r: i for i, r in enumerate(rounds)}
    di = {c: i for i, c in enumerate(labels)}
    n_r, n_d = len(rounds), len(labels)

    def grid(df: pd.DataFrame, value: str) -> np.ndarray:
        out = np.full((n_r, n_d), np.nan)
        for (c, r), v in df.groupby([columns.CONTEXT, columns.ROUND])[value].mean().items():
            out[ri[r], di[str(c)]] = v / 1000.0
        return out

    by_pass = {p: tokens[tokens[columns.PASS] == p] for p in (columns.PLAIN, columns.PROFILED, columns.CALIBRATION)}
    plain, prof = grid(by_pass[columns.PLAIN], columns.WALL_US), grid(by_pass[columns.PROFILED], columns.WALL_US)
    st = np.full((n_r, n_d, len(S)), np.nan)
    present = ~np.isnan(prof)
    st[present] = 0.0
    g = ops.groupby([columns.CONTEXT, columns.ROUND, columns.STAGE])[columns.TIME_US].sum()
    for (c, r, s), v in g.items():  # a stage this harness does not know counts as other
        i, j, k = ri[r], di[str(c)], S.get(s, S[stages.OTHER])
        st[i, j, k] = (0.0 if np.isnan(st[i, j, k]) else st[i, j, k]) + v / 1000.0
    n_tok = ops.groupby(columns.CONTEXT)[columns.ROUND].nunique()
    segs = np.zeros((n_d, len(S)))
    timed = ops[ops[columns.STAGE] != stages.HOST]
    for (c, s), n in timed.groupby([columns.CONTEXT, columns.STAGE]).size().items():
        segs[di[str(c)], S.get(s, S[stages.OTHER])] += n / max(1, int(n_tok.get(c, 1)))
    delta, extra = np.full(n_r, np.nan), np.zeros(n_r)
    cal = by_pass[columns.CALIBRATION]
    prof_splits = by_pass[columns.PROFILED].set_index([columns.CONTEXT, columns.ROUND])[columns.SPLITS]
    for row in cal.itertuples(index=False):
        r, c = getattr(row, columns.ROUND), str(getattr(row, columns.CONTEXT))
        base = prof[ri[r], di[c]]
        if not np.isnan(base) and (c, r) in prof_splits.index:
            delta[ri[r]] = getattr(row, columns.WALL_US) / 1000.0 - base
            extra[ri[r]] = getattr(row, columns.SPLITS) - int(prof_splits.loc[(c, r)])
    ops_st, ops_sg, at = np.full((n_r, len(S)), np.nan), np.zeros((n_r, len(S))), np.full(n_r, -1)
    for row in (calib if calib is not None else pd.DataFrame()).itertuples(index=False):
        i, c = ri.get(getattr(row, columns.ROUND)), str(getattr(row, columns.CONTEXT))
        if i is None or c not in di:
            continue
        k = S.get(getattr(row, columns.STAGE), S[stages.OTHER])
        ops_st[i] = np.nan_to_num(ops_st[i])
        ops_st[i, k] += getattr(row, columns.TIME_US) / 1000.0
        ops_sg[i, k] += getattr(row, columns.SEGMENTS)
        at[i] = di[c]
    return RoundData(labels, depths, rounds, plain, prof, st, segs, delta, extra, ops_st, ops_sg, at)


def boot_indices(n_rounds: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """(n_boot, n_rounds) resampled round indices; the same rows serve every depth (pairing)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_rounds, size=(n_boot, n_rounds))


def interval(samples: np.ndarray, axis: int = 0, level: float = 0.95) -> np.ndarray:
    """Percentile interval (95 % unless ``level``) along ``axis`` (low, high stacked first); NaN samples are left
    out."""
    q = [round(50 * (1 - level), 9), round(50 * (1 + level), 9)]  # 2.5 and 97.5 exactly at 95 %
    if not np.isnan(samples).any():
        return np.percentile(samples, q, axis=axis)
    with warnings.catch_warnings():  # an all-NaN column (a stage no resample saw) gives NaN, said elsewhere
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(samples, q, axis=axis)


def mean_se(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean along ``axis`` and its standard error (sd / sqrt(n)), over the finite values only; the se is NaN where
    fewer than two are finite. For figures over independent units (repeats, blocks, sweeps), never over tokens."""
    x = np.where(np.isfinite(x), x, np.nan)
    n = (~np.isnan(x)).sum(axis=axis)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m, sd = np.nanmean(x, axis=axis), np.nanstd(x, axis=axis, ddof=1)
    return m, np.where(n > 1, sd / np.sqrt(np.maximum(n, 1)), np.nan)


def trimmed_mean(x: np.ndarray, frac: float = 0.2) -> np.ndarray:
    """Mean along axis 0 of what is left after dropping the lowest and highest ``frac`` of the non-NaN values
    (a 20 % trimmed mean: robust to outlier tokens like a median, smooth across modes like a mean)."""
    s = np.sort(x, axis=0)  # NaN sorts last
    n = (~np.isnan(s)).sum(axis=0)
    k = np.floor(frac * n).astype(int)
    i = np.arange(s.shape[0]).reshape(-1, *([1] * (s.ndim - 1)))
    keep = (i >= k) & (i < n - k)
    with np.errstate(all="ignore"):
        return np.where(keep, s, 0.0).sum(axis=0) / keep.sum(axis=0)


SPLIT_COST_ESTIMATOR = "20 % trimmed mean of per-round costs"


def split_cost_ms(delta: np.ndarray, extra: np.ndarray) -> float | np.ndarray:
    """Cost of one graph split (ms): the 20 % trimmed mean over rounds of each round's wall difference / its extra
    splits, along the last axis (B resampled rows of rounds give B costs); NaN without calibration tokens. Not the
    mean: a lost core hitting one of the round's two tokens moves a 40-round mean by tens of percent (NOTES §24)."""
    with np.errstate(all="ignore"):
        per = np.where(~np.isnan(delta) & (extra > 0), delta / np.where(extra > 0, extra, 1), np.nan)
        out = trimmed_mean(np.moveaxis(per, -1, 0))
    return float(out) if np.ndim(out) == 0 else out


def calibrated(rd: RoundData, cost_ms: float) -> np.ndarray:
    """(R, D, S) stage ms minus segments x split cost (never below zero); raw when the cost is unknown."""
    if np.isnan(cost_ms):
        return rd.stage
    return np.maximum(rd.stage - rd.segs[None, :, :] * max(cost_ms, 0.0), 0.0)


def _shares(x: np.ndarray) -> np.ndarray:
    """(..., n, S) stage ms over n rounds -> (..., S) % of their summed stage ms (a ratio of means)."""
    with np.errstate(all="ignore"):
        return 100.0 * x.sum(axis=-2) / x.sum(axis=(-2, -1))[..., None]


MODE_MIN_ROUNDS = 5  # calibration rounds at a depth below which the mode comparison gets no interval


def mode_diff(rd: RoundData, cost_ms: float, d: int, idx: np.ndarray | None = None,
              boot_cost: np.ndarray | None = None, ops_calibrated: bool = True) -> dict:
    """Ops- against stages-mode stage shares at depth index ``d``, paired by round: the rounds whose calibration
    token (every node timed) was at this depth, against the same rounds' stages-mode token, both calibrated with
    the run's one split cost (the ops token raw with ``ops_calibrated=False``). ContextSummary fields
    (``ops_rounds``, ``ops_pct_calibrated``, ``mode_diff_pp`` = ops - stages); empty without such rounds. The
    interval (``mode_diff_pp_ci``, from MODE_MIN_ROUNDS rounds) resamples all rounds (``idx``, B x R) with the
    split cost re-estimated in each (``boot_cost``): ~1,700 of the ops token's splits are in one stage, so the
    cost's own uncertainty moves its share more than the rounds at this depth do."""
    if rd.ops_stage is None or np.isnan(cost_ms):
        return {}
    at = (rd.calib_depth == d) & (rd.calib_extra > 0) & ~np.isnan(rd.stage[:, d, 0])
    if not at.any():
        return {}
    ops_raw, st_raw = np.nan_to_num(rd.ops_stage), np.nan_to_num(rd.stage[:, d])

    def sides(w: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (..., R) weights, (...) costs
        c = np.maximum(np.nan_to_num(c), 0.0)[..., None, None]
        ops = np.maximum(ops_raw - rd.ops_segs * c, 0.0) if ops_calibrated else ops_raw  # broadcast by the weights
        return _shares(ops * w[..., None]), _shares(np.maximum(st_raw - rd.segs[d] * c, 0.0) * w[..., None])

    ops_pct, st_pct = sides(at.astype(float), np.asarray(cost_ms))
    out = {"ops_rounds": int(at.sum()), "ops_pct_calibrated": {s: float(ops_pct[i]) for s, i in S.items()},
           "mode_diff_pp": {s: float(ops_pct[i] - st_pct[i]) for s, i in S.items()}}
    if at.sum() >= MODE_MIN_ROUNDS:
        idx = boot_indices(len(rd.rounds)) if idx is None else idx
        if boot_cost is None:
            boot_cost = split_cost_ms(rd.calib_delta[idx], rd.calib_extra[idx])
        w = np.zeros(idx.shape)
        np.add.at(w, (np.arange(len(idx))[:, None], idx), 1.0)  # times each round was drawn
        b_ops, b_st = sides(w * at, boot_cost)
        lo, hi = interval(b_ops - b_st)
        out["mode_diff_pp_ci"] = {s: (float(lo[i]), float(hi[i])) for s, i in S.items()}
    return out


def _ci(x: np.ndarray) -> tuple[float, float]:
    lo, hi = interval(x)
    return (float(lo), float(hi))


def summarize(rd: RoundData, n_boot: int = N_BOOT) -> tuple[list[dict], float, tuple[float, float]]:
    """Per-context statistics (dict fields of record.ContextSummary), split cost (us) and its interval."""
    idx = boot_indices(len(rd.rounds), n_boot)
    cost = split_cost_ms(rd.calib_delta, rd.calib_extra)
    boot_cost = split_cost_ms(rd.calib_delta[idx], rd.calib_extra[idx])
    cal = calibrated(rd, cost)
    m = {k: np.nanmean(v, axis=0) for k, v in (("plain", rd.plain), ("prof", rd.profiled), ("st", rd.stage),
                                               ("cal", cal))}
    b_plain, b_prof = np.nanmean(rd.plain[idx], axis=1), np.nanmean(rd.profiled[idx], axis=1)  # (B, D)
    b_st = np.nanmean(rd.stage[idx], axis=1)  # (B, D, S)
    b_cal = np.stack([np.nanmean(calibrated(rd, c)[i], axis=0) for c, i in zip(boot_cost, idx, strict=True)])
    out = []
    for d, label in enumerate(rd.labels):
        plain = rd.plain[:, d][~np.isnan(rd.plain[:, d])]
        st_ms = {s: float(m["st"][d, i]) for s, i in S.items()}
        cal_ms = {s: float(m["cal"][d, i]) for s, i in S.items()}
        prof_ms, cal_total = float(m["prof"][d]), sum(cal_ms.values())
        out.append({
            "context": label, "depth": rd.depths[d], "timed_tokens": int(len(plain)),
            "plain_ms": float(m["plain"][d]), "plain_ms_median": float(np.median(plain)),
            "plain_ms_std": float(np.std(plain, ddof=1)) if len(plain) > 1 else 0.0,
            "plain_ms_ci": _ci(b_plain[:, d]), "profiled_ms": prof_ms,
            "overhead_ratio": prof_ms / float(m["plain"][d]), "overhead_ratio_ci": _ci(b_prof[:, d] / b_plain[:, d]),
            "stage_ms": st_ms, "stage_ms_ci": {s: _ci(b_st[:, d, i]) for s, i in S.items()},
            "stage_pct": {s: 100.0 * v / prof_ms for s, v in st_ms.items()},
            **({} if np.isnan(cost) else {  # no calibration tokens: nothing calibrated (readers fall back to raw)
                "stage_ms_calibrated": cal_ms, "stage_ms_calibrated_ci": {s: _ci(b_cal[:, d, i]) for s, i in S.items()},
                "stage_pct_calibrated": {s: 100.0 * v / cal_total for s, v in cal_ms.items()} if cal_total else {},
                "calibrated_sum_pct": 100.0 * cal_total / float(m["plain"][d])}),
            "covered_pct": 100.0 * (sum(st_ms.values()) - st_ms[stages.HOST]) / prof_ms,
            "attributed_pct": 100.0 * sum(st_ms.values()) / prof_ms, **mode_diff(rd, cost, d, idx, boot_cost),
        })
    cost_us = cost * 1000.0
    return out, cost_us, (_ci(boot_cost * 1000.0) if not np.isnan(cost) else (float("nan"), float("nan")))
