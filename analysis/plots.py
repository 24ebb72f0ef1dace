"""The four FFN-vs-KV figures of a run, as PNG and SVG.

    python -m analysis.plots RUN.parquet -o DIR [--model-variant auto|exact|exact_padded|seed] [--model GGUF]

1. ``read_per_token``: modelled FFN and attention-KV MiB read per token against context depth.
2. ``stage_shares``: measured decode stage shares (of the calibrated stage sum) against depth; with a time model
   (``analysis.timemodel``), its predicted FFN and attention shares as dashed curves with 95 % bands.
3. ``stage_ms``: stacked measured ms/token of every stage per context, with the plain decode time; with
   a time model, a second panel of plain, FFN and attention ms against depth, measured and predicted.
4. ``roofline``: measured stage ms/token against modelled bytes/token per stage, with the
   device's measured read bandwidth as the roofline (omitted, and said so, when not measured).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from analysis import forecast, predict_plots, table
from analysis.readmodel import ReadModel
from analysis.timemodel import TimeModel
from harness import stages, store
from harness.cli import ArgParser, run_cli
from harness.errors import OutputError
from harness.fsutil import atomic_write
from harness.record import RunRecord

log = logging.getLogger(__name__)
MIB = table.MIB
COLORS = {stages.FFN: "#1f77b4", stages.ATTN_KV: "#d62728", stages.KV_STORE: "#ff9896",
          stages.ATTN_PROJ: "#ff7f0e", stages.LM_HEAD: "#2ca02c", stages.GEMMA3N_EXTRA: "#9467bd",
          stages.NORM: "#8c564b", stages.OTHER: "#7f7f7f", stages.HOST: "#bcbd22"}
FIGURES = ("read_per_token", "stage_shares", "stage_ms", "roofline")


def _subplots(figsize: tuple[float, float], ncols: int = 1):
    """A standalone Figure (no pyplot state, no backend switch): Jupyter displays it, savefig writes it."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols)


def _title_suffix(rec: RunRecord) -> str:
    """The run's label, every flag it raised (synthetic, drift, noise, ...) and raw stage figures, for figure titles."""
    tags = [rec.display_label]
    if rec.reference:
        tags.append("recorded reference")
    if rec.synthetic:
        tags.append("synthetic twin")
    if not rec.complete:
        tags.append("INCOMPLETE")
    if not rec.calibrated:
        tags.append("stage ms raw (no calibration)")
    tags += sorted({f"FLAG: {f.kind}" for f in rec.flags if f.kind not in ("synthetic", "incomplete")})
    return "\n" + ", ".join(t for t in tags if t)


