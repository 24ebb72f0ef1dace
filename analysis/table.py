"""The FFN-vs-KV table of a run: modelled reads per token beside measured stage times, per context.

    python -m analysis.table RUN.parquet [--model-variant auto|exact|exact_padded|seed]
                                         [--format md|csv] [--model GGUF] [--raw]

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
from the profiled pass, calibrated by default (each split's measured cost removed: they add up to the
plain ms/token, shares of their sum); ``--raw``: shares of the profiled wall time, host gaps included.
MB in the headers is MiB (2^20 bytes), as in the seed; GB/s is 10^9 B/s.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pandas as pd

from analysis import readmodel, roofline
from analysis.readmodel import ReadModel
from analysis.run_facts import agreement
from analysis.slope import invariant_off_zero, run_slopes
from harness import stages, store
from harness.cli import ArgParser, format_table, run_cli
from harness.errors import UsageError
from harness.graph_bytes import GraphBytes, KVRead
from harness.record import RunRecord

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


def resolve_variant(rec: RunRecord, variant: str, model_path: str | None = None) -> str:
    """``auto``: with a tensor table at hand (run metadata or --model), ``exact`` if the run decoded with
    flash attention and ``exact_padded`` if not (``readmodel.run_variant``); seed otherwise."""
    if variant != "auto":
        return variant
    return readmodel.run_variant(rec) if (model_path or readmodel.has_tensor_table(rec)) else "seed"


def load_read_model(rec: RunRecord, variant: str = "auto", model_path: str | None = None) -> ReadModel:
    """The run's read model: from its own tensor table, else from ``model_path``."""
    variant = resolve_variant(rec, variant, model_path)
    if variant not in readmodel.VARIANTS:
        raise UsageError(f"unknown read-model variant {variant!r} (choose from: {', '.join(VARIANT_CHOICES)})")
    if variant == "seed":
        return readmodel.seed_model()
    if readmodel.has_tensor_table(rec):
        if model_path is not None:
            log.warning("--model %s not read: the run carries its model's tensor table", model_path)
        return readmodel.from_run(rec, variant)
    if model_path is None:
        raise UsageError(f"the {variant} read model needs the model's tensor table: the run has none, "
                         "pass --model GGUF (or --model-variant seed)")
    return readmodel.from_gguf(model_path, variant, rec.params.cache_type_k, rec.params.cache_type_v,
                               **readmodel.context_params(rec))


def load(run_path: str | Path, variant: str = "auto", model_path: str | None = None) -> tuple[store.Run, ReadModel]:
    run = store.read_run(run_path)
    return run, load_read_model(run.record, variant, model_path)


def _div(a: float, b: float | None) -> float:
    return a / b if b else math.nan


def build_table(rec: RunRecord, model: ReadModel, calibrated: bool = True) -> pd.DataFrame:
    """One row per context (in depth order) of modelled reads, graph bytes and measured times (stage ms
    calibrated by default: they add up to the plain ms/token; ``calibrated=False``: raw profiled figures)."""
    bw = rec.bandwidth_gbps
    rows = []
    for c in rec.sorted_contexts():
        b = model.bytes_per_token(c.depth)
        graph = roofline.graph_bytes_per_token(c)
        used, _ = roofline.context_bytes(c, model)  # graph bytes when stored, else the model's
        ffn_ms, attn_ms, decode_ms = c.stage(stages.FFN, calibrated), c.stage(stages.ATTN_KV, calibrated), c.plain_ms
        used_total = sum(used.values())
        row = {
            "context": c.context, "input_tokens": c.depth,
            "kv_cache_mib": model.kv_cache_bytes(c.depth) / MIB,
            "ffn_read_mib": b[stages.FFN] / MIB, "attn_read_mib": b[stages.ATTN_KV] / MIB,
            "attn_ffn_read_ratio": _div(b[stages.ATTN_KV], b[stages.FFN]),
            "ffn_pct": c.share(stages.FFN, calibrated), "attn_pct": c.share(stages.ATTN_KV, calibrated),
            "ffn_ms": ffn_ms, "attn_ms": attn_ms, "decode_ms": decode_ms,
            "total_read_mib": sum(b.values()) / MIB,
            "graph_attn_read_mib": graph[stages.ATTN_KV] / MIB if graph else math.nan,
            "graph_total_mib": sum(graph.values()) / MIB if graph else math.nan,
            "attn_model_over_graph": _div(b[stages.ATTN_KV], graph[stages.ATTN_KV]) if graph else math.nan,
            "ffn_gbps": roofline.gbps(used.get(stages.FFN), ffn_ms),
            "attn_gbps": roofline.gbps(used.get(stages.ATTN_KV), attn_ms),
            "roofline_ms": roofline.roofline_ms(used_total, bw),
            "measured_over_roofline": roofline.x_roofline(float(decode_ms), used_total, bw),
        }
        row.update({f"{s}_pct": c.share(s, calibrated) for s in REST_STAGES})
        rows.append(row)
    df = pd.DataFrame(rows, columns=[c for c, _, _ in COLUMNS])
    df["run_complete"] = rec.complete
    df["stage_figures"] = "calibrated" if calibrated and rec.calibrated else "raw"
    return df


