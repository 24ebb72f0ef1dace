"""The seed notebook's baseline, as code: its read-size accounting and its recorded measurements.

The seed (``ffn_vs_kv_bottleneck.ipynb``, a Gemma 3n E4B-style model on the original device)
estimated per-token reads with a simplified formula and recorded one context sweep. Both are
copied here as constants; nothing reads the seed at run time.

- ``seed_read_model()``: FFN = 35 x 2048 x 16384 x 3 x 0.5 B (INT4); KV = 2 x 35 x 2 x 256 x L
  x 2 B (F16, L cells, every layer); weight estimate = 35 x (2*2048^2 + 2*2048*512 +
  3*2048*16384) x 0.5 B. The seed's "MB" are MiB (it divides by 1024^2).
- ``write_reference_run(out_dir)``: the recorded sweep as a harness run (``analysis/data/``)::

      python -m analysis.baseline -o analysis/data --replace
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

from harness import checks, columns, stages, store
from harness.cli import ArgParser, run_cli
from harness.errors import UsageError
from harness.record import ContextSpec, ContextSummary, DeviceMeta, ModelMeta, RunRecord, SweepParams

log = logging.getLogger(__name__)

NUM_LAYERS = 35
KV_HEADS = 2
HEAD_DIM = 256
KV_DIM = KV_HEADS * HEAD_DIM
HIDDEN_DIM = 2048
FFN_DIM = 16384
KV_BYTES_PER_ELEM = 2  # F16 KV cache
WEIGHT_BYTES_PER_ELEM = 0.5  # INT4 weights

FFN_BYTES = NUM_LAYERS * HIDDEN_DIM * FFN_DIM * 3 * WEIGHT_BYTES_PER_ELEM
KV_CELL_BYTES_PER_LAYER = 2 * KV_HEADS * HEAD_DIM * KV_BYTES_PER_ELEM  # K and V of one token
WEIGHT_ESTIMATE_BYTES = int(NUM_LAYERS * (2 * HIDDEN_DIM**2 + 2 * HIDDEN_DIM * KV_DIM + 3 * HIDDEN_DIM * FFN_DIM)
                            * WEIGHT_BYTES_PER_ELEM)

# the seed's recorded context sweep (original device): shares of its decode profile and ms/token
RECORDED = (
    {"label": "short", "input_tokens": 13, "ffn_pct": 75.3, "attn_pct": 0.9,
     "ffn_ms": 993.8, "attn_ms": 11.8, "decode_ms": 1372.1},
    {"label": "medium", "input_tokens": 172, "ffn_pct": 68.0, "attn_pct": 6.7,
     "ffn_ms": 719.8, "attn_ms": 70.9, "decode_ms": 1103.8},
    {"label": "long", "input_tokens": 658, "ffn_pct": 49.1, "attn_pct": 28.9,
     "ffn_ms": 528.5, "attn_ms": 311.3, "decode_ms": 1108.5},
)
REFERENCE_LABEL = "seed-reference"
REFERENCE_FILENAME = "seed-reference_gemma-3n-e4b.parquet"
DATA_DIR = Path(__file__).parent / "data"
NOTE = ("Recorded figures of the seed notebook (ffn_vs_kv_bottleneck.ipynb) from the original device, "
        "not measured by this harness. Only FFN and attention were recorded: stage 'other' holds the "
        "unattributed rest (decode_ms - ffn_ms - attn_ms; 100 - ffn_pct - attn_pct for shares). The "
        "recorded shares are not ffn_ms/decode_ms, so stage_pct stores them as recorded.")


def seed_read_model():
    from analysis.readmodel import KVLayer, ReadModel

    layers = tuple(KVLayer(layer=il, sliding=False, owns_kv=True, cell_bytes=KV_CELL_BYTES_PER_LAYER)
                   for il in range(NUM_LAYERS))
    return ReadModel(variant="seed", footprint_bytes=WEIGHT_ESTIMATE_BYTES, weight_bytes={stages.FFN: FFN_BYTES},
                     kv_layers=layers, current_cell=0, arch="gemma3n",
                     model_name="Gemma 3n E4B (seed accounting: INT4 weights, F16 KV)")


def reference_run_path() -> Path:
    """The shipped reference run (package data)."""
    return DATA_DIR / REFERENCE_FILENAME


def _context_summary(r: dict) -> ContextSummary:
    other_ms = round(r["decode_ms"] - r["ffn_ms"] - r["attn_ms"], 6)
    other_pct = round(100.0 - r["ffn_pct"] - r["attn_pct"], 6)
    stage_ms = {s: 0.0 for s in stages.STAGES}
    stage_ms.update({stages.FFN: r["ffn_ms"], stages.ATTN_KV: r["attn_ms"], stages.OTHER: other_ms})
    stage_pct = {s: 0.0 for s in stages.STAGES}
    stage_pct.update({stages.FFN: r["ffn_pct"], stages.ATTN_KV: r["attn_pct"], stages.OTHER: other_pct})
    return ContextSummary(context=r["label"], depth=r["input_tokens"], timed_tokens=1, plain_ms=r["decode_ms"],
                          profiled_ms=r["decode_ms"], stage_ms=stage_ms, stage_pct=stage_pct, covered_pct=100.0,
                          attributed_pct=100.0, recorded=dict(r))


def reference_tables() -> tuple[pd.DataFrame, RunRecord]:
    """The op table (one row per context and recorded stage) and the record of the reference run."""
    rows, toks, summaries = [], [], []
    for r in RECORDED:
        s = _context_summary(r)
        summaries.append(s)
        for stage in (stages.FFN, stages.ATTN_KV, stages.OTHER):
            rows.append((r["label"], r["input_tokens"], 0, -1, -1, stage, -1, "RECORDED", stage,
                         s.stage_ms[stage] * 1000.0))
        for pass_ in (columns.PLAIN, columns.PROFILED):
            toks.append((r["label"], r["input_tokens"], 0, pass_, 0, r["decode_ms"] * 1000.0))
    ops = pd.DataFrame(rows, columns=list(columns.OP_COLUMNS))
    params = SweepParams(contexts=tuple(ContextSpec(r["label"], r["input_tokens"]) for r in RECORDED), rounds=1,
                         warmup=0, threads=0, flash_attn="unknown", cache_type_k="f16", cache_type_v="f16",
                         n_gpu_layers=0, n_batch=0, n_ubatch=0, mode="recorded", n_ctx=0, order="recorded",
                         callback="none", threads_source="unknown", calib_splits=0)
    inv = checks.invariants(summaries)  # the seed's FFN falls 994 -> 529 ms across contexts: drift, said out loud
    flags = checks.flags(summaries, inv, [], cores=1, synthetic=False, complete=True, stop_reason=None)
    rec = RunRecord(label=REFERENCE_LABEL, complete=True, params=params, invariants=inv, flags=tuple(flags),
                    model=ModelMeta(arch="gemma3n", name="Gemma 3n E4B (INT4 weights, F16 KV cache)"),
                    device=DeviceMeta(), contexts=tuple(summaries), tokens=tuple(toks), reference=True, note=NOTE,
                    engine="unknown (original device, recorded by the seed notebook)")
    return ops, rec


def write_reference_run(out_dir: str | os.PathLike, replace: bool = False) -> Path:
    """Write the reference run into out_dir as REFERENCE_FILENAME (atomically replaced if asked)."""
    ops, rec = reference_tables()
    out = Path(out_dir)
    target = out / REFERENCE_FILENAME
    if target.exists() and not replace:
        raise UsageError(f"{target} exists; pass --replace to rewrite it")
    store.check_out_dir(out)
    with tempfile.TemporaryDirectory(dir=out, prefix=".seed-tmp-") as tmp:
        written = store.write_run(ops, rec, tmp, REFERENCE_FILENAME)
        os.replace(written, target)
    return target


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="python -m analysis.baseline", description="Write the seed's recorded sweep as a harness run.")
    ap.add_argument("-o", "--out", default=str(DATA_DIR), help="output folder (default: the package data folder)")
    ap.add_argument("--replace", action="store_true", help="replace an existing reference run")
    a = ap.parse_args(argv)
    path = write_reference_run(a.out, a.replace)
    sys.stdout.write(f"{path}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("analysis.baseline", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
