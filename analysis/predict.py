"""Where does attention overtake the FFN? Predicted ms/token at any depth from a run's calibrated time model.

    python -m analysis.predict RUN.parquet [--depth 8192,32768] [--fit-depths 13,172,658] [--format md|csv|json]
                               [--cache-type-k T --cache-type-v T --with RUN2.parquet]

Fits ``analysis.timemodel`` on the run (or on ``--fit-depths`` only) and prints: the fitted parameters;
predicted plain ms/token and every stage's ms and share, with 95 % intervals, at ``--depth`` (default:
the run's depths and powers of two from 1,024 below the model's context length); the crossover depths
(attention over the KV cache at 25 % and 50 % of decode, and equal to the FFN); and predicted vs
measured at every depth of the run, the ones left out of the fit being the validation. Another KV
cache type needs a run made with it (``--with``): its attention and kv_store costs replace the run's.
"""

from __future__ import annotations

import json
import logging
import math
import sys

import pandas as pd

from analysis import forecast, timemodel
from harness import stages, stats, store
from harness.cli import ArgParser, format_table, run_cli
from harness.errors import InputError, UsageError
from harness.gguf_model import cache_type_bytes

log = logging.getLogger(__name__)
DEFAULT_EXTRA_DEPTHS = tuple(1024 << k for k in range(8))  # 1,024 ... 131,072, kept below the context length


def parse_depths(text: str, flag: str) -> list[int]:
    out = []
    for tok in text.split(","):
        tok = tok.strip().replace("_", "")
        if not (tok.isascii() and tok.isdigit()):  # int() refuses other scripts' digits
            raise UsageError(f"{flag}: {tok!r} is not a depth (a whole number of tokens >= 0)")
        out.append(int(tok))
    return sorted(set(out))


def _types(rec) -> tuple[str, str]:
    return rec.params.cache_type_k.lower(), rec.params.cache_type_v.lower()


def _tname(t: tuple[str, str]) -> str:
    return t[0] if t[0] == t[1] else f"K {t[0]}, V {t[1]}"


def kv_source(run: store.Run, ctk: str | None, ctv: str | None, others: list[store.Run]) -> store.Run | None:
    """The run whose attention and kv_store costs serve the requested cache types: None for ``run`` itself,
    else the one of ``others`` made with them. A KV type no run measured is refused (UsageError)."""
    have = _types(run.record)
    want = ((ctk or have[0]).lower(), (ctv or have[1]).lower())
    for t in want:
        cache_type_bytes(t)  # an unknown type is a UsageError
    if want == have:
        if others:
            raise UsageError(f"--with gives the KV cost of another cache type, but {_tname(want)} is the run's own: "
                             "pass --cache-type-k/--cache-type-v")
        return None
    src = next((o for o in others if _types(o.record) == want), None)
    if src is None:
        made = "".join(f"; {o.path} was made with {_tname(_types(o.record))}" for o in others)
        raise UsageError(f"cannot predict {_tname(want)} from a run made with {_tname(have)}: give a second run "
                         f"made with {_tname(want)} (--with RUN2){made}")
    a, b = run.record, src.record
    for what, x, y in (("model", a.model.content_hash or a.model.name, b.model.content_hash or b.model.name),
                       ("threads", a.params.threads, b.params.threads),
                       ("GPU layers", a.params.n_gpu_layers, b.params.n_gpu_layers),
                       ("flash attention", a.params.flash_attn_resolved, b.params.flash_attn_resolved),
                       ("calibration", *("calibrated" if r.calibrated else "raw" for r in (a, b)))):
        if x != y:
            raise InputError(f"--with {src.path}: another {what} than the run's ({y} vs {x}): "
                             "its costs do not carry over")
    return src


def default_depths(dm: timemodel.DepthMeans, limit: int) -> list[int]:
    return sorted({int(d) for d in dm.depths} | {d for d in DEFAULT_EXTRA_DEPTHS if d < limit})


def _f(v, fmt: str = ".2f") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _ci(lo, hi, fmt: str = ".2f") -> str:
    return f"[{_f(lo, fmt)}, {_f(hi, fmt)}]"


