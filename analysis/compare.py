"""Compare devices: one table per context, one row per device group (device x model x settings).

    python -m analysis.compare runs/ other-runs/*.parquet [--baseline LABEL] [--format md|csv] [--plots DIR]

- Groups: runs with the same device label, model (content hash, else name + quant) and
  work-changing settings (threads, flash_attn, cache_type_k/v, n_gpu_layers) are pooled; the row
  label shows the model and every setting that differs between groups. Incomplete runs, and runs on a
  synthetic twin, form their own groups, marked INCOMPLETE and SYNTHETIC.
- Main table from each run's context summaries (no op table read): plain ms/token (pooled over
  runs; +/- is the std across runs, else across tokens), tokens/s, calibrated stage ms/token and
  share, achieved GB/s of ffn and attn_kv, the device's read bandwidth, x roofline (``analysis.roofline``),
  and speedup vs the baseline device (same model; a differing setting is named in base_note).
- Default baseline: the alphabetically first label that has a complete, non-reference run.
- Slopes: per group and stage, ms per 1,000 KV tokens through each depth's mean, 95 % bootstrap interval
  over rounds (depths paired by round; runs stratified); "!": a depth-invariant stage's 99 % interval excludes 0.
- Crossover: per group, where attn_kv reaches the FFN's time (its time model, runs pooled; ``--crossover``).
"""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import pandas as pd

from analysis import fleet, forecast, roofline, slope, timemodel
from harness import columns, stages, stats, store
from harness.cli import ArgParser, format_table, paused_gc, run_cli
from harness.errors import HarnessError, UsageError

log = logging.getLogger(__name__)
GBPS_STAGES = (stages.FFN, stages.ATTN_KV)
NAN = float("nan")


def choose_baseline(groups: list[fleet.Group], requested: str | None) -> str:
    labels = sorted({g.label for g in groups})
    if requested is not None:
        if requested not in labels:
            raise UsageError(f"unknown baseline label {requested!r}; labels: {', '.join(labels)}")
        return requested
    good = sorted({g.label for g in groups if g.complete and not g.reference})
    return (good or labels)[0]


def _wmean(values: list[float], weights: list[int]) -> float:
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if not math.isnan(v)]
    if len(pairs) < len(values) or not pairs:  # a stage missing from any pooled run stays blank
        return NAN
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def pooled_rows(g: fleet.Group, name: str, gi: int) -> list[dict]:
    """One row per (context, depth) of a group, pooling its runs."""
    by_ctx: dict[tuple[str, int], list[tuple[fleet.RunInfo, fleet.ContextSummary]]] = {}
    for r in g.runs:
        for c in r.contexts:
            by_ctx.setdefault((c.context, c.depth), []).append((r, c))
    bws = [r.bandwidth_gbps for r in g.runs if r.bandwidth_gbps]
    bw = float(np.mean(bws)) if bws else NAN
    rm0 = next((r.read_model for r in g.runs if r.read_model is not None), None)
    rows = []
    for (ctx, depth), items in by_ctx.items():
        rm = rm0 if depth >= 0 else None
        w = [c.timed_tokens for _, c in items]
        plain = _wmean([c.plain_ms for _, c in items], w)
        sd, sd_over = ((float(np.std([c.plain_ms for _, c in items], ddof=1)), "runs") if len(items) > 1
                       else (items[0][1].plain_ms_std or NAN, "tokens"))
        row = {"context": ctx, "depth": depth, "device": g.label, "group": name, "group_index": gi, "runs": len(items),
               "complete": g.complete, "reference": g.reference, "model_key": g.model_key,
               "plain_ms": plain, "plain_sd_ms": sd, "sd_over": sd_over,
               "flags": ", ".join(sorted({f for r, _ in items for f in r.flags}  # raw stage figures pooled in: said
                                         | {"uncalibrated" for _, c in items if not c.calibrated})),
               "tokens_per_s": 1000.0 / plain if plain > 0 else NAN, "calibrated": all(c.calibrated for _, c in items)}
        for s in stages.STAGES:
            row[f"{s}_ms"] = _wmean([c.stage(s) if s in c.stage_ms else NAN for _, c in items], w)
            row[f"{s}_pct"] = _wmean([c.share(s) if s in c.stage_ms else NAN for _, c in items], w)
        nbytes, _ = roofline.context_bytes(items[0][1], rm)  # the graph's bytes when stored, else the model's
        for s in GBPS_STAGES:
            row[f"{s}_gbps"] = roofline.gbps(nbytes.get(s), row[f"{s}_ms"])
        row["bandwidth_gbps"] = bw
        row["x_roofline"] = roofline.x_roofline(plain, sum(nbytes.values()) if nbytes else NAN, bw)
        rows.append(row)
    return rows


