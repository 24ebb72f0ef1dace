"""Plots of a device compare (``analysis.compare``'s table): standalone matplotlib Figures
(``make_figures``, no pyplot state), written as PNG + SVG by ``write_plots``.

- ``compare_stage_ms``: grouped bars of stage ms/token, one panel per context, one bar per device group.
- ``compare_stage_share``: stage share of the calibrated stage sum (~ the plain decode time) vs depth, one panel
  per main stage, one line per group.
- ``compare_roofline``: achieved bandwidth as a fraction of the device's measured read bandwidth
  (ffn, attn_kv and the whole token), one panel per context.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.plots import save_figure
from harness import stages
from harness.errors import OutputError

log = logging.getLogger(__name__)
MAX_GROUPS = 16  # more groups than this: the first ones (table order) are plotted, the rest logged


def _keys(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["device"] + " | " + df["group"]))[:MAX_GROUPS]


def _contexts(df: pd.DataFrame) -> list[tuple[int, str]]:
    return sorted({(int(d), str(c)) for d, c in zip(df["depth"], df["context"], strict=True)})


def _panels(n: int, width: float, height: float = 3.4):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    width = min(width, 8.0)
    fig = Figure(figsize=(width * cols, height * rows + 0.25 * (1 + MAX_GROUPS // 8)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _legend(fig, handles, labels) -> None:
    fig.legend(handles, labels, loc="outside lower center", ncol=min(2, len(labels)), fontsize=8, frameon=False)


def _maybe_log(ax, totals) -> None:
    """Log y when the groups' total ms/token differ more than 20x (e.g. a tiny twin next to a real model)."""
    v = np.asarray([x for x in totals if np.isfinite(x) and x > 0])
    if len(v) and v.max() / v.min() > 20:
        ax.set_yscale("log")
        ax.set_ylabel("ms / token (log)")


def plot_stage_ms(df: pd.DataFrame) -> Figure:
    keys = _keys(df)
    shown = [s for s in stages.STAGES if (df[f"{s}_ms"].fillna(0) > 0).any()]
    ctxs = _contexts(df)
    fig, axes = _panels(len(ctxs), max(4.5, 0.12 * len(shown) * len(keys) + 1.5))
    width = 0.8 / max(1, len(keys))
    x = np.arange(len(shown))
    for ax, (depth, ctx) in zip(axes, ctxs, strict=True):
        sub = df[(df["depth"] == depth) & (df["context"] == ctx)]
        totals = []
        for i, k in enumerate(keys):
            r = sub[sub["device"] + " | " + sub["group"] == k]
            vals = [float(r[f"{s}_ms"].iloc[0]) if len(r) else np.nan for s in shown]
            totals.append(np.nansum(vals))
            ax.bar(x + (i - (len(keys) - 1) / 2) * width, vals, width, label=k, color=f"C{i % 10}")
        ax.set_xticks(x, shown, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ms / token")
        _maybe_log(ax, totals)
        ax.set_title(f"context {ctx} (depth {depth})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    _legend(fig, *axes[0].get_legend_handles_labels())
    fig.suptitle("Stage time per decoded token")
    return fig


def plot_stage_share(df: pd.DataFrame) -> Figure:
    keys = _keys(df)
    shown = [s for s in stages.STAGES if (df[f"{s}_pct"].fillna(0) >= 1.0).any()]
    fig, axes = _panels(len(shown), 4.2)
    raw = not df["calibrated"].all()  # a run without calibration pooled in: its shares are raw
    for ax, s in zip(axes, shown, strict=True):
        for i, k in enumerate(keys):
            r = df[df["device"] + " | " + df["group"] == k].sort_values("depth")
            ax.plot(r["depth"], r[f"{s}_pct"], marker="o", ms=4, label=k, color=f"C{i % 10}")
        ax.set_xscale("log")
        depths = sorted(df["depth"].unique())
        ax.set_xticks(depths, [str(d) for d in depths], fontsize=7, rotation=45)
        ax.minorticks_off()
        ax.set_xlabel("KV depth (tokens)")
        ax.set_ylabel("% of stage sum (raw where uncalibrated)" if raw else "% of calibrated stage sum")
        ax.set_title(s, fontsize=10)
        ax.grid(alpha=0.3)
    _legend(fig, *axes[0].get_legend_handles_labels())
    fig.suptitle("Stage share vs context depth")
    return fig


def plot_roofline(df: pd.DataFrame) -> Figure:
    has_bw = df["bandwidth_gbps"].notna()
    keys = [k for k in _keys(df) if has_bw[df["device"] + " | " + df["group"] == k].any()]
    ctxs = _contexts(df)
    parts = (("ffn", "ffn_gbps"), ("attn_kv", "attn_kv_gbps"), ("whole token", None))
    fig, axes = _panels(len(ctxs), max(4.5, 0.15 * len(parts) * len(keys) + 1.5))
    width = 0.8 / max(1, len(keys))
    x = np.arange(len(parts))
    for ax, (depth, ctx) in zip(axes, ctxs, strict=True):
        sub = df[(df["depth"] == depth) & (df["context"] == ctx)]
        any_bw = bool((sub["bandwidth_gbps"].notna() & sub["x_roofline"].notna()).any())
        for i, k in enumerate(keys):
            r = sub[sub["device"] + " | " + sub["group"] == k]
            if r.empty:
                vals = [np.nan] * len(parts)
            else:
                r = r.iloc[0]
                vals = [r[c] / r["bandwidth_gbps"] if c else 1.0 / r["x_roofline"] for _, c in parts]
            ax.bar(x + (i - (len(keys) - 1) / 2) * width, vals, width, label=k, color=f"C{i % 10}")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlim(-0.5, len(parts) - 0.5)
        ax.set_xticks(x, [p for p, _ in parts], fontsize=8)
        ax.set_ylabel("achieved / measured bandwidth")
        ax.set_title(f"context {ctx} (depth {depth})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if not any_bw:
            ax.text(0.5, 0.5, "no measured bandwidth or read model\n(--no-probe sweeps, recorded runs)",
                    transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.4")
            ax.set_ylim(0, 1.2)
    if keys:
        _legend(fig, *axes[0].get_legend_handles_labels())
    fig.suptitle("Achieved read bandwidth as a fraction of the device roofline")
    return fig


def make_figures(df: pd.DataFrame) -> dict[str, Figure]:
    n = df[["device", "group"]].drop_duplicates().shape[0]
    if n > MAX_GROUPS:
        log.warning("plots show the first %d of %d device groups (table order)", MAX_GROUPS, n)
    return {"compare_stage_ms": plot_stage_ms(df), "compare_stage_share": plot_stage_share(df),
            "compare_roofline": plot_roofline(df)}


def write_plots(df: pd.DataFrame, out_dir: str | os.PathLike) -> list[Path]:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the plot folder ({e.strerror}): {out}") from None
    return [p for stem, fig in make_figures(df).items() for p in save_figure(fig, out, stem, dpi=110,
                                                                             bbox_inches="tight")]