def header(run: store.Run, tm: timemodel.TimeModel) -> list[str]:
    rec, f = run.record, tm.facts
    n_boot = len(tm.theta_boot)
    lines = [f"# Time model: {rec.display_label} | {rec.model.name or rec.model.arch} | flash attention "
             f"{'on' if f.model.flash_attn else 'off'} | KV {_tname(f.cache_types)} | threads {rec.params.threads}",
             "", f"Fitted on depths {', '.join(map(str, tm.fit_depths))} ({tm.n_rounds} rounds; 95 % intervals: "
             f"{n_boot} bootstrap resamples of rounds, depths paired by round; sampling noise only).", "",
             "attn_kv(L) = sum over attention layers of a[r] + b[r] x MiB the layer reads at depth L (its KV "
             f"cells: the read model's n_kv rules; r: its kernel regime); {tm.form} fit. Every other stage is "
             "depth-invariant; plain ms/token = stage sum + offset.", ""]
    lo, hi = stats.interval(tm.theta_boot)
    rows = []
    for name, v, a, b in zip(tm.param_names, tm.theta, lo, hi, strict=True):
        per_mib = name.startswith("b")
        rows.append([name, f"{v:.4g} {'ms/MiB' if per_mib else 'ms/layer'}", _ci(a, b, ".4g"),
                     f"{1e3 * timemodel.MIB / v / 1e9:.1f} GB/s" if per_mib and v > 0 else ""])
    o_lo, o_hi = stats.interval(tm.offset_boot)
    rows.append(["offset", f"{tm.offset:.3f} ms/token", _ci(o_lo, o_hi, ".3f"), "plain - calibrated stage sum"])
    lines += [format_table(["parameter", "value", "95 % interval", "effective"], rows), ""]
    lines += [f"- regime {r}: {timemodel.REGIME_TEXT[r]}" for r in tm.use]
    lines += [f"- note: {n}" for n in tm.notes]
    return lines


def prediction_md(p: forecast.Prediction) -> list[str]:
    a, ff = stats.S[stages.ATTN_KV], stats.S[stages.FFN]
    rows = []
    for i, d in enumerate(p.depths):
        rest = [j for j in stats.S.values() if j not in (a, ff)]
        rows.append([f"{d:,}", _f(p.kv_mib[i]), f"{_f(p.plain[i])} {_ci(*p.plain_ci[:, i])}",
                     f"{_f(p.stage[i, a], '.3f')} {_ci(*p.stage_ci[:, i, a], '.3f')}",
                     f"{_f(p.share[i, a], '.1f')} {_ci(*p.share_ci[:, i, a], '.1f')}",
                     f"{_f(p.stage[i, ff])} {_ci(*p.stage_ci[:, i, ff])}", _f(p.share[i, ff], ".1f"),
                     _f(p.stage[i, rest].sum()), p.regimes[i]])
    head = ["depth", "KV read MiB", "plain ms/token", "attn_kv ms", "attn_kv %", "ffn ms", "ffn %", "other stages ms",
            "layers by regime"]
    return ["## Predicted per token (calibrated stage ms; shares of their sum)", "", format_table(head, rows)]


def crossover_md(xs: list[forecast.Crossover]) -> list[str]:
    rows = [[x.label, x.text(), x.ci_text(), f"{x.crossed_pct:.1f} %"] for x in xs]
    return [f"## Crossovers (smallest depth, searched below {xs[0].limit_text}: {xs[0].limit:,})", "",
            format_table(["criterion", "depth", "95 % interval", "resamples that cross"], rows)]


def validation_md(val: pd.DataFrame, tm: timemodel.TimeModel) -> list[str]:
    rows = []
    for r in val.itertuples(index=False):
        v = r._asdict()
        cells = [f"{r.depth:,}", "fit" if r.fitted else "held out"]
        for key, fmt in (("plain", ".2f"), (stages.ATTN_KV, ".3f")):
            err = _ci(v[f"{key}_error_ci_low"], v[f"{key}_error_ci_high"], "+.1f")
            cells += [_f(v[f"{key}_measured"], fmt), _f(v[f"{key}_predicted"], fmt),
                      f"{_f(v[f'{key}_error_pct'], '+.1f')} {err}"]
        rows.append(cells)
    held = int((~val["fitted"]).sum())
    head = ["depth", "", "plain measured", "plain predicted", "error %", "attn_kv measured", "attn_kv predicted",
            "error %"]
    return [f"## Predicted vs measured (fitted on {', '.join(map(str, tm.fit_depths))}; {held} depth(s) held out)", "",
            format_table(head, rows), "", "Error: (predicted - measured) / measured; interval: the same resampled "
            "rounds on both sides. Held-out depths are the model's validation (fit depths show its residuals)."]


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def render(run: store.Run, tm, p, xs, val: pd.DataFrame | None, fmt: str) -> str:
    if fmt == "json":
        doc = {"run": run.path, "label": run.record.display_label, "model": tm.to_dict(), "predictions": p.rows(),
               "crossovers": [x.to_dict() for x in xs],
               "validation": val.to_dict(orient="records") if val is not None else None}
        return json.dumps(_clean(doc), indent=1) + "\n"
    if fmt == "csv":
        return long_table(tm, p, xs, val).to_csv(index=False, float_format="%.6g")
    parts = [*header(run, tm), "", *prediction_md(p), "", *crossover_md(xs)]
    if val is not None:
        parts += ["", *validation_md(val, tm)]
    return "\n".join(parts) + "\n"