def add_baseline(df: pd.DataFrame, groups: list[fleet.Group], base: str) -> list[str]:
    """Fill base_speedup / base_note in place (same model required; differing settings named);
    returns notes on the rows left without a baseline, saying what differs."""
    base_rows = df[df["device"] == base]
    by_key: dict[tuple, dict[int, float]] = {}  # (context, depth, model) -> {baseline group: plain ms}
    for ctx, depth, mk, gi, ms in zip(base_rows["context"], base_rows["depth"], base_rows["model_key"],
                                      base_rows["group_index"], base_rows["plain_ms"], strict=True):
        by_key.setdefault((ctx, depth, mk), {}).setdefault(int(gi), ms)
    base_models = {g.model_key: g.model_name for g in groups if g.label == base}
    speed, note, missing = [], [], {}
    for r in df.itertuples(index=False):
        cand = by_key.get((r.context, r.depth, r.model_key))
        if cand is None:
            why = (f"baseline {base!r} ran this model, not at these contexts"
                   if r.model_key in base_models else
                   f"baseline {base!r} ran a different model ({', '.join(sorted(base_models.values()))})")
            speed.append(NAN)
            note.append("no baseline: " + ("context" if r.model_key in base_models else "model") + " differs")
            missing.setdefault((r.device, r.group, why), []).append(r.context)
            continue
        mine = groups[r.group_index].settings
        diffs = {i: [k for (k, v), (_, w) in zip(groups[i].settings, mine, strict=True) if v != w] for i in cand}
        bi = min(diffs, key=lambda i: (not groups[i].complete, len(diffs[i]), i))
        speed.append(cand[bi] / r.plain_ms if r.plain_ms > 0 else NAN)
        note.append("; ".join([f"base {k}={groups[bi].setting.get(k)}" for k in diffs[bi]]
                              + (["base INCOMPLETE"] if not groups[bi].complete else [])))
    df["base_speedup"], df["base_note"] = speed, note
    return [f"no speedup for {dev} | {grp} at {', '.join(ctx)}: {why}" for (dev, grp, why), ctx in missing.items()]


def group_slopes(groups: list[fleet.Group], names: list[str], engine: str = "pandas") -> pd.DataFrame:
    """Long table: device, group, stage + slope.SLOPE_COLUMNS; a group's runs pooled by a stratified bootstrap
    over each run's rounds (per-round stage sums read with pandas or DuckDB; the reference run has none)."""
    runs = [(gi, r) for gi, g in enumerate(groups) for r in g.runs if not r.reference]
    cols = ["device", "group", columns.STAGE, *slope.SLOPE_COLUMNS]
    paths, named = [r.path for _, r in runs], [r.path for _, r in runs if r.named]  # named: a defect is an error
    long = fleet.round_sums(paths, engine, named) if runs else pd.DataFrame()
    fit = slope.long_slopes(long, np.array([gi for gi, _ in runs]))
    if fit.empty:
        return pd.DataFrame(columns=cols)
    gi = fit.pop("group").to_numpy()
    fit["device"] = [groups[i].label for i in gi]
    fit["group"] = [names[i] for i in gi]
    return fit[cols]


CROSSOVER_COLUMNS = ["crossover_depth", "crossover_ci_low", "crossover_ci_high", "crossover_note"]


def _crossover(rds: list[stats.RoundData], recs: list) -> dict:
    """The group's attn_kv = ffn depth from its pooled time model (facts of the run with the largest n_ctx)."""
    try:
        for rec, path in recs:
            forecast.check_record(rec, path)
        facts = timemodel.AttnFacts.from_run(max((rec for rec, _ in recs), key=lambda rec: rec.params.n_ctx))
        x = next(c for c in forecast.crossovers(timemodel.fit(timemodel.depth_means(rds), facts))
                 if c.key == "attn_eq_ffn")
    except HarnessError as e:
        why = str(e).rsplit(": /", 1)[0]  # the reason, without the file (the row names the group)
        return dict(zip(CROSSOVER_COLUMNS, [NAN, NAN, NAN, f"no time model: {why}"], strict=True))
    lo, hi = (NAN if v is None else v for v in x.ci)
    return {"crossover_depth": NAN if x.depth is None else x.depth, "crossover_ci_low": lo, "crossover_ci_high": hi,
            "crossover_note": "" if x.depth is not None and x.crossed_pct >= 97.5 else
            f"{x.crossed_pct:.0f} % of resamples cross below the context length {x.limit}"}


CROSSOVER_AUTO_GROUPS = 50  # --crossover auto: fit each group's time model up to this many groups


