"""Per-context summaries of a sweep (stored in the run metadata) and the summary table printed at the end."""

from __future__ import annotations

import pandas as pd

from harness import columns, stages


def context_summary(ops: pd.DataFrame, tokens: pd.DataFrame, context: str, noop_sync_us: float = 0.0) -> dict:
    """Plain and profiled ms/token, stage ms/token and shares, overhead and attribution for one context.

    Calibration: every timed segment pays one capture sync. ``sync_us`` is the in-run cost per sync,
    (profiled - plain ms/token) / segments per token; ``stage_ms_calibrated`` subtracts each stage's
    segments-per-token x ``sync_us`` (never below zero) and ``stage_pct_calibrated`` gives shares of
    the calibrated total. ``noop_sync_us`` (Capture.calibrate: segments of one no-op view node) is the
    bare ask/observe round trip, kept as a diagnostic.
    """
    o = ops[ops[columns.CONTEXT] == context]
    t = tokens[tokens[columns.CONTEXT] == context]
    plain = t[t[columns.PASS] == "plain"][columns.WALL_US] / 1000.0
    prof = t[t[columns.PASS] == "profiled"][columns.WALL_US] / 1000.0
    n_tok = max(1, len(prof))
    stage_ms = (o.groupby(columns.STAGE)[columns.TIME_US].sum() / 1000.0 / n_tok).to_dict()
    stage_ms = {s: float(stage_ms.get(s, 0.0)) for s in stages.STAGES}
    prof_ms = float(prof.mean())
    total = sum(stage_ms.values())
    segs = (o[o[columns.STAGE] != stages.HOST].groupby(columns.STAGE).size() / n_tok).to_dict()
    n_segs = sum(segs.values())
    sync_us = max(0.0, prof_ms - float(plain.mean())) * 1000.0 / n_segs if n_segs else 0.0
    cal = {s: max(0.0, v - segs.get(s, 0.0) * sync_us / 1000.0) for s, v in stage_ms.items()}
    cal_total = sum(cal.values())
    return {
        "context": context,
        "depth": int(o[columns.DEPTH].iloc[0]) if len(o) else int(t[columns.DEPTH].iloc[0]),
        "timed_tokens": int(len(prof)),
        "plain_ms": float(plain.mean()),
        "plain_ms_median": float(plain.median()),
        "plain_ms_std": float(plain.std(ddof=1)) if len(plain) > 1 else 0.0,
        "profiled_ms": prof_ms,
        "overhead_ratio": prof_ms / float(plain.mean()),
        "stage_ms": stage_ms,
        "stage_pct": {s: 100.0 * v / prof_ms for s, v in stage_ms.items()},
        "sync_us": sync_us,
        "noop_sync_us": noop_sync_us,
        "stage_ms_calibrated": cal,
        "stage_pct_calibrated": {s: 100.0 * v / cal_total for s, v in cal.items()} if cal_total else {},
        "covered_pct": 100.0 * (total - stage_ms[stages.HOST]) / prof_ms,
        "attributed_pct": 100.0 * total / prof_ms,
    }


def format_summary(contexts: list[dict], mode: str) -> str:
    """A plain-text table: one row per context."""
    shown = [s for s in stages.STAGES if any(c["stage_ms"].get(s, 0) > 0 for c in contexts)]
    head = ["context", "depth", "plain ms/tok", "profiled", "overhead"]
    head += [f"{s} ms (%)" for s in shown] + ["ops %", "attributed %"]
    rows = []
    for c in contexts:
        r = [c["context"], str(c["depth"]), f"{c['plain_ms']:.2f}", f"{c['profiled_ms']:.2f}",
             f"x{c['overhead_ratio']:.3f}"]
        r += [f"{c['stage_ms'][s]:.2f} ({c['stage_pct'][s]:.1f})" for s in shown]
        r += [f"{c['covered_pct']:.1f}", f"{c['attributed_pct']:.1f}"]
        rows.append(r)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = [f"mode={mode}; ms/token are means over timed tokens; shares are of profiled wall time",
             "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