def long_table(tm, p: forecast.Prediction, xs, val: pd.DataFrame | None) -> pd.DataFrame:
    """One tidy table: section, depth, quantity, value, ci_low, ci_high, note."""
    rows = []
    lo, hi = stats.interval(tm.theta_boot)
    for n, v, a, b in zip(tm.param_names, tm.theta, lo, hi, strict=True):
        rows.append(("parameter", None, n, v, a, b, "ms/MiB" if n.startswith("b") else "ms/layer"))
    for r in p.rows():
        rows.append(("prediction", r["depth"], "kv_read_mib", r["kv_read_mib"], None, None, r["regimes"]))
        for q in ["plain_ms", *(f"{s}_{u}" for s in stages.STAGES for u in ("ms", "pct"))]:
            rows.append(("prediction", r["depth"], q, r[q], *r[f"{q}_ci"], ""))
    for x in xs:
        rows.append(("crossover", None, x.key, x.depth, x.ci[0], x.ci[1],
                     f"{x.crossed_pct:.1f} % of resamples cross below {x.limit}"))
    for r in ([] if val is None else val.to_dict(orient="records")):
        for key, _ in forecast.VALIDATED:
            note = "fit" if r["fitted"] else "held out"
            rows.append(("validation", r["depth"], f"{key}_measured", r[f"{key}_measured"],
                         r[f"{key}_measured_ci_low"], r[f"{key}_measured_ci_high"], note))
            rows.append(("validation", r["depth"], f"{key}_predicted", r[f"{key}_predicted"],
                         r[f"{key}_predicted_ci_low"], r[f"{key}_predicted_ci_high"], note))
            rows.append(("validation", r["depth"], f"{key}_error_pct", r[f"{key}_error_pct"],
                         r[f"{key}_error_ci_low"], r[f"{key}_error_ci_high"], note))
    df = pd.DataFrame(rows, columns=["section", "depth", "quantity", "value", "ci_low", "ci_high", "note"])
    return df.astype({"depth": "Int64"})


def build_parser() -> ArgParser:
    ap = ArgParser(prog="python -m analysis.predict", description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a run Parquet file (round-robin, >= 2 depths)")
    ap.add_argument("--depth", default=None, help="depths to predict, e.g. 8192,32768 (default: the run's and "
                    "powers of two from 1024 below the context length)")
    ap.add_argument("--fit-depths", default=None, help="fit on these of the run's depths only; the others validate")
    ap.add_argument("--format", choices=("md", "csv", "json"), default="md")
    ap.add_argument("-ctk", "--cache-type-k", default=None, help="predict for this K cache type (needs --with)")
    ap.add_argument("-ctv", "--cache-type-v", default=None, help="predict for this V cache type (needs --with)")
    ap.add_argument("--with", dest="with_runs", action="append", default=[], metavar="RUN2",
                    help="a run made with the requested cache types: its attention and kv_store costs are used")
    ap.add_argument("--boot", type=int, default=stats.N_BOOT, help="bootstrap resamples (default %(default)s)")
    return ap


def _main(argv: list[str] | None) -> int:
    a = build_parser().parse_args(argv)
    if a.boot < 100:
        raise UsageError(f"--boot must be >= 100, got {a.boot}")
    depths = parse_depths(a.depth, "--depth") if a.depth is not None else None
    fit_depths = parse_depths(a.fit_depths, "--fit-depths") if a.fit_depths is not None else None
    run = store.read_run(a.run)
    src = kv_source(run, a.cache_type_k, a.cache_type_v, [store.read_run(p) for p in a.with_runs])
    if src is not None and fit_depths is not None:
        raise UsageError("--fit-depths validates against the run's own measurements: use it without another cache "
                         "type (or on RUN2 itself)")
    if not run.record.complete:
        log.warning("warning: %s is an incomplete run", a.run)
    tm, dm = forecast.fit_run(run, fit_depths, a.boot)
    val = forecast.validate(tm, dm)
    if src is not None:
        kv, _ = forecast.fit_run(src, None, a.boot, seed=1)
        tm = timemodel.with_kv(tm, kv, f"attention over the KV cache and kv_store from {src.path} "
                                       f"({_tname(_types(src.record))}), fitted on its depths "
                                       f"{', '.join(map(str, kv.fit_depths))} ({kv.n_rounds} rounds)")
        val = None
    limit = forecast.search_limit(tm.facts)
    depths = depths if depths is not None else default_depths(dm, limit)
    beyond = [d for d in depths if d >= limit]
    if beyond:
        raise UsageError(f"--depth {beyond[0]} is beyond {forecast.limit_words(bool(tm.facts.context_length))} "
                         f"({limit:,} tokens: depths up to {limit - 1:,})")
    sys.stdout.write(render(run, tm, forecast.predict(tm, depths), forecast.crossovers(tm), val, a.format))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("analysis.predict", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
