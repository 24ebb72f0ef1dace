"""What a fitted ``analysis.timemodel.TimeModel`` says: ms/token and shares at any depth, the crossover
depths, and predicted vs measured on the run's own depths (the validation), all with bootstrap intervals.

    tm, dm = fit_run(store.read_run(path), fit_depths=[13, 172, 658, 2048])
    p = predict(tm, [4096, 8192]); xs = crossovers(tm); val = validate(tm, dm)

Shares are of the calibrated stage sum (as ``ContextSummary.stage_pct_calibrated``: it adds up to the plain
ms/token; of the raw stage sum for a run without calibration); a crossover is the smallest depth below the
model's context length at which attention over the KV cache reaches 25 % or 50 % of it, or the FFN's time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.timemodel import ATTN, FFN, AttnFacts, DepthMeans, TimeModel, depth_means, fit
from harness import stages, stats, store
from harness.errors import InputError, UsageError

CRITERIA = (("attn_25pct", "attn_kv reaches 25 % of the stage sum"),  # calibrated: adds up to decode's ms/token
            ("attn_50pct", "attn_kv reaches 50 % of the stage sum"), ("attn_eq_ffn", "attn_kv reaches ffn"))
NO_CONTEXT_LENGTH_LIMIT = 1 << 17  # search limit when the model does not say its context length


def check_record(rec, path: str) -> None:
    """InputError unless the run's rounds can carry a time model: measured (not the reference), round-robin."""
    if rec.reference:
        raise InputError(f"a reference run (recorded figures, no per-round measurements): no time model: {path}")
    if rec.params.order != "round-robin":
        raise InputError(f"the run was measured in {rec.params.order} order, not round-robin: its depths are not "
                         f"paired by round, so drift would enter the fit; measure it again: {path}")
    if not rec.tokens:
        raise InputError(f"the run has no per-round measurements: {path}")


def fit_run(run: store.Run, fit_depths=None, n_boot: int = stats.N_BOOT, seed: int = 0) -> tuple[TimeModel, DepthMeans]:
    """The time model of one run, fitted on ``fit_depths`` (default: all its depths), and its depth means.
    InputError (one line) when the run cannot carry one; UsageError for fitting depths it did not measure."""
    rec, path = run.record, run.path
    check_record(rec, path)
    if run.ops.empty:
        raise InputError(f"the run has no per-round measurements: {path}")
    facts = AttnFacts.from_run(rec)
    rd = stats.round_data(run.ops, run.tokens)
    if len(rd.depths) < 2:
        raise InputError(f"the run measured {len(rd.depths)} depth; the time model needs at least 2: {path}")
    if fit_depths is not None:
        missing = sorted(set(fit_depths) - set(rd.depths))
        if missing:
            raise UsageError(f"fitting depth(s) {', '.join(map(str, missing))} not measured in the run "
                             f"(its depths: {', '.join(map(str, rd.depths))})")
        if len(set(fit_depths)) < 2:
            raise UsageError("--fit-depths needs at least 2 different depths")
    dm = depth_means(rd, n_boot, seed)
    return fit(dm, facts, fit_depths), dm


def limit_words(known: bool) -> str:
    """What the depth limit is: the model's context length, or ``NO_CONTEXT_LENGTH_LIMIT`` when it gives none."""
    return "the model's context length" if known else "the search limit (no context length known)"


def search_limit(facts: AttnFacts) -> int:
    """Depths searched for crossovers: below the model's context length (a depth L needs L + 1 cells)."""
    return facts.context_length or NO_CONTEXT_LENGTH_LIMIT


