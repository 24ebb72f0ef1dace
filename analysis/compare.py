"""Compare devices: one table per context, one row per device group (device x model x settings).

    python -m analysis.compare runs/ other-runs/*.parquet [--baseline LABEL] [--format md|csv] [--plots DIR]

- Groups: runs with the same device label, model (content hash, else name + quant) and
  work-changing settings (threads, flash_attn, cache_type_k/v, n_gpu_layers) are pooled; the row
  label shows the model and every setting that differs between groups. Incomplete runs form
  their own groups, marked INCOMPLETE.
- Main table from the per-context summaries in each run's metadata (no op table read):
  plain ms/token (mean over tokens, pooled token-weighted over runs; +/- is the std across runs when
  a group has >= 2 runs, else across tokens), tokens/s, stage ms/token and share of profiled
  time, achieved GB/s of ffn and attn_kv (read-model bytes / stage time), the device's measured
  read bandwidth, x roofline (plain ms / (read-model bytes per token / bandwidth)), and speedup vs
  the baseline device (baseline ms / row ms, same model; a differing setting is named in base_note).
- Default baseline: the alphabetically first label that has a complete, non-reference run.
- Slopes: per group and stage, least squares through each depth's mean ms/token, in ms per 1,000 KV
  tokens, with a 95 % bootstrap interval over rounds (depths paired by round; runs stratified).
- Crossover: per group, the depth where attention over the KV cache reaches the FFN's time, from the
  group's time model (``analysis.timemodel``, runs pooled), with its 95 % interval (``crossover_*`` columns).
"""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import pandas as pd

from analysis import fleet, forecast, roofline, slope, timemodel
from harness import columns, stages, stats, store
from harness.cli import ArgParser, format_table, run_cli
from harness.errors import HarnessError, InputError, UsageError

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
        if len(items) > 1:
            sd, sd_over = float(np.std([c.plain_ms for _, c in items], ddof=1)), "runs"
        else:
            sd, sd_over = items[0][1].plain_ms_std or NAN, "tokens"
        row = {"context": ctx, "depth": depth, "device": g.label, "group": name, "group_index": gi, "runs": len(items),
               "complete": g.complete, "reference": g.reference, "model_key": g.model_key,
               "plain_ms": plain, "plain_sd_ms": sd, "sd_over": sd_over,
               "flags": ", ".join(sorted({f for r, _ in items for f in r.flags})),
               "tokens_per_s": 1000.0 / plain if plain > 0 else NAN}
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
    by_key = {k: sub for k, sub in base_rows.groupby(["context", "depth", "model_key"], sort=False)}
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
        mine = groups[r.group_index].setting
        diffs = {int(i): [k for k in fleet.SETTINGS if groups[i].setting.get(k) != mine.get(k)]
                 for i in cand["group_index"]}
        bi = min(diffs, key=lambda i: (not groups[i].complete, len(diffs[i]), i))
        b = cand[cand["group_index"] == bi].iloc[0]
        speed.append(b["plain_ms"] / r.plain_ms if r.plain_ms > 0 else NAN)
        note.append("; ".join([f"base {k}={groups[bi].setting.get(k)}" for k in diffs[bi]]
                              + (["base INCOMPLETE"] if not groups[bi].complete else [])))
    df["base_speedup"] = speed
    df["base_note"] = note
    return [f"no speedup for {dev} | {grp} at {', '.join(ctx)}: {why}" for (dev, grp, why), ctx in missing.items()]


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
        return dict(zip(CROSSOVER_COLUMNS, [NAN, NAN, NAN, f"no time model: {e}"], strict=True))
    lo, hi = (NAN if v is None else v for v in x.ci)
    return {"crossover_depth": NAN if x.depth is None else x.depth, "crossover_ci_low": lo, "crossover_ci_high": hi,
            "crossover_note": "" if x.depth is not None and x.crossed_pct >= 97.5 else
            f"{x.crossed_pct:.0f} % of resamples cross below the context length {x.limit}"}


