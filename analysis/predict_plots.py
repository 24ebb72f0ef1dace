"""The time model's curves (``analysis.timemodel``) drawn over the measured points: a line per stage with
its 95 % bootstrap band, on figures that ``analysis.plots`` makes (stage shares and stage ms against depth)."""

from __future__ import annotations

import numpy as np

from analysis import forecast
from analysis.timemodel import TimeModel
from harness import stages, stats
from harness.record import RunRecord

CURVE_STAGES = (stages.FFN, stages.ATTN_KV)
BAND_ALPHA = 0.15


def curve(tm: TimeModel, depth_max: int, n: int = 200) -> forecast.Prediction:
    """The model's prediction on a depth grid from 0 to ``depth_max`` (kept below the context length)."""
    top = min(max(int(depth_max), 1), forecast.search_limit(tm.facts) - 1)
    return forecast.predict(tm, np.unique(np.linspace(0, top, n).astype(int)))


def fit_label(tm: TimeModel) -> str:
    return f"time model, fit on {', '.join(map(str, tm.fit_depths))}"


def draw_shares(ax, p: forecast.Prediction, colors: dict[str, str], tm: TimeModel) -> None:
    """Dashed predicted shares of the FFN and attention over the KV cache, with bands."""
    for s in CURVE_STAGES:
        j = stats.S[s]
        ax.plot(p.depths, p.share[:, j], ls="--", lw=1.4, color=colors[s], label=f"{s} ({fit_label(tm)})")
        ax.fill_between(p.depths, p.share_ci[0, :, j], p.share_ci[1, :, j], color=colors[s], alpha=BAND_ALPHA, lw=0)


def draw_ms(ax, rec: RunRecord, p: forecast.Prediction, colors: dict[str, str], tm: TimeModel) -> None:
    """ms/token against depth: the measured plain pass, FFN and attention (points, 95 % intervals) and the model."""
    ctxs = rec.sorted_contexts()
    depths = [c.depth for c in ctxs]
    series = [("decode (plain)", "k", p.plain, p.plain_ci, [c.plain_ms for c in ctxs], [c.plain_ms_ci for c in ctxs])]
    for s in CURVE_STAGES:
        j = stats.S[s]
        series.append((s, colors[s], p.stage[:, j], p.stage_ci[:, :, j], [c.stage(s) for c in ctxs],
                       [c.stage_ms_calibrated_ci.get(s) or c.stage_ms_ci.get(s) for c in ctxs]))
    for name, color, pred, band, meas, ci in series:
        ax.plot(p.depths, pred, ls="--", lw=1.4, color=color)
        ax.fill_between(p.depths, band[0], band[1], color=color, alpha=BAND_ALPHA, lw=0)
        err = np.array([[m - c[0], c[1] - m] if c else [0.0, 0.0] for m, c in zip(meas, ci, strict=True)]).T
        ax.errorbar(depths, meas, yerr=np.maximum(err, 0), fmt="o", color=color, ms=4, capsize=2, label=name)
    ax.plot([], [], "k--", lw=1.4, label=f"{fit_label(tm)} (band: 95 %)")
    ax.set_title("ms/token against depth: measured and predicted", fontsize=10)
    ax.set_xlabel("Context depth (tokens)")
    ax.set_ylabel("ms per decoded token")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
