"""The FFN-vs-KV table of a run: modelled reads per token beside measured stage times, per context.

    python -m analysis.table RUN.parquet [--model-variant auto|exact|exact_padded|seed]
                                         [--format md|csv] [--model GGUF]

Columns (one row per context): the seed notebook's (context, input tokens, KV-cache MiB, FFN and
attention KV read/token MiB, their ratio, measured FFN and attention %) and FFN, attention and
decode ms/token; then total modelled bytes/token, the graph's attention and total bytes/token
(what llama.cpp's decode graph read at that depth, when the run stored them) and model / graph for
attention, achieved GB/s of FFN and attention (bytes / measured stage time), the roofline ms/token
(total bytes / the run's measured read bandwidth; blank when the probe was skipped), measured /
roofline, and the other stages' shares. GB/s and the roofline use the graph's bytes when the run
has them, else the model's (``analysis.roofline``). ``auto`` picks the read-model variant from the
run's resolved flash attention (``readmodel.run_variant``).

Measured numbers: decode ms/token is the plain pass (no callback); stage ms/token and shares come
from the profiled pass (``stage_pct`` = share of the profiled wall time, host gaps included), so
all shares add to 100 %. MB in the headers is MiB (2^20 bytes), as in the seed; GB/s is 10^9 B/s.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pandas as pd

from analysis import readmodel, roofline
from analysis.readmodel import ReadModel
from analysis.slope import stage_slopes
from harness import columns, stages, store
from harness.cli import ArgParser, run_cli
from harness.errors import UsageError

log = logging.getLogger(__name__)
MIB = 1024**2
REST_STAGES = (stages.LM_HEAD, stages.ATTN_PROJ, stages.GEMMA3N_EXTRA, stages.NORM, stages.KV_STORE, stages.OTHER,
               stages.HOST)
VARIANT_CHOICES = ("auto", *readmodel.VARIANTS)

# (column, markdown header, format); the first eight are the seed notebook's table
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("context", "Context", "{}"),
    ("input_tokens", "Input tokens", "{:d}"),
    ("kv_cache_mib", "KV-cache MB", "{:.2f}"),
    ("ffn_read_mib", "FFN read/token MB", "{:.1f}"),
    ("attn_read_mib", "Attention read/token MB", "{:.2f}"),
    ("attn_ffn_read_ratio", "Attention/FFN read ratio", "{:.3f}"),
    ("ffn_pct", "Measured FFN %", "{:.1f}"),
    ("attn_pct", "Measured attention %", "{:.1f}"),
    ("ffn_ms", "FFN ms/token", "{:.2f}"),
    ("attn_ms", "Attention ms/token", "{:.2f}"),
    ("decode_ms", "Decode ms/token", "{:.2f}"),
    ("total_read_mib", "Total read/token MB", "{:.1f}"),
    ("graph_attn_read_mib", "Graph attention read/token MB", "{:.2f}"),
    ("graph_total_mib", "Graph total/token MB", "{:.1f}"),
    ("attn_model_over_graph", "Attention model/graph", "{:.3f}"),
    ("ffn_gbps", "FFN GB/s", "{:.1f}"),
    ("attn_gbps", "Attention GB/s", "{:.1f}"),
    ("roofline_ms", "Roofline ms/token", "{:.2f}"),
    ("measured_over_roofline", "Measured/roofline", "{:.2f}"),
    *((f"{s}_pct", f"{s} %", "{:.1f}") for s in REST_STAGES),
)


bandwidth_gbps = roofline.bandwidth_gbps


def resolve_variant(meta: dict, variant: str, model_path: str | None = None) -> str:
    """``auto``: with a tensor table at hand (run metadata or --model), ``exact`` if the run decoded with
    flash attention and ``exact_padded`` if not (``readmodel.run_variant``); seed otherwise."""
    if variant != "auto":
        return variant
    return readmodel.run_variant(meta) if (model_path or readmodel.has_tensor_table(meta)) else "seed"


def load_read_model(meta: dict, variant: str = "auto", model_path: str | None = None) -> ReadModel:
    """The run's read model: from its own tensor table, else from ``model_path``."""
    variant = resolve_variant(meta, variant, model_path)
    if variant not in readmodel.VARIANTS:
        raise UsageError(f"unknown read-model variant {variant!r} (choose from: {', '.join(VARIANT_CHOICES)})")
    if variant == "seed":
        return readmodel.seed_model()
    if readmodel.has_tensor_table(meta):
        return readmodel.from_run(meta, variant)
    if model_path is None:
        raise UsageError(f"the {variant} read model needs the model's tensor table: the run has none, "
                         "pass --model GGUF (or --model-variant seed)")
    params = meta.get("params") or {}
    return readmodel.from_gguf(model_path, variant, params.get("cache_type_k", "f16"),
                               params.get("cache_type_v", "f16"), **readmodel.context_params(meta))