def group_slopes(groups: list[fleet.Group], names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(slopes, crossovers). Slopes: long table of device, group, stage + slope.SLOPE_COLUMNS; crossovers: device,
    group + CROSSOVER_COLUMNS. A group's runs pooled by a stratified bootstrap over each run's rounds (only the
    needed op-table columns are read)."""
    cols = ["device", "group", columns.STAGE, *slope.SLOPE_COLUMNS]
    out, cross = [], []
    for gi, g in enumerate(groups):
        rds, recs = [], []
        for r in g.runs:
            if r.reference:
                continue
            try:
                run = store.read_run(r.path, only=slope.NEEDED_COLUMNS)
            except InputError as e:
                log.warning("no op table for slopes: %s", e)
                continue
            if not run.ops.empty:
                rds.append(stats.round_data(run.ops, run.tokens))
                recs.append((run.record, r.path))
        if not rds or len({d for rd in rds for d in rd.depths}) < 2:
            continue
        fit = slope.pooled_slopes(rds).reset_index()
        fit = fit[fit["slope_ms_per_1k"].notna() & ((fit["intercept_ms"] != 0) | (fit["slope_ms_per_1k"] != 0))]
        out.append(fit.assign(device=g.label, group=names[gi]))
        cross.append({"device": g.label, "group": names[gi], **_crossover(rds, recs)})
    return (pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols),
            pd.DataFrame(cross, columns=["device", "group", *CROSSOVER_COLUMNS]))


def compare(groups: list[fleet.Group], baseline: str, slopes: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """(table, slopes, notes): table has one row per group and context, slope columns merged in."""
    names = fleet.group_names(groups)
    df = pd.DataFrame([row for gi, (g, n) in enumerate(zip(groups, names, strict=True))
                       for row in pooled_rows(g, n, gi)])
    df = df.sort_values(["depth", "context", "device", "group"], kind="stable", ignore_index=True)
    notes = add_baseline(df, groups, baseline)
    sl, cross = group_slopes(groups, names) if slopes else (pd.DataFrame(columns=["device", "group", columns.STAGE]),
                                                             pd.DataFrame())
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
           "ms/token: plain pass (no profiler); stage ms (% of decode), calibrated: they add up to the plain ms/token; "
           "GB/s: read-model bytes / stage time; "
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
                for _, r in sub.iterrows()]
        out += ["", f"## context {ctx} (depth {depth})", "", format_table(head, rows, numeric_from=2)]
    if not sl.empty:
        st = [s for s in (*stages.STAGES, slope.DECODE) if s in set(sl[columns.STAGE])]
        out += ["", "## slope: ms/token per 1,000 KV tokens [95 % bootstrap interval over rounds, depths paired]; "
                "crossover: the time model's depth where attn_kv reaches ffn (python -m analysis.predict)", ""]
        rows = []
        for (dev, grp), sub in sl.groupby(["device", "group"], sort=True):
            by = sub.set_index(columns.STAGE)
            cells = [f"{_f(by.at[s, 'slope_ms_per_1k'], '.3f')} [{_f(by.at[s, 'ci95_low_ms_per_1k'], '.3f')}, "
                     f"{_f(by.at[s, 'ci95_high_ms_per_1k'], '.3f')}]" if s in by.index else "" for s in st]
            rows.append([dev, grp, str(int(by["n_rounds"].max())), str(int(by["n_depths"].max())), *cells,
                         _crossover_cell(df, dev, grp)])
        out.append(format_table(["device", "group", "rounds", "depths", *st, "attn_kv = ffn at depth [95 %]"], rows,
                                numeric_from=2))
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
    return ap


def _main(argv: list[str] | None) -> int:
    a = build_parser().parse_args(argv)
    runs = fleet.load_runs(a.paths, with_hostname=a.hostname)
    groups = fleet.group_runs(runs)
    baseline = choose_baseline(groups, a.baseline)
    df, sl, notes = compare(groups, baseline, slopes=not a.no_slopes)
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
    return run_cli("analysis.compare", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
