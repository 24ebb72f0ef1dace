"""A same-depth control for the invariance check: is a depth-invariant stage's disagreement across depths
noise, drift, or an effect of depth?

    python bench/same_depth.py [--model GGUF] [--depths 13,4096] [--sweeps 2] [--rounds 40] [--keep DIR]
    python bench/same_depth.py --runs RUN.parquet [RUN.parquet ...]     # re-read kept runs

Each sweep holds every depth twice, d and d + 1 (the same KV padding, so the same graph, in separate
contexts; a d whose d + 1 would cross a 256-cell padding step is refused), all resident and measured
round-robin. Per depth-invariant stage it prints, on calibrated stage ms:
- twins: the spread between d and d + 1 as the run's check measures a spread (``checks.depth_values``: paired
  by round, 20 % trimmed), what noise and a context's own placement give, no depth at all;
- deep - shallow: the deepest pair minus the shallowest, paired by round, in %, with a 95 % bootstrap
  interval over rounds;
- where that difference sits, per timed segment: after the attention of a layer that reads the whole
  context (a "full-context" layer: over twice the median layer's KV bytes in the graph llama.cpp built, where
  a long KV read could evict what the next ops need: the cache-pollution reading; the rest of that layer,
  its FFN included), or anywhere else.
  Cache pollution predicts the first to grow, the second not.
Nothing is asserted: the figures are printed and saved as JSON in bench/results/.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from across import run_sweep, runs_folder, save_results  # noqa: E402

from harness import checks, columns, gguf_model, stats  # noqa: E402
from harness.cli import ArgParser, folder_arg, run_cli  # noqa: E402
from harness.errors import InputError, UsageError  # noqa: E402
from harness.store import read_run  # noqa: E402

C = columns


def sweep(a, out: Path, i: int) -> Path:
    ctx = ",".join(f"{d},{d + 1}" for d in a.depths)
    run_sweep(["-c", ctx, "-r", str(a.rounds), "--no-probe", "--out", str(out), "--label", f"same-depth-{i}",
               *(["--model", a.model] if a.model else [])])
    return max(out.glob(f"*same-depth-{i}_*.parquet"))


def _paired_pct(deep: np.ndarray, shallow: np.ndarray) -> list[float]:
    """100 * (the 20 % trimmed mean over rounds of deep / shallow - 1), each round's ratio first (paired as
    the run's check pairs), and its 95 % interval (bootstrap over rounds). A round whose shallow value is not
    positive (a tiny stage calibrated to 0) has no ratio and is left out, as in ``checks.round_ratios``."""
    with np.errstate(all="ignore"):
        ratio = np.where(shallow > 0, deep / shallow, np.nan)
    rows = stats.boot_indices(len(ratio))
    point = 100 * (stats.trimmed_mean(ratio, checks.TRIM) - 1)
    boot = 100 * (stats.trimmed_mean(ratio[rows].T, checks.TRIM) - 1)
    lo, hi = stats.interval(boot)
    return [float(point), float(lo), float(hi)]


def full_context_layers(layer_kv_bytes: dict[str, int]) -> set[int]:
    """Layers whose attention reads more than twice the median layer's KV bytes (at the deepest depth, from
    the graph llama.cpp built): the full-context layers of a model that mixes them with sliding-window ones."""
    kv = pd.Series({int(k): v for k, v in layer_kv_bytes.items()})
    return set(kv[kv > 2 * kv.median()].index)


def segments(ops: pd.DataFrame, shallow: list[str], deep: list[str], full: set[int]) -> dict[str, dict[str, list]]:
    """Per invariant stage: the deep - shallow difference (µs per timed segment, paired by round, 95 %
    interval) of its segments after a full-context layer's attention (in the rest of that layer), and of
    all its other segments."""
    o = ops[ops[C.LAYER] >= 0]
    first = o[o[C.STAGE] == "attn_kv"].groupby([C.CONTEXT, C.LAYER])[C.NODE_FIRST].min()
    o = o[o[C.STAGE].isin(checks.INVARIANT_STAGES)].copy()
    fa = first.reindex(list(zip(o[C.CONTEXT], o[C.LAYER], strict=True))).to_numpy()
    o["after_full"] = o[C.LAYER].isin(full).to_numpy() & (o[C.NODE_FIRST].to_numpy() > fa)
    o["side"] = np.where(o[C.CONTEXT].isin(deep), "deep", np.where(o[C.CONTEXT].isin(shallow), "shallow", ""))
    out: dict[str, dict[str, list[float]]] = {}
    for (stage, after), g in o[o["side"] != ""].groupby([C.STAGE, "after_full"]):
        counts = g.groupby([C.CONTEXT, C.ROUND]).size()
        if counts.min() != counts.max():
            raise InputError(f"{stage}: the contexts' graphs differ in their segments; not twins of one graph")
        n_seg = int(counts.max())
        per = g.groupby([C.ROUND, "side", C.CONTEXT])[C.TIME_US].sum().groupby([C.ROUND, "side"]).mean().unstack()
        d = (per["deep"] - per["shallow"]).dropna().to_numpy() / n_seg
        boot = d[stats.boot_indices(len(d))].mean(axis=1)
        lo, hi = stats.interval(boot)
        out.setdefault(stage, {})["after_full_context_attention" if after else "elsewhere"] = [
            float(d.mean()), float(lo), float(hi), int(n_seg)]
    return out


def analyse(path: Path) -> dict:
    run = read_run(path)
    if run.ops.empty:
        raise InputError(f"the run's op table has no rows: no stage timings to compare: {path}")
    rd = stats.round_data(run.ops, run.tokens)
    cal = stats.calibrated(rd, stats.split_cost_ms(rd.calib_delta, rd.calib_extra))
    depths = sorted(set(rd.depths))
    if len(depths) < 4 or len(depths) % 2 or any(b != a + 1 for a, b in zip(depths[::2], depths[1::2], strict=True)):
        raise InputError(f"{path.name}: depths {depths} are not twins (d, d + 1) of two or more depths")
    pairs = [[j for j, d in enumerate(rd.depths) if d in (lo, lo + 1)] for lo in depths[::2]]
    res = {"run": str(path), "depths": list(rd.depths), "rounds": len(rd.rounds), "stages": {}}
    lo_j, hi_j = pairs[0], pairs[-1]
    for s in checks.INVARIANT_STAGES:
        x = cal[:, :, stats.S[s]]
        if np.nanmean(x) <= 0:
            continue
        tm = stats.trimmed_mean(x, checks.TRIM)
        twins = [float(checks.spread_pct(checks.depth_values(x[:, p]))) for p in pairs]
        res["stages"][s] = {"ms": [float(v) for v in tm], "twins_pct": twins,
                            "deep_vs_shallow_pct": _paired_pct(x[:, hi_j].mean(1), x[:, lo_j].mean(1))}
    gb = run.record.sorted_contexts()[-1].graph_bytes or {}
    res["full_context_layers"] = sorted(full_context_layers(gb.get("layer_kv", {})))
    res["segments"] = segments(run.ops, [rd.labels[j] for j in lo_j], [rd.labels[j] for j in hi_j],
                               set(res["full_context_layers"]))
    return res


def report(i: int, r: dict) -> None:
    print(f"sweep {i}: depths {r['depths']}, {r['rounds']} rounds, full-context layers {r['full_context_layers']} "
          f"({r['run']})")
    print(f"  {'stage':14s} {'twins':>13s}  {'deep - shallow [95 %]':>24s}   per segment, µs: after full-context "
          "attention | elsewhere")
    for s, v in r["stages"].items():
        p, lo, hi = v["deep_vs_shallow_pct"]
        seg = r["segments"].get(s, {})
        cells = [f"{v[0]:+.2f} [{v[1]:+.2f}, {v[2]:+.2f}] ({v[3]} segments)" if v else "-"
                 for v in (seg.get(k) for k in ("after_full_context_attention", "elsewhere"))]
        print(f"  {s:14s} {' / '.join(f'{t:.2f}' for t in v['twins_pct']):>11s} %  {p:+6.2f} % [{lo:+.2f}, {hi:+.2f}]"
              f"   {cells[0]} | {cells[1]}")


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="same_depth.py", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the E4B Q4_K_M twin, made if missing)")
    ap.add_argument("--depths", default="13,4096", help="depths, each measured twice (d and d + 1)")
    ap.add_argument("--sweeps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--keep", type=folder_arg, default=None, help="keep the runs in this folder")
    ap.add_argument("--runs", type=Path, nargs="+", default=None, help="analyse these kept runs instead of sweeping")
    a = ap.parse_args(argv)
    if a.sweeps < 1 or a.rounds < 1:
        raise UsageError(f"--sweeps and --rounds must be >= 1, got {a.sweeps} and {a.rounds}")
    try:
        a.depths = sorted({int(d) for d in a.depths.split(",")})
    except ValueError:
        ap.error(f"--depths: a comma list of token counts, got {a.depths!r}")
    bad = [d for d in a.depths if d < 1 or (d + 1) % gguf_model.KV_PAD == 0]
    if len(a.depths) < 2 or bad or any(b - a_ < 2 for a_, b in zip(a.depths, a.depths[1:], strict=False)):
        ap.error("--depths: two or more depths >= 1, at least 2 apart, none just below a multiple of "
                 f"{gguf_model.KV_PAD} (its twin would build another graph)" + (f": {bad}" if bad else ""))
    res = []
    with tempfile.TemporaryDirectory() as tmp, runs_folder(Path(a.keep or tmp), make=not a.runs) as d:
        for i in range(len(a.runs) if a.runs else a.sweeps):
            res.append(analyse(a.runs[i] if a.runs else sweep(a, d, i)))
            report(i, res[-1])
    save_results("same-depth", {"args": vars(a), "sweeps": res})
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("same_depth.py", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
