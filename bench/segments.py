"""Where in a layer a depth-invariant stage's rise with depth sits: kept stage-mode runs, read per segment.

    python bench/segments.py RUN.parquet [RUN.parquet ...] [--stages norm,attn_proj,gemma3n_extra,ffn,lm_head]

In stage mode every timed segment is named after its last node, so a run's op table says which part of a layer
each stage's time is in. Per segment name (the layer suffix dropped, so layers are summed; an unnamed node is
named by its op), paired by round: the deepest context minus the shallowest, µs per token, in each run (a 20 %
trimmed mean over its rounds, as the invariance check takes a depth's value); then over the runs given, which must
share their shallowest and deepest depth (each run one unit): the mean, its standard error, the difference as a %
of the shallow time, and in how many runs it was higher at depth. Raw segment times: the
split-cost calibration subtracts the same amount at every depth, so it does not move a difference.
Segments under 20 µs a token at the shallowest depth are left out. Nothing is asserted: the figures are printed
and saved as JSON in bench/results/ (bench/NOTES.md §43).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from across import save_results  # noqa: E402

from harness import checks, columns, stats  # noqa: E402
from harness.cli import ArgParser, run_cli  # noqa: E402
from harness.errors import InputError, UsageError  # noqa: E402
from harness.stages import STAGES, base_name  # noqa: E402
from harness.store import read_run  # noqa: E402

C = columns
MIN_US = 20.0  # segments shorter than this at the shallowest depth (a token, layers summed) are not shown
READ = [C.DEPTH, C.ROUND, C.NAME, C.OP, C.STAGE, C.TIME_US]  # the op table's columns this script reads


def segment_key(names: pd.Series, ops: pd.Series) -> pd.Series:
    """A segment's name across layers: its last node's name without ggml's suffixes and the layer
    (``stages.base_name``, the stage rules' own reading of names); an unnamed node by its op."""
    base = names.map({n: base_name(n)[0] for n in names.unique()})
    return base.where(~names.str.fullmatch(r"node_\d+"), "(unnamed " + ops + ")")


def run_differences(ops: pd.DataFrame, stages: list[str]) -> pd.DataFrame:
    """One run: per (stage, segment) the 20 % trimmed mean over rounds (``checks.TRIM``, as the invariance check
    takes each depth's value) of deepest - shallowest µs a token, paired by round, and of the shallow time. Rounds
    that lack either depth are left out."""
    if ops.empty:
        raise InputError("the run's op table has no rows: no segments to compare")
    lo, hi = ops[C.DEPTH].min(), ops[C.DEPTH].max()
    if lo == hi:
        raise InputError(f"the run has one depth ({lo}): nothing to difference")
    o = ops[ops[C.STAGE].isin(stages) & ops[C.DEPTH].isin([lo, hi])]
    if o.empty:
        raise InputError(f"no segments of {', '.join(stages)} in the run")
    o = o.assign(segment=segment_key(o[C.NAME], o[C.OP]))
    per = o.groupby([C.STAGE, "segment", C.ROUND, C.DEPTH])[C.TIME_US].sum().unstack(C.DEPTH)
    per = per.dropna() if lo in per and hi in per else per.iloc[:0]
    if per.empty:
        raise InputError(f"no round has segments of {', '.join(stages)} at both depths {lo} and {hi}")
    per = per.assign(diff=lambda d: d[hi] - d[lo])
    tm = per.groupby(level=[C.STAGE, "segment"])[["diff", lo]].agg(lambda v: stats.trimmed_mean(v.to_numpy(),
                                                                                                checks.TRIM))
    return pd.DataFrame({"diff_us": tm["diff"], "shallow_us": tm[lo]}).assign(shallow=lo, deep=hi)


def summarize(per_run: list[pd.DataFrame]) -> pd.DataFrame:
    """Over runs: n, shallow µs, deep - shallow µs (mean, se over runs), % of shallow, runs higher at depth."""
    a = pd.concat([d.assign(run=i) for i, d in enumerate(per_run)]).reset_index()
    wide = a.pivot_table(index=[C.STAGE, "segment"], columns="run", values="diff_us")
    m, se = stats.mean_se(wide.to_numpy().T)
    base = a.groupby([C.STAGE, "segment"])["shallow_us"].mean().reindex(wide.index)
    out = pd.DataFrame({"runs": wide.notna().sum(axis=1), "shallow_us": base, "diff_us": m, "se_us": se,
                        "pct": 100 * m / base.to_numpy(), "higher": (wide > 0).sum(axis=1)}, index=wide.index)
    return out[out["shallow_us"] >= MIN_US].sort_values("diff_us", ascending=False)


def report(out: pd.DataFrame, depths: set[tuple[int, int]]) -> None:
    print(f"deepest - shallowest per segment (µs a token, layers summed; paired by round, 20 % trimmed over rounds; "
          f"mean +- se over runs), depths {', '.join(f'{lo} -> {hi}' for lo, hi in sorted(depths))}")
    print(f"  {'stage':14s} {'segment':24s} {'shallow us':>10s} {'deep - shallow':>18s} {'%':>7s} {'higher':>8s}")
    for (stage, seg), r in out.iterrows():
        print(f"  {stage:14s} {seg:24s} {r['shallow_us']:10.1f} {r['diff_us']:+9.1f} +- {r['se_us']:5.1f} "
              f"{r['pct']:+6.1f}% {int(r['higher']):>3d} of {int(r['runs'])}")


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="segments.py", description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="kept stage-mode runs (Parquet)")
    ap.add_argument("--stages", default=",".join(checks.INVARIANT_STAGES),
                    help="comma list of stages (default: the depth-invariant ones)")
    a = ap.parse_args(argv)
    stages = [s for s in a.stages.split(",") if s]
    if not stages or set(stages) - set(STAGES):
        raise UsageError(f"--stages: a comma list of {', '.join(STAGES)}; got {a.stages!r}")
    per_run, depths = [], set()
    for p in a.runs:
        run = read_run(p, only=READ)
        if run.record.params.mode != "stages":
            raise InputError(f"{p}: a run in {run.record.params.mode} mode; segments are read from stage-mode runs")
        try:
            d = run_differences(run.ops, stages)
        except InputError as e:
            raise InputError(f"{p}: {e}") from None
        per_run.append(d)
        depths.add((int(d["shallow"].iloc[0]), int(d["deep"].iloc[0])))
        if len(depths) > 1:
            raise InputError(f"{p}: depths {' and '.join(f'{a} -> {b}' for a, b in sorted(depths))} differ between the "
                             "runs; give runs of one pair of depths")
    out = summarize(per_run)
    report(out, depths)
    save_results("segments", {"args": {"runs": [str(p) for p in a.runs], "stages": stages},
                              "depths": sorted(depths), "segments": out.reset_index().to_dict("records")})
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("segments.py", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
