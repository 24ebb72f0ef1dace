"""Per-stage slope of decode time against KV depth: ms per 1,000 KV tokens with a 95 % confidence interval.

Every timed token is one point: its per-stage time (the sum of ``time_us`` over the token's
segments of that stage; 0 when the token has none) against the depth it was decoded at. The
fit is ordinary least squares; the interval uses Student's t with n - 2 degrees of freedom,
computed here with the regularized incomplete beta function (no scipy).

    from analysis.slope import stage_slopes
    slopes = stage_slopes(run.ops)   # index: stage; columns below
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from harness import columns, stages

TOKEN_KEY = (columns.CONTEXT, columns.REPEAT, columns.STEP)
NEEDED_COLUMNS = [columns.CONTEXT, columns.DEPTH, columns.REPEAT, columns.STEP, columns.STAGE, columns.TIME_US]
RUN = "run"  # optional extra token-key column when several runs are pooled
SLOPE_COLUMNS = ["slope_ms_per_1k", "ci95_low_ms_per_1k", "ci95_high_ms_per_1k", "intercept_ms", "n_tokens",
                 "n_depths"]


@dataclass(frozen=True)
class SlopeFit:
    slope_ms_per_1k: float
    ci95_low_ms_per_1k: float
    ci95_high_ms_per_1k: float
    intercept_ms: float
    n_tokens: int
    n_depths: int


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
            last = d * c
        if abs(last - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t (0.5 < p < 1) by bisection on the CDF."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def fit_slope(depth: np.ndarray, ms: np.ndarray) -> SlopeFit:
    """Least-squares ms = a + b * depth; slope and its 95 % CI in ms per 1,000 KV tokens (NaN when undefined)."""
    x, y = np.asarray(depth, dtype=float), np.asarray(ms, dtype=float)
    n, n_depths = len(x), int(len(np.unique(x)))
    nan = float("nan")
    if n_depths < 2:
        return SlopeFit(nan, nan, nan, float(y.mean()) if n else nan, n, n_depths)
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    b = float(((x - xm) * (y - ym)).sum() / sxx)
    a = float(ym - b * xm)
    lo = hi = nan
    if n > 2:
        rss = float(((y - a - b * x) ** 2).sum())
        half = t_quantile(0.975, n - 2) * math.sqrt(rss / (n - 2) / sxx)
        lo, hi = (b - half) * 1000.0, (b + half) * 1000.0
    return SlopeFit(b * 1000.0, lo, hi, a, n, n_depths)


def token_stage_ms(ops: pd.DataFrame) -> pd.DataFrame:
    """One row per timed token (key columns + depth), one column per stage in ms; 0 where a token lacks a stage."""
    key = [c for c in (RUN, *TOKEN_KEY) if c in ops.columns]
    wide = ops.pivot_table(index=[*key, columns.DEPTH], columns=columns.STAGE, values=columns.TIME_US,
                           aggfunc="sum", fill_value=0.0, observed=True) / 1000.0
    wide.columns = [str(c) for c in wide.columns]
    return wide.reset_index()


def fit_tokens(tokens: pd.DataFrame) -> pd.DataFrame:
    """Slopes per stage from ``token_stage_ms`` output (index: stage, columns: SLOPE_COLUMNS)."""
    shown = [s for s in stages.STAGES if s in tokens.columns]
    shown += sorted(c for c in tokens.columns if c not in shown and c not in (RUN, *TOKEN_KEY, columns.DEPTH))
    rows = {s: vars(fit_slope(tokens[columns.DEPTH].to_numpy(), tokens[s].to_numpy())) for s in shown}
    return pd.DataFrame.from_dict(rows, orient="index", columns=SLOPE_COLUMNS).rename_axis(columns.STAGE)


GROUP = "group_id"  # fit_groups: which group a token belongs to


def _tq(df: np.ndarray) -> np.ndarray:
    out = np.full(df.shape, np.nan)
    for d in np.unique(df[df > 0]):
        out[df == d] = t_quantile(0.975, float(d))
    return out


def fit_groups(tokens: pd.DataFrame, group: np.ndarray) -> pd.DataFrame:
    """``fit_tokens`` for many groups at once (token i belongs to ``group[i]``), vectorised: the same
    least squares and t interval as ``fit_slope``, per group and stage. Rows (group order, then stage
    order) only for the stages that have time in the group. Columns: GROUP, stage, SLOPE_COLUMNS."""
    shown = [s for s in stages.STAGES if s in tokens.columns]
    shown += sorted(c for c in tokens.columns if c not in shown and c not in (RUN, *TOKEN_KEY, columns.DEPTH))
    ids, inv = np.unique(np.asarray(group), return_inverse=True)
    k = len(ids)
    x = tokens[columns.DEPTH].to_numpy(dtype=float)
    n = np.bincount(inv, minlength=k).astype(float)
    xm = np.bincount(inv, x, k) / n
    dx = x - xm[inv]
    sxx = np.bincount(inv, dx * dx, k)
    n_depths = pd.Series(x).groupby(inv).nunique().to_numpy()
    ok = n_depths >= 2
    tq = _tq(n - 2)
    parts = []
    for s in shown:
        y = tokens[s].to_numpy(dtype=float)
        ym = np.bincount(inv, y, k) / n
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.where(ok, np.bincount(inv, dx * (y - ym[inv]), k) / sxx, np.nan)
            a = np.where(ok, ym - b * xm, ym)
            rss = np.bincount(inv, (y - a[inv] - b[inv] * x) ** 2, k)
            half = np.where(ok & (n > 2), tq * np.sqrt(rss / (n - 2) / sxx), np.nan)
        parts.append(pd.DataFrame({GROUP: ids, columns.STAGE: s, "slope_ms_per_1k": b * 1000.0,
                                   "ci95_low_ms_per_1k": (b - half) * 1000.0,
                                   "ci95_high_ms_per_1k": (b + half) * 1000.0,
                                   "intercept_ms": a, "n_tokens": n.astype(int), "n_depths": n_depths.astype(int),
                                   "_order": np.arange(k) * len(shown) + len(parts),
                                   "_time": np.bincount(inv, y != 0, k) > 0}))
    if not parts:
        return pd.DataFrame(columns=[GROUP, columns.STAGE, *SLOPE_COLUMNS])
    out = pd.concat(parts, ignore_index=True).sort_values("_order", ignore_index=True)
    return out[out["_time"]].drop(columns=["_order", "_time"]).reset_index(drop=True)


def stage_slopes(ops_df: pd.DataFrame) -> pd.DataFrame:
    """Per-stage ms/token slope against depth, over all timed tokens of an ops table (one run, or several
    with a ``run`` column). Index: stage; columns: slope_ms_per_1k, ci95_low_ms_per_1k, ci95_high_ms_per_1k,
    intercept_ms, n_tokens, n_depths. Slope and CI are NaN when the table has fewer than 2 depths (CI also
    when fewer than 3 tokens)."""
    missing = [c for c in NEEDED_COLUMNS if c not in ops_df.columns]
    if missing:
        raise ValueError(f"ops table lacks columns {missing}")
    if ops_df.empty:
        return pd.DataFrame(columns=SLOPE_COLUMNS).rename_axis(columns.STAGE)
    return fit_tokens(token_stage_ms(ops_df))