def plot_read_per_token(rec: RunRecord, model: ReadModel) -> Figure:
    df = table.build_table(rec, model)
    fig, ax = _subplots(figsize=(7.5, 4.5))
    d_max = max(int(df["input_tokens"].max()) if len(df) else 1, 1)
    grid = np.unique(np.linspace(0, d_max * 1.15, 300).astype(int))
    ffn = [model.bytes_per_token(int(d))[stages.FFN] / MIB for d in grid]
    kv = [model.bytes_per_token(int(d))[stages.ATTN_KV] / MIB for d in grid]
    ax.plot(grid, ffn, color=COLORS[stages.FFN], lw=1.5, label="FFN weights (model)")
    ax.plot(grid, kv, color=COLORS[stages.ATTN_KV], lw=1.5, label="Attention KV cache (model)")
    ax.plot(df["input_tokens"], df["ffn_read_mib"], "o", color=COLORS[stages.FFN], label="FFN at swept contexts")
    ax.plot(df["input_tokens"], df["attn_read_mib"], "o", color=COLORS[stages.ATTN_KV],
            label="Attention KV at swept contexts")
    ax.set_yscale("log")
    ax.set_title(f"Per-token memory read estimate ({model.variant} read model){_title_suffix(rec)}", fontsize=10)
    ax.set_xlabel("Context depth (tokens already in the KV cache)")
    ax.set_ylabel("MiB read per decoded token (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_stage_shares(rec: RunRecord, tm: TimeModel | None = None) -> Figure:
    ctxs = rec.sorted_contexts()
    depths = [c.depth for c in ctxs]
    fig, ax = _subplots(figsize=(7.5, 4.5))
    if tm is not None:
        predict_plots.draw_shares(ax, predict_plots.curve(tm, max(depths) * 1.15), COLORS, tm)
    for s in stages.STAGES:
        vals = [c.share(s) for c in ctxs]
        if not any(v > 0 for v in vals):
            continue
        bold = s in (stages.FFN, stages.ATTN_KV)
        ax.plot(depths, vals, marker="o", lw=2.2 if bold else 1.0, alpha=1.0 if bold else 0.8, color=COLORS[s],
                label=s)
    ax.set_xticks(depths, [f"{c.depth}\n{c.context}" for c in ctxs], fontsize=8)
    ax.set_title(f"Measured decode stage shares{_title_suffix(rec)}", fontsize=10)
    ax.set_xlabel("Context depth (tokens)")
    ax.set_ylabel("% of calibrated stage sum (≈ plain decode)" if rec.calibrated  # else share() gives the profiled
                  else "% of profiled decode wall time")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def plot_stage_ms(rec: RunRecord, tm: TimeModel | None = None) -> Figure:
    ctxs = rec.sorted_contexts()
    labels = [f"{c.context}\n({c.depth})" for c in ctxs]
    x = np.arange(len(ctxs))
    if tm is not None:
        fig, (ax, ax2) = _subplots(figsize=(13.5, 4.5), ncols=2)
        predict_plots.draw_ms(ax2, rec, predict_plots.curve(tm, max(c.depth for c in ctxs) * 1.15), COLORS, tm)
    else:
        fig, ax = _subplots(figsize=(7.5, 4.5))
    bottom = np.zeros(len(ctxs))
    for s in stages.STAGES:
        vals = np.array([c.stage(s) for c in ctxs])
        if not (vals > 0).any():
            continue
        ax.bar(x, vals, 0.6, bottom=bottom, color=COLORS[s], label=s)
        bottom += vals
    ax.plot(x, [c.plain_ms for c in ctxs], "k_", markersize=30, mew=2, label="decode (plain pass)")
    ax.set_xticks(x, labels)
    ax.set_title(f"Measured ms/token by stage{_title_suffix(rec)}", fontsize=10)
    ax.set_xlabel("Context (depth in tokens)")
    ax.set_ylabel("ms per decoded token")
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_roofline(rec: RunRecord, model: ReadModel) -> Figure:
    sb = table.stage_bytes_table(rec, model)
    sb = sb[(sb["bytes_read"] > 0) & (sb["measured_ms"] > 0)]
    bw = rec.bandwidth_gbps
    fig, ax = _subplots(figsize=(7.5, 4.8))
    markers = "osD^v<>p*h"
    ctx_order = list(dict.fromkeys(sb.sort_values("depth")["context"]))
    for s in stages.STAGES:
        part = sb[sb["stage"] == s]
        for _, r in part.iterrows():
            ax.scatter(r["bytes_read"] / MIB, r["measured_ms"], color=COLORS[s],
                       marker=markers[ctx_order.index(r["context"]) % len(markers)], s=40, zorder=3)
        if len(part):
            ax.scatter([], [], color=COLORS[s], marker="o", label=s)
    for i, c in enumerate(ctx_order):
        ax.scatter([], [], color="k", marker=markers[i % len(markers)], label=f"context {c}")
    if bw and len(sb):
        xs = np.geomspace(sb["bytes_read"].min() / MIB / 2, sb["bytes_read"].max() / MIB * 2, 50)
        ax.plot(xs, xs * MIB / (bw * 1e9) * 1e3, "k--", lw=1, label=f"roofline {bw:.1f} GB/s")
        note = ""
    else:
        note = "; no bandwidth measured: no roofline"
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(f"Stage time vs modelled bytes ({model.variant} read model){_title_suffix(rec)}{note}", fontsize=10)
    ax.set_xlabel("Modelled MiB read per token (log)")
    ax.set_ylabel("Measured ms per token (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


def make_figures(rec: RunRecord, model: ReadModel, tm: TimeModel | None = None) -> dict[str, Figure]:
    """The four figures; ``tm`` (``forecast.fit_run``/``try_fit``) adds the time model's curves."""
    return {"read_per_token": plot_read_per_token(rec, model), "stage_shares": plot_stage_shares(rec, tm),
            "stage_ms": plot_stage_ms(rec, tm), "roofline": plot_roofline(rec, model)}


def save_figure(fig: Figure, d: Path, name: str, **savefig) -> list[Path]:
    """``fig`` as d/name.png and d/name.svg, each a temp file renamed into place (never half a figure under the
    final name); OutputError (one line) when one cannot be written."""
    written = []
    for ext in ("png", "svg"):
        p = d / f"{name}.{ext}"
        try:
            atomic_write(p, lambda tmp, ext=ext: fig.savefig(tmp, format=ext, **savefig), overwrite=True)
        except OSError as e:
            raise OutputError(f"could not write {p}: {e.strerror or e}") from None
        written.append(p)
    return written


def write_plots(rec: RunRecord, model: ReadModel, out_dir: str | Path, tm: TimeModel | None = None) -> list[Path]:
    d = store.check_out_dir(out_dir, hard_links=False)  # figures are replaced whole by a rename
    return [p for name, fig in make_figures(rec, model, tm).items() for p in save_figure(fig, d, name, dpi=120)]


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="python -m analysis.plots", description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a run Parquet file")
    ap.add_argument("-o", "--out", required=True, help="output folder for the PNG and SVG files")
    ap.add_argument("--model-variant", default="auto", choices=table.VARIANT_CHOICES)
    ap.add_argument("--model", default=None, help="GGUF whose tensor table to use when the run lacks one")
    a = ap.parse_args(argv)
    run, model = table.load(a.run, a.model_variant, a.model)
    tm, _, why = forecast.try_fit(run)
    if tm is None:
        log.info("no time-model curves: %s", why)
    for p in write_plots(run.record, model, a.out, tm):
        sys.stdout.write(f"{p}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("analysis.plots", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
