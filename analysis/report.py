"""One self-contained HTML page to share: the measurement table, the figures, the device, model and
engine, every flag the runs raised and, with several runs, the device comparison.

    python -m analysis.report RUN_OR_DIR... -o report.html [--model-variant auto|exact|exact_padded|seed]
        [--model GGUF] [--baseline LABEL] [--engine auto|pandas|duckdb] [--detail N] [--title TEXT]

The page has no scripts and no external references (inline CSS, figures as inline SVG); it reads
in a browser and prints on A4 landscape (a page per section). Sections: a summary with every flag
(warnings in amber: incomplete run, the drift, state, noise, overhead and calibration flags the run
lists; notes in blue: synthetic twin, reference figures, resumed run, no bandwidth probe; runs beyond
``--detail`` by flag kind), the comparison (two or more runs: ``analysis.compare``'s tables and plots), then per run
(the first ``--detail`` runs, default 8): flags, device / model / engine facts, the measurement
table against the read model (``analysis.table``: one column per context), the stage slopes and
the four figures (``analysis.plots``).
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from analysis import compare, fleet, plots, run_facts, table
from analysis import report_html as h
from harness import store
from harness.cli import ArgParser, run_cli
from harness.errors import OutputError, UsageError
from harness.fsutil import atomic_write
from harness.record import RunRecord

log = logging.getLogger(__name__)
FIGURE_CAPTIONS = {
    "read_per_token": "Modelled FFN and KV-cache MiB read per token against depth (read model).",
    "stage_shares": "Measured stage shares of the calibrated stage sum (about the plain decode time; of the profiled "
                    "wall time for a run without calibration, as the axis says) against depth.",
    "stage_ms": "Measured ms per token by stage; the bar is the plain (unprofiled) decode time.",
    "roofline": "Stage time against modelled bytes per stage; the dashed line is the device's measured bandwidth.",
    "compare_stage_ms": "Stage ms per token, one bar per device group, per context.",
    "compare_stage_share": "Stage share of the calibrated stage sum against depth, one line per device group (raw "
                           "for groups that pool a run without calibration, as the axis says).",
    "compare_roofline": "Achieved bandwidth as a fraction of each device's measured read bandwidth.",
}


def measurement_table(rec: RunRecord, model) -> str:
    """analysis.table's table turned on its side: one row per quantity, one column per context."""
    df = table.build_table(rec, model)
    head = ["", *(f"{r['context']} ({r['input_tokens']})" for _, r in df.iterrows())]
    rows = [[header, *("" if v is None or v != v else spec.format(v) for v in df[col])]  # v != v: NaN
            for col, header, spec in table.COLUMNS[2:]]
    return h.table(head, rows, row_heads=True)


def run_section(i: int, run: store.Run, variant: str, model_path: str | None) -> tuple[str, list]:
    """(HTML of one run's section, its flags)."""
    rec = run.record
    model = table.load_read_model(rec, variant, model_path)
    flags = run_facts.flags(rec)
    figs = plots.make_figures(rec, model)
    sl = table.slope_table(run)
    parts = [f'<section class="page" id="run-{i}"><h2>Run {i}: {h.esc(run_facts.label(rec))} — '
             f"{h.esc(run_facts.model_name(rec))}</h2>",
             f'<p class="sub"><code>{h.esc(run.path)}</code></p>', h.flags([("", f) for f in flags]),
             '<div class="facts">', h.kv_table("Device", run_facts.device_rows(rec)),
             h.kv_table("Model", run_facts.model_rows(rec)), h.kv_table("Engine and settings",
                                                                        run_facts.engine_rows(rec)), "</div>",
             f'<p class="sysinfo">{h.esc(run_facts.system_info(rec))}</p>',
             '<div class="pair"><div><h3>Measurement table</h3>',
             *(f"<p>{h.inline(ln)}</p>" for ln in table.describe(rec, model)), measurement_table(rec, model),
             "</div>"]
    if sl is not None:
        parts += ["<div><h3>Stage slopes</h3>", h.markdown(table.format_slopes(sl)), "</div>"]
    parts += ["</div>", f'<p class="note">{h.esc(table.NOTES)}</p>', "<h3>Figures</h3>", '<div class="figs">',
              *(h.figure(fig, f"r{i}-{name}", FIGURE_CAPTIONS[name]) for name, fig in figs.items()), "</div></section>"]
    return "\n".join(parts), flags


def comparison_section(runs: list[fleet.RunInfo], baseline: str | None, engine: str) -> str:
    from analysis import compare_plots

    groups = fleet.group_runs(runs)
    base = compare.choose_baseline(groups, baseline)
    df, sl, notes = compare.compare(groups, base, engine=engine)
    figs = compare_plots.make_figures(df)
    no_bw = ""
    if not df["x_roofline"].notna().any():  # nothing to draw: say so instead of empty panels
        del figs["compare_roofline"]
        no_bw = ('<p class="note">No bandwidth figure: no run measured its device bandwidth (swept with '
                 "--no-probe, or recorded figures).</p>")
    return "\n".join(['<section class="page" id="compare">',
                      h.markdown(compare.format_md(df, sl, notes, base, len(runs)), shift=1, keep=2),
                      "<h3>Comparison figures</h3>",
                      *(h.figure(fig, f"c-{name}", FIGURE_CAPTIONS[name]) for name, fig in figs.items()),
                      no_bw, "</section>"])