def load(run_path: str | Path, variant: str = "auto", model_path: str | None = None) -> tuple[store.Run, ReadModel]:
    run = store.read_run(run_path)
    return run, load_read_model(run.meta, variant, model_path)


def _div(a: float, b: float | None) -> float:
    return a / b if b else math.nan


def build_table(meta: dict, model: ReadModel) -> pd.DataFrame:
    """One row per context (in depth order) of modelled reads, graph bytes and measured times."""
    bw = bandwidth_gbps(meta)
    rows = []
    for c in sorted(meta.get("contexts", []), key=lambda c: c["depth"]):
        depth = int(c["depth"])
        b = model.bytes_per_token(depth)
        total = sum(b.values())
        graph = roofline.graph_bytes_per_token(c)
        used, _ = roofline.context_bytes(c, model)  # graph bytes when stored, else the model's
        ms, pct = c.get("stage_ms", {}), c.get("stage_pct", {})
        ffn_ms, attn_ms, decode_ms = float(ms.get(stages.FFN, 0.0)), float(ms.get(stages.ATTN_KV, 0.0)), c["plain_ms"]
        used_total = sum(used.values())
        row = {
            "context": str(c["context"]), "input_tokens": depth,
            "kv_cache_mib": model.kv_cache_bytes(depth) / MIB,
            "ffn_read_mib": b[stages.FFN] / MIB, "attn_read_mib": b[stages.ATTN_KV] / MIB,
            "attn_ffn_read_ratio": _div(b[stages.ATTN_KV], b[stages.FFN]),
            "ffn_pct": float(pct.get(stages.FFN, 0.0)), "attn_pct": float(pct.get(stages.ATTN_KV, 0.0)),
            "ffn_ms": ffn_ms, "attn_ms": attn_ms, "decode_ms": float(decode_ms),
            "total_read_mib": total / MIB,
            "graph_attn_read_mib": graph[stages.ATTN_KV] / MIB if graph else math.nan,
            "graph_total_mib": sum(graph.values()) / MIB if graph else math.nan,
            "attn_model_over_graph": _div(b[stages.ATTN_KV], graph[stages.ATTN_KV]) if graph else math.nan,
            "ffn_gbps": roofline.gbps(used.get(stages.FFN), ffn_ms),
            "attn_gbps": roofline.gbps(used.get(stages.ATTN_KV), attn_ms),
            "roofline_ms": roofline.roofline_ms(used_total, bw),
            "measured_over_roofline": roofline.x_roofline(float(decode_ms), used_total, bw),
        }
        row.update({f"{s}_pct": float(pct.get(s, 0.0)) for s in REST_STAGES})
        rows.append(row)
    df = pd.DataFrame(rows, columns=[c for c, _, _ in COLUMNS])
    df["run_complete"] = meta.get("complete") is not False
    return df


def stage_bytes_table(meta: dict, model: ReadModel) -> pd.DataFrame:
    """Long table: context, depth, stage, bytes/token (graph when stored, else modelled), measured ms/token
    (for the roofline plot)."""
    rows = []
    for c in sorted(meta.get("contexts", []), key=lambda c: c["depth"]):
        b, source = roofline.context_bytes(c, model)
        for stage in stages.STAGES:
            rows.append({"context": str(c["context"]), "depth": int(c["depth"]), "stage": stage,
                         "bytes_read": float(b.get(stage, 0.0)), "source": source,
                         "measured_ms": float(c.get("stage_ms", {}).get(stage, 0.0))})
    return pd.DataFrame(rows)


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return spec.format(v)