def stage_bytes_table(rec: RunRecord, model: ReadModel, calibrated: bool = True) -> pd.DataFrame:
    """Long table: context, depth, stage, bytes/token (graph when stored, else modelled), measured ms/token
    (for the roofline plot)."""
    rows = []
    for c in rec.sorted_contexts():
        b, source = roofline.context_bytes(c, model)
        for stage in stages.STAGES:
            rows.append({"context": c.context, "depth": c.depth, "stage": stage,
                         "bytes_read": float(b.get(stage, 0.0)), "source": source,
                         "measured_ms": c.stage(stage, calibrated)})
    return pd.DataFrame(rows)


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return spec.format(v)


def format_markdown(df: pd.DataFrame) -> str:
    return format_table([h for _, h, _ in COLUMNS], [[_fmt(r[c], f) for c, _, f in COLUMNS] for _, r in df.iterrows()])


def describe(rec: RunRecord, model: ReadModel, calibrated: bool = True) -> list[str]:
    """Header lines: what the run is, how the table was made (calibrated or raw), and every flag the run raised."""
    lines = [f"Run: {rec.display_label} | model: {rec.model.name or rec.model.arch} | "
             f"read model: {model.variant} (weights {model.footprint_bytes / MIB:,.0f} MB) | "
             f"{len(rec.rounds) or rec.params.rounds} rounds, {rec.params.order}"]
    fa = readmodel.run_flash_attn(rec)
    graph = any(c.graph_bytes for c in rec.contexts)
    how = " (resolved: from the graph)" if rec.params.flash_attn_resolved is not None else " (as requested)"
    lines.append(f"Flash attention: {'not recorded' if fa is None else ('on' if fa else 'off') + how} | "
                 f"bytes for GB/s and roofline: {'the graph' if graph else 'the read model'}")
    lines += thread_split_lines(rec)
    if not (rec.calibrated and calibrated):  # say why the stage figures below are raw
        why = "This run has no calibration" if not rec.calibrated else "Shown with --raw"
        lines.append(f"{why}: stage ms are raw (the profiled pass, uncalibrated; shares of its wall time).")
    if not rec.complete:
        lines.append("**INCOMPLETE RUN**: the sweep stopped early; fewer rounds than asked were measured.")
    if rec.reference:
        lines.append("Reference run: the seed's recorded figures from the original device, not measured here.")
    lines += flag_lines(rec)
    bw, fast = rec.bandwidth_gbps, roofline.faster_than_probe(rec.contexts, rec.bandwidth_gbps, model)
    lines.append(f"Device read bandwidth: {bw:.1f} GB/s" if bw else "Device read bandwidth: not measured (no roofline)")
    if fast:  # the engine outran the probe: the probe was starved (a shared machine) or is not memory-bound
        lines.append(f"**The probe is no roofline here**: {fast[1]} read {fast[2]:.1f} GB/s at {fast[0]}, faster than "
                     f"the probe's {bw:.1f} GB/s; x roofline below 1 follows from that, not from the engine")
    return lines