def summary(title: str, runs: list[fleet.RunInfo], detailed: list[store.Run], all_flags: list, compared: bool) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    devices = sorted({r.label for r in runs})
    models = sorted({r.model_name for r in runs})
    toc = (['<li><a href="#compare">Comparison</a></li>'] if compared else []) + [
        f'<li><a href="#run-{i}">Run {i}: {h.esc(run_facts.label(r.record))} — {h.esc(run_facts.model_name(r.record))}'
        f"</a></li>" for i, r in enumerate(detailed, 1)]
    more = len(runs) - len(detailed)
    return "\n".join([
        f"<header><h1>{h.esc(title)}</h1>",
        f'<p class="sub">{len(runs)} run{"s" * (len(runs) != 1)} · {len(devices)} device'
        f'{"s" * (len(devices) != 1)}: {h.esc(", ".join(devices[:12]))}{" …" * (len(devices) > 12)} · '
        f"model{'s' * (len(models) != 1)}: {h.esc(', '.join(models[:6]))} · generated {when}</p></header>",
        "<h3>Flags</h3>", h.flags(all_flags) if all_flags else "<p>No flags: complete runs on a real model.</p>",
        f"<nav><h3>Contents</h3><ol>{''.join(toc)}</ol></nav>",
        f'<p class="note">{more} more run{"s" * (more != 1)} appear in the comparison only (--detail).</p>'
        if more > 0 else ""])


def build(paths: list[str], variant: str = "auto", model_path: str | None = None, baseline: str | None = None,
          engine: str = "auto", detail: int = 8, title: str | None = None) -> str:
    runs = fleet.load_runs(paths, engine=engine)
    detailed = [run for r in runs[:max(detail, 0)]  # a bad op table: an error for a named run, else skipped
                if (run := fleet.read_ops(r.path, r.named, "no detailed section")) is not None]
    sections, all_flags = [], []
    for i, run in enumerate(detailed, 1):
        html_part, flags = run_section(i, run, variant, model_path)
        sections.append(html_part)
        all_flags += [(f"Run {i} ({run_facts.label(run.record)})", f) for f in flags]
    runs_by_flag: dict[run_facts.Flag, list[str]] = {}  # the same flag on several runs: one box naming them all
    for who, f in all_flags:
        runs_by_flag.setdefault(f, []).append(who)
    shown, rest = {run.path for run in detailed}, {}  # runs beyond --detail: their flag kinds, from the footer
    for r in runs:
        if r.path not in shown:
            for kind in {*r.flags, *["synthetic"] * r.synthetic, *["incomplete"] * (not r.complete)}:
                rest.setdefault(kind, []).append(f"{r.label} ({Path(r.path).name})")
    compared = len(runs) > 1
    all_flags = sorted([*((", ".join(who), f) for f, who in runs_by_flag.items()),
                        *(run_facts.brief(k, v, compared) for k, v in sorted(rest.items()))],
                       key=lambda wf: wf[1].level != run_facts.WARNING)
    if compared:
        sections.insert(0, comparison_section(runs, baseline, fleet.resolve_engine(engine, len(runs))))
    title = title or ("Decode profile: " + ", ".join(sorted({r.label for r in runs})[:4])
                      + (" …" if len({r.label for r in runs}) > 4 else ""))
    return h.page(title, summary(title, runs, detailed, all_flags, compared) + "\n" + "\n".join(sections))


def write(text: str, out: str | os.PathLike) -> Path:
    """Write the page atomically (a temp file in the same folder, renamed over any old report; the temp file is
    removed whatever stops the write, Ctrl-C included)."""
    p = Path(out)
    try:
        return atomic_write(p, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)
    except OSError as e:
        raise OutputError(f"could not write the report ({e.strerror or e}): {p}") from None


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="python -m analysis.report", description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", metavar="RUN_OR_DIR", help="run files or folders (searched recursively)")
    ap.add_argument("-o", "--out", required=True, help="the HTML file to write")
    ap.add_argument("--model-variant", default="auto", choices=table.VARIANT_CHOICES)
    ap.add_argument("--model", default=None, help="GGUF whose tensor table to use when a run lacks one")
    ap.add_argument("--baseline", default=None, help="baseline device label of the comparison")
    ap.add_argument("--engine", choices=fleet.ENGINES, default="auto", help="how the fleet is read")
    ap.add_argument("--detail", type=int, default=8, help="runs with their own section (default 8)")
    ap.add_argument("--title", default=None)
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.is_dir():
        raise UsageError(f"--out is a folder, expected an .html file: {out}")
    store.check_out_dir(out.parent if str(out.parent) else ".", hard_links=False)  # replaced whole by a rename
    page = build(a.paths, a.model_variant, a.model, a.baseline, a.engine, a.detail, a.title)
    log.info("report written: %s (%.0f kB)", write(page, out), len(page.encode()) / 1e3)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("analysis.report", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