def format_markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|---|" + "---:|" * (len(COLUMNS) - 1)
    lines = [head, sep]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c], f) for c, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def describe(meta: dict, model: ReadModel) -> list[str]:
    """Header lines: what the run is and how the table was made."""
    m = meta.get("model") or {}
    lines = [f"Run: {meta.get('label', '?')} | model: {m.get('name') or m.get('arch', '?')} | "
             f"read model: {model.variant} (weights {model.footprint_bytes / MIB:,.0f} MB)"]
    fa, ctxs = readmodel.run_flash_attn(meta), meta.get("contexts", [])
    graph = any(c.get("graph_bytes") for c in ctxs)
    how = " (resolved: from the graph)" if any(c.get("flash_attn_on") is not None for c in ctxs) else " (as requested)"
    lines.append(f"Flash attention: {'not recorded' if fa is None else ('on' if fa else 'off') + how} | "
                 f"bytes for GB/s and roofline: {'the graph' if graph else 'the read model'}")
    if meta.get("complete") is False:
        lines.append("**INCOMPLETE RUN**: the sweep stopped early; only the contexts below were measured.")
    if meta.get("reference"):
        lines.append("Reference run: the seed's recorded figures from the original device, not measured here.")
    if meta.get("synthetic"):
        lines.append("Synthetic twin (random weights): timings are real, the text it produced is noise.")
    bw = bandwidth_gbps(meta)
    lines.append(f"Device read bandwidth: {bw:.1f} GB/s" if bw else "Device read bandwidth: not measured "
                 "(no roofline)")
    return lines


NOTES = ("MB = MiB (2^20 bytes), as in the seed; GB/s = 10^9 bytes/s. Decode ms/token: plain pass. Stage ms and "
         "shares: profiled pass, shares of its wall time (host included), so they add to 100 %. Bytes per token: "
         "weights read (whole, once per op that reads them; one row of a lookup table) + KV cells read + KV cells "
         "stored. Attention read = KV-cache reads only (projections are attn_proj): each KV head's cells once "
         "(grouped-query re-reads not counted), a shared-KV layer's read of layer 18/19's cache counted as its own; "
         "with flash attention the cells the mask leaves visible, without it the whole n_kv view (>= 256 cells). "
         "Graph columns: the same bytes as llama.cpp's decode graph shaped them at that depth.")


def slope_table(ops: pd.DataFrame | None) -> pd.DataFrame | None:
    """Per-stage ms/token slope against depth (ms per 1,000 KV tokens, 95 % CI), for runs with >= 3 depths."""
    if ops is None or ops.empty or ops[columns.DEPTH].nunique() < 3:
        return None
    return stage_slopes(ops)


def format_slopes(sl: pd.DataFrame) -> str:
    lines = ["Stage slopes over all timed tokens (least squares, ms/token per 1,000 KV tokens, 95 % CI):", "",
             "| Stage | Slope ms/1k tok | CI low | CI high | Tokens | Depths |", "|---|---:|---:|---:|---:|---:|"]
    for stage, r in sl.iterrows():
        lines.append(f"| {stage} | {_fmt(r['slope_ms_per_1k'], '{:.3f}')} | {_fmt(r['ci95_low_ms_per_1k'], '{:.3f}')} "
                     f"| {_fmt(r['ci95_high_ms_per_1k'], '{:.3f}')} | {int(r['n_tokens'])} | {int(r['n_depths'])} |")
    return "\n".join(lines)


def render(meta: dict, model: ReadModel, fmt: str = "md", ops: pd.DataFrame | None = None) -> str:
    df = build_table(meta, model)
    sl = slope_table(ops)
    if fmt == "csv":
        if sl is not None:
            for stage, r in sl.iterrows():
                df[f"{stage}_slope_ms_per_1k"] = r["slope_ms_per_1k"]
        return df.to_csv(index=False)
    parts = [*describe(meta, model), "", format_markdown(df), "", NOTES]
    if sl is not None:
        parts += ["", format_slopes(sl)]
    return "\n".join(parts) + "\n"


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="python -m analysis.table", description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a run Parquet file")
    ap.add_argument("--model-variant", default="auto", choices=VARIANT_CHOICES,
                    help="read model (default auto: exact when a tensor table is available, else seed)")
    ap.add_argument("--format", default="md", choices=("md", "csv"))
    ap.add_argument("--model", default=None, help="GGUF whose tensor table to use when the run lacks one")
    a = ap.parse_args(argv)
    run, model = load(a.run, a.model_variant, a.model)
    if run.meta.get("complete") is False:
        log.warning("warning: %s is an incomplete run", a.run)
    sys.stdout.write(render(run.meta, model, a.format, run.ops))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("analysis.table", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