@dataclass(frozen=True, eq=False)
class Prediction:
    depths: np.ndarray  # (N,)
    stage: np.ndarray  # (N, S) ms/token, calibrated
    stage_ci: np.ndarray  # (2, N, S)
    plain: np.ndarray  # (N,)
    plain_ci: np.ndarray  # (2, N)
    share: np.ndarray  # (N, S) % of the stage sum
    share_ci: np.ndarray  # (2, N, S)
    kv_mib: np.ndarray  # (N,) MiB of KV cache read per token (the read model's cells x bytes)
    regimes: tuple[str, ...]  # per depth: the layers in each kernel regime

    def rows(self) -> list[dict]:
        out = []
        for i, d in enumerate(self.depths):
            row = {"depth": int(d), "plain_ms": float(self.plain[i]), "plain_ms_ci": _pair(self.plain_ci[:, i]),
                   "kv_read_mib": float(self.kv_mib[i]), "regimes": self.regimes[i]}
            for s, j in stats.S.items():
                row[f"{s}_ms"], row[f"{s}_ms_ci"] = float(self.stage[i, j]), _pair(self.stage_ci[:, i, j])
                row[f"{s}_pct"], row[f"{s}_pct_ci"] = float(self.share[i, j]), _pair(self.share_ci[:, i, j])
            out.append(row)
        return out


def _pair(x) -> list[float]:
    return [float(x[0]), float(x[1])]


def predict(tm: TimeModel, depths) -> Prediction:
    depths = np.asarray(depths, dtype=int)
    count, mib = tm.facts.layer_terms(depths)
    x = tm.design(depths)
    stage = np.repeat(tm.const[None], len(depths), 0)
    stage[:, ATTN] = x @ tm.theta
    boot = np.repeat(tm.const_boot[:, None], len(depths), 1)  # (B, N, S)
    boot[:, :, ATTN] = tm.theta_boot @ x.T
    with np.errstate(all="ignore"):
        share, share_boot = 100 * stage / stage.sum(1, keepdims=True), 100 * boot / boot.sum(2, keepdims=True)
    regs = tm.facts.all_regimes()
    names = tuple(" + ".join(f"{int(n)} {r}" for r, n in zip(regs, row, strict=True) if n) for row in count)
    return Prediction(depths, stage, stats.interval(boot), stage.sum(1) + tm.offset,
                      stats.interval(boot.sum(2) + tm.offset_boot[:, None]), share, stats.interval(share_boot),
                      mib.sum(1), names)


@dataclass(frozen=True)
class Crossover:
    key: str
    label: str
    depth: int | None  # None: not below the search limit
    ci: tuple[int | None, int | None]  # 95 % bootstrap interval; None: beyond the limit
    crossed_pct: float  # % of bootstrap resamples that cross below the limit
    limit: int
    limit_known: bool = True  # the model's context length; else NO_CONTEXT_LENGTH_LIMIT

    @property
    def limit_text(self) -> str:
        return limit_words(self.limit_known)

    def text(self) -> str:
        return f"{self.depth:,}" if self.depth is not None else f"beyond {self.limit_text} ({self.limit:,})"

    def ci_text(self) -> str:
        lo, hi = (f"{v:,}" if v is not None else "beyond" for v in self.ci)
        return f"[{lo}, {hi}]"

    def to_dict(self) -> dict:
        return {"key": self.key, "label": self.label, "depth": self.depth, "ci": list(self.ci),
                "crossed_pct": self.crossed_pct, "limit": self.limit}


def _thresholds(const: np.ndarray) -> np.ndarray:
    """(..., 3) attn_kv ms at which each criterion is met: share >= 25 % <=> attn >= rest / 3; 50 %: rest."""
    rest = const.sum(-1) - const[..., ATTN]
    return np.stack([rest / 3.0, rest, const[..., FFN]], axis=-1)