def group_crossovers(groups: list[fleet.Group], names: list[str]) -> pd.DataFrame:
    """device, group + CROSSOVER_COLUMNS: the attn_kv = ffn depth of each group's pooled time model (each run
    read whole: its token table carries the plain and calibration passes the model needs)."""
    cross = []
    for gi, g in enumerate(groups):
        rds, recs = [], []
        for r in (x for x in g.runs if not x.reference):
            run = fleet.read_ops(r.path, r.named, "no op table for the time model")
            if run is not None and not run.ops.empty:
                rds.append(stats.round_data(run.ops, run.tokens))
                recs.append((run.record, r.path))
        if rds and len({d for rd in rds for d in rd.depths}) >= 2:
            cross.append({"device": g.label, "group": names[gi], **_crossover(rds, recs)})
    return pd.DataFrame(cross, columns=["device", "group", *CROSSOVER_COLUMNS])


def compare(groups: list[fleet.Group], baseline: str, slopes: bool = True, engine: str = "pandas",
            crossover: bool | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """(table, slopes, notes): table has one row per group and context, slope and crossover columns merged in.
    ``engine`` (pandas or duckdb) reads the op tables for the slopes; ``crossover`` (default: up to
    CROSSOVER_AUTO_GROUPS groups, and only with slopes) fits each group's time model."""
    crossover = slopes and (len(groups) <= CROSSOVER_AUTO_GROUPS if crossover is None else crossover)
    names = fleet.group_names(groups)
    df = pd.DataFrame([row for gi, (g, n) in enumerate(zip(groups, names, strict=True))
                       for row in pooled_rows(g, n, gi)])
    df = df.sort_values(["depth", "context", "device", "group"], kind="stable", ignore_index=True)
    notes = add_baseline(df, groups, baseline)
    sl = group_slopes(groups, names, engine) if slopes else pd.DataFrame(columns=["device", "group", columns.STAGE])
    cross = group_crossovers(groups, names) if crossover else pd.DataFrame()
    if not sl.empty:
        wide = sl.pivot_table(index=["device", "group"], columns=columns.STAGE, aggfunc="first", dropna=False,
                              values=["slope_ms_per_1k", "ci95_low_ms_per_1k", "ci95_high_ms_per_1k"])
        wide.columns = [f"{s}_slope_ms_per_1k" if v == "slope_ms_per_1k" else f"{s}_slope_{v}"
                        for v, s in wide.columns]
        order = [c for s in (*stages.STAGES, slope.DECODE)
                 for c in (f"{s}_slope_ms_per_1k", f"{s}_slope_ci95_low_ms_per_1k", f"{s}_slope_ci95_high_ms_per_1k")
                 if c in wide.columns]
        df = df.merge(wide[order].reset_index(), on=["device", "group"], how="left")
    if not cross.empty:
        df = df.merge(cross, on=["device", "group"], how="left")
    return df, sl, notes


def _f(v: float, fmt: str = ".2f") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _crossover_cell(df: pd.DataFrame, dev: str, grp: str) -> str:
    if "crossover_depth" not in df.columns:
        return ""
    r = df[(df["device"] == dev) & (df["group"] == grp)].iloc[0]
    d, lo, hi = (_f(r[k], ",.0f") or "beyond" for k in ("crossover_depth", "crossover_ci_low", "crossover_ci_high"))
    return f"{d} [{lo}, {hi}]" + (f" ({r['crossover_note']})" if r["crossover_note"] else "")


def format_md(df: pd.DataFrame, sl: pd.DataFrame, notes: list[str], baseline: str, n_runs: int) -> str:
    shown = [s for s in stages.STAGES if (df[f"{s}_ms"].fillna(0) > 0).any()]
    out = [f"# Decode compare: {n_runs} runs, {df['device'].nunique()} devices, "
           f"{df[['device', 'group']].drop_duplicates().shape[0]} groups; baseline: {baseline}", "",
           "ms/token: plain pass (no profiler); stage ms (% of decode), calibrated: they add up to the plain ms/token "
           "(raw in rows flagged uncalibrated); GB/s: read-model bytes / stage time; "
           "x roofline: plain ms / (bytes per token / measured bandwidth); speedup: baseline ms / row ms."]
    for (depth, ctx), sub in df.groupby(["depth", "context"], sort=True):
        head = ["device", "group", "runs", "ms/tok", "±", "tok/s", *(f"{s} ms (%)" for s in shown),
                "ffn GB/s", "attn_kv GB/s", "bw GB/s", "x roofline", "speedup", "base note", "flags"]
        rows = [[r["device"], r["group"], str(r["runs"]), _f(r["plain_ms"]),
                 f"{_f(r['plain_sd_ms'])} ({r['sd_over']})" if _f(r["plain_sd_ms"]) else "",
                 _f(r["tokens_per_s"], ".1f"),
                 *(f"{_f(r[f'{s}_ms'])} ({_f(r[f'{s}_pct'], '.1f')})" if not math.isnan(r[f"{s}_ms"]) else ""
                   for s in shown),
                 _f(r["ffn_gbps"], ".1f"), _f(r["attn_kv_gbps"], ".1f"), _f(r["bandwidth_gbps"], ".1f"),
                 _f(r["x_roofline"]), _f(r["base_speedup"], ".3f"), r["base_note"], r["flags"]]
                for r in sub.to_dict("records")]
        out += ["", f"## context {ctx} (depth {depth})", "", format_table(head, rows, numeric_from=2)]
    if not sl.empty:
        st = [s for s in (*stages.STAGES, slope.DECODE) if s in set(sl[columns.STAGE])]
        out += ["", "## slope: ms/token per 1,000 KV tokens [95 % bootstrap interval over rounds, depths paired]; "
                "crossover: the time model's depth where attn_kv reaches ffn (python -m analysis.predict)", ""]
        rows, marked = [], False
        for (dev, grp), sub in sl.groupby(["device", "group"], sort=True):
            by = sub.set_index(columns.STAGE)
            marked |= bool(off := {s for s in st if s in by.index and slope.off_zero(s, by.loc[s])})
            cells = [f"{_f(by.at[s, 'slope_ms_per_1k'], '.3f')} [{_f(by.at[s, 'ci95_low_ms_per_1k'], '.3f')}, "
                     f"{_f(by.at[s, 'ci95_high_ms_per_1k'], '.3f')}]" + "!" * (s in off) if s in by.index else ""
                     for s in st]
            rows.append([dev, grp, str(int(by["n_rounds"].max())), str(int(by["n_depths"].max())), *cells,
                         _crossover_cell(df, dev, grp)])
        out.append(format_table(["device", "group", "rounds", "depths", *st, "attn_kv = ffn at depth [95 %]"], rows,
                                numeric_from=2))
        if marked:
            out += ["", "! a depth-invariant stage (its bytes do not depend on depth) whose 99 % interval excludes 0 "
                    "(five judged together at 95 %): a context's own offset or a small effect of depth on time"]
    if notes:
        out += ["", "## notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(out)


def build_parser() -> ArgParser:
    ap = ArgParser(prog="python -m analysis.compare", description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", metavar="RUN_OR_DIR", help="run files or folders (searched recursively)")
    ap.add_argument("--baseline", default=None, help="baseline device label (default: first complete label A-Z)")
    ap.add_argument("--format", choices=("md", "csv"), default="md")
    ap.add_argument("--plots", default=None, metavar="DIR", help="write PNG + SVG plots here")
    ap.add_argument("--hostname", action="store_true", help="append @hostname to automatic (CPU-derived) labels")
    ap.add_argument("--no-slopes", action="store_true", help="skip the slope and time-model fits (reads no op tables)")
    ap.add_argument("--crossover", choices=("auto", "on", "off"), default="auto",
                    help="fit each group's time model for its crossover depth (auto: up to "
                    f"{CROSSOVER_AUTO_GROUPS} groups; a fleet's slopes stay fast without it)")
    ap.add_argument("--engine", choices=fleet.ENGINES, default="auto",
                    help=f"how the fleet is read (default auto: duckdb from {fleet.DUCKDB_MIN_RUNS} runs on)")
    return ap


def _main(argv: list[str] | None) -> int:
    a = build_parser().parse_args(argv)
    if a.plots:  # an unwritable plot folder is found before the work, not after the table
        store.check_out_dir(a.plots, hard_links=False)
    runs = fleet.load_runs(a.paths, with_hostname=a.hostname, engine=a.engine)
    groups = fleet.group_runs(runs)
    baseline = choose_baseline(groups, a.baseline)
    cross = {"auto": None, "on": True, "off": False}[a.crossover]
    df, sl, notes = compare(groups, baseline, slopes=not a.no_slopes, engine=fleet.resolve_engine(a.engine, len(runs)),
                            crossover=cross)
    if a.format == "csv":
        for n in notes:
            log.warning("note: %s", n)
        df.drop(columns=["model_key", "group_index"]).to_csv(sys.stdout, index=False, float_format="%.6g")
    else:
        sys.stdout.write(format_md(df, sl, notes, baseline, len(runs)) + "\n")
    if a.plots:
        from analysis import compare_plots
        for p in compare_plots.write_plots(df, a.plots):
            log.info("plot written: %s", p)
    return 0


def main(argv: list[str] | None = None) -> int:
    with paused_gc():  # a short command: see harness.cli.paused_gc
        return run_cli("analysis.compare", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