def busiest_cells(r: KVRead, n_threads: int) -> int | None:
    """Visible cells the busiest of n threads visits on flash attention's split-KV path (thread i takes the cells
    [i*c, (i+1)*c), c = ceil(n_kv / n), and skips the masked ones; the op waits for the last thread). None off that
    path, or where the graph reader did not record where the visible cells sit."""
    if not r.split_kv or not r.visible_runs or n_threads < 1:
        return None
    c = -(-r.n_kv // n_threads)
    return max(sum(max(0, min(e, (i + 1) * c) - max(b, i * c)) for b, e in r.visible_runs) for i in range(n_threads))


def thread_split_lines(rec: RunRecord, min_excess: float = 0.05) -> list[str]:
    """Where flash attention's split-KV path shares the visible cells unevenly between threads: per depth, the
    busiest thread's cells against an even share, weighted by each layer's KV bytes (x1.50: that attention takes
    1.5x its balanced time, for the same bytes). Empty when every depth is within ``min_excess`` of even."""
    n, per = rec.params.threads or 1, []
    for c in rec.sorted_contexts() if n > 1 else ():
        got = [(r, b) for r in GraphBytes.from_dict(c.graph_bytes).kv_reads
               if (b := busiest_cells(r, n)) is not None and r.cells] if c.graph_bytes else []
        if got:
            worst = max(n * b / r.cells for r, b in got)
            per.append((c.depth, sum(r.bytes * n * b / r.cells for r, b in got) / sum(r.bytes for r, _ in got), worst))
    if not any(f > 1 + min_excess for _, f, _ in per):
        return []
    shares = ", ".join(f"x{f:.2f} of an even share of the visible cells at depth {d} (worst layer x{w:.2f})"
                       for d, f, w in per)
    return [f"Attention thread split ({n} threads; flash attention's split-KV path gives each thread a run of "
            f"ceil(n_kv / threads) cells, visible or not): the busiest thread visits {shares} (bytes-weighted over "
            "the layers on that path). Their attention waits for it; their bytes do not show it."]


def flag_lines(rec: RunRecord) -> list[str]:
    """One line per flag the run raised, plus the depth-invariance figure."""
    out = [f"**FLAG {f.kind}**{' (' + f.context + ')' if f.context else ''}: {f.message}" for f in rec.flags]
    if rec.synthetic and not any(f.kind == "synthetic" for f in rec.flags):
        out.append("**FLAG synthetic**: synthetic twin (random weights): timings are real, outputs are noise")
    inv = rec.invariants
    if inv is not None and inv.across_depths:
        out.append(f"Depth-invariant stages {agreement(inv)} across depths ({inv.stage} worst).")
    return out


NOTES = ("MB = MiB (2^20 bytes), as in the seed; GB/s = 10^9 bytes/s. Decode ms/token: plain pass (no callback). "
         "Stage ms and shares: profiled pass, calibrated (each graph split's measured cost removed) so they add up "
         "to the plain ms/token; --raw shows the uncalibrated figures (shares of profiled wall time). Bytes per token: "
         "weights read (whole, once per op that reads them; one row of a lookup table) + KV cells read + KV cells "
         "stored. Attention read = KV-cache reads only (projections are attn_proj): each KV head's cells once "
         "(grouped-query re-reads not counted), a shared-KV layer's read of layer 18/19's cache counted as its own; "
         "with flash attention the cells the mask leaves visible, without it the whole n_kv view (>= 256 cells). "
         "Graph columns: the same bytes as llama.cpp's decode graph shaped them at that depth.")


def slope_table(run: store.Run | None) -> pd.DataFrame | None:
    """Per-stage ms/token slope against depth (ms per 1,000 KV tokens, bootstrap 95 % CI over rounds), >= 3 depths."""
    if run is None or run.ops.empty or len(run.record.contexts) < 3 or run.record.reference:
        return None
    return run_slopes(run)


def format_slopes(sl: pd.DataFrame) -> str:
    rows = [[str(stage), _fmt(r["slope_ms_per_1k"], "{:.3f}"), _fmt(r["ci95_low_ms_per_1k"], "{:.3f}"),
             _fmt(r["ci95_high_ms_per_1k"], "{:.3f}"), str(int(r["n_rounds"])), str(int(r["n_depths"]))]
            for stage, r in sl.iterrows()]
    return ("Slopes against depth (least squares through each depth's mean; ms/token per 1,000 KV tokens; "
            "95 % bootstrap interval over rounds, depths paired by round; invariant stages judged off 0 at 99 %):\n\n"
            + format_table(["Stage", "Slope ms/1k tok", "CI low", "CI high", "Rounds", "Depths"], rows))


def render(rec: RunRecord, model: ReadModel, fmt: str = "md", run: store.Run | None = None,
           calibrated: bool = True) -> str:
    df = build_table(rec, model, calibrated)
    sl = slope_table(run)
    if fmt == "csv":
        for stage, r in (sl.iterrows() if sl is not None else ()):
            df[f"{stage}_slope_ms_per_1k"] = r["slope_ms_per_1k"]
        return df.to_csv(index=False)
    parts = [*describe(rec, model, calibrated), "", format_markdown(df), "", NOTES]
    if sl is not None:
        off = invariant_off_zero(sl, rec.contexts)
        parts += ["", format_slopes(sl)] + ([""] if off else []) + [
            f"- {s}: its bytes do not depend on depth, yet its 99 % interval excludes 0 "
            f"([{sl.at[s, 'joint_low_ms_per_1k']:.4f}, {sl.at[s, 'joint_high_ms_per_1k']:.4f}]; "
            f"{ms:+.2f} ms, {pct:+.1f} % over the depths): a context's own "
            "offset or a small effect of depth on time, which an interval over rounds does not hold (README, "
            "Performance); read it against the invariance figure above" for s, (ms, pct) in off.items()]
    return "\n".join(parts) + "\n"


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="python -m analysis.table", description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a run Parquet file")
    ap.add_argument("--model-variant", default="auto", choices=VARIANT_CHOICES,
                    help="read model (default auto: exact when a tensor table is available, else seed)")
    ap.add_argument("--format", default="md", choices=("md", "csv"))
    ap.add_argument("--model", default=None, help="GGUF whose tensor table to use when the run lacks one")
    ap.add_argument("--raw", action="store_true", help="uncalibrated stage figures (shares of profiled wall time)")
    a = ap.parse_args(argv)
    run, model = load(a.run, a.model_variant, a.model)
    if not run.record.complete:
        log.warning("warning: %s is an incomplete run", a.run)
    sys.stdout.write(render(run.record, model, a.format, run, calibrated=not a.raw))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("analysis.table", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