def crossovers(tm: TimeModel, chunk: int = 2048) -> list[Crossover]:
    """The smallest depth (scanned one by one up to the model's context length) where each criterion holds,
    for the fit and for every bootstrap resample."""
    limit = search_limit(tm.facts)
    theta = np.vstack([tm.theta[None], tm.theta_boot])  # row 0: the fit
    thr = np.vstack([_thresholds(tm.const)[None], _thresholds(tm.const_boot)])
    valid = ~(np.isnan(theta).any(1) | np.isnan(thr).any(1))
    first = np.full(thr.shape, np.inf)
    for lo in range(0, limit, chunk):
        depths = np.arange(lo, min(lo + chunk, limit))
        attn = tm.design(depths) @ theta.T  # (n, 1 + B)
        for k in range(thr.shape[1]):
            hit = attn >= thr[None, :, k]
            new = hit.any(0) & np.isinf(first[:, k])
            if new.any():
                first[new, k] = depths[hit[:, new].argmax(0)]
        if np.isfinite(first[valid]).all():
            break
    out = []
    for k, (key, label) in enumerate(CRITERIA):
        b = first[1:, k][valid[1:]]
        ci = np.quantile(b, [0.025, 0.975], method="inverted_cdf") if len(b) else [np.inf, np.inf]
        out.append(Crossover(key, label, _depth(first[0, k]), (_depth(ci[0]), _depth(ci[1])),
                             float(100 * np.isfinite(b).mean()) if len(b) else math.nan, limit,
                             bool(tm.facts.context_length)))
    return out


def _depth(v: float) -> int | None:
    return int(v) if np.isfinite(v) else None


VALIDATED = (("plain", "plain ms/token"), (stages.ATTN_KV, "attn_kv ms"), (stages.FFN, "ffn ms"))


def validate(tm: TimeModel, dm: DepthMeans) -> pd.DataFrame:
    """Predicted vs measured at every depth of ``dm``: ``fitted`` marks the fitting depths (in-sample), the
    others are held out. Errors are (predicted - measured) / measured in %, with a 95 % interval from the
    same resampled rounds on both sides (paired)."""
    p = predict(tm, dm.depths)
    x = tm.design(dm.depths)
    boot_attn = tm.theta_boot @ x.T  # (B, D)
    rows = []
    for i, d in enumerate(dm.depths):
        row = {"depth": int(d), "fitted": int(d) in tm.fit_depths}
        for key, _ in VALIDATED:
            if key == "plain":
                meas, meas_b, pred = dm.plain[i], dm.plain_boot[:, i], p.plain[i]
                pred_b = tm.const_boot.sum(1) + boot_attn[:, i] + tm.offset_boot
            else:
                j = stats.S[key]
                meas, meas_b, pred = dm.stage[i, j], dm.stage_boot[:, i, j], p.stage[i, j]
                pred_b = boot_attn[:, i] if j == ATTN else tm.const_boot[:, j]
            with np.errstate(all="ignore"):
                err_b = 100 * (pred_b - meas_b) / meas_b
            lo, hi = stats.interval(err_b)
            m_lo, m_hi = stats.interval(meas_b)
            row.update({f"{key}_measured": float(meas), f"{key}_measured_ci_low": float(m_lo),
                        f"{key}_measured_ci_high": float(m_hi), f"{key}_predicted": float(pred),
                        f"{key}_predicted_ci_low": float(p.plain_ci[0, i] if key == "plain" else p.stage_ci[0, i, j]),
                        f"{key}_predicted_ci_high": float(p.plain_ci[1, i] if key == "plain" else p.stage_ci[1, i, j]),
                        f"{key}_error_pct": float(100 * (pred - meas) / meas) if meas else math.nan,
                        f"{key}_error_ci_low": float(lo), f"{key}_error_ci_high": float(hi)})
        rows.append(row)
    return pd.DataFrame(rows)


def try_fit(run: store.Run, n_boot: int = stats.N_BOOT) -> tuple[TimeModel | None, DepthMeans | None, str]:
    """(model, depth means, '') or (None, None, why not): for figures and the notebook, which go on without one."""
    try:
        tm, dm = fit_run(run, n_boot=n_boot)
    except (InputError, UsageError) as e:
        return None, None, str(e)
    return tm, dm, ""
