"""Decode sweep: per-op decode timing through llama.cpp at several depths, all resident, measured round-robin.

    python -m harness.sweep --model models/gemma-3n-e4b-q4.gguf [-c 13,172,658] [-fa on,off] [-ctk f16,q8_0]

This module parses the command line and prints; ``harness.config`` holds the settings and
``harness.orchestrate`` runs them. List-valued settings (like llama-bench) run their product, one
run each, sharing the model load.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from harness import checks, store
from harness.cli import ArgParser, format_table, run_cli
from harness.config import CALIB_ALL, DEFAULT_CONTEXTS, LIST_CASTS, SweepConfig, expand, parse_contexts, split_list
from harness.errors import UsageError
from harness.orchestrate import run_sweeps
from harness.record import RunRecord
from harness.stages import STAGES
from harness.twin import DEFAULT_MODEL, ensure_default_model

log = logging.getLogger(__name__)
MEASUREMENT_FLAGS = ("drift", "state", "noise", "overhead", "calibration", "incomplete")


def build_parser() -> ArgParser:
    ap = ArgParser(prog="python -m harness.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default=None,
                    help=f"GGUF model (default: the synthetic twin {DEFAULT_MODEL}, made if missing)")
    ap.add_argument("-c", "--contexts", default=DEFAULT_CONTEXTS,
                    help="comma list of names (short=13, medium=172, long=658) or token counts")
    ap.add_argument("-r", "--rounds", type=int, default=SweepConfig.rounds,
                    help="rounds: each decodes one plain and one profiled token at every depth (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed tokens per depth")
    ap.add_argument("-t", "--threads", default=None, help="threads, or a comma list (default: physical cores)")
    ap.add_argument("-fa", "--flash-attn", default="auto", help="on, off or auto, or a comma list")
    ap.add_argument("-ctk", "--cache-type-k", default="f16", help="K cache type (f16, q8_0, ...), or a comma list")
    ap.add_argument("-ctv", "--cache-type-v", default="f16", help="V cache type, or a comma list")
    ap.add_argument("-ngl", "--n-gpu-layers", default="0", help="layers offloaded to a GPU, or a comma list")
    ap.add_argument("-b", "--batch-size", type=int, default=512)
    ap.add_argument("-ub", "--ubatch-size", help="micro-batch size, or a comma list (default: 512, at most -b)")
    ap.add_argument("--mode", default="stages", help="stages (default) or ops")
    ap.add_argument("--calib-splits", type=int, default=CALIB_ALL,
                    help="extra graph splits of the per-round calibration token (0: no split-cost calibration)")
    ap.add_argument("-o", "--out", default="runs", help="output folder (default runs/)")
    ap.add_argument("--layout", default="flat", help="flat (out/<time>_<label>_<model>.parquet) or hive")
    ap.add_argument("--label", default=None, help="device label (default: CPU model and cores)")
    ap.add_argument("--no-probe", action="store_true", help="skip the memory bandwidth probe")
    ap.add_argument("--resume", default=None, metavar="RUN", help="continue an incomplete (interrupted) run")
    ap.add_argument("--force", action="store_true", help="run even if the memory estimate exceeds available RAM")
    return ap


# argparse dest -> config field (its parser: config.LIST_CASTS)
_LISTS = {"threads": "threads", "flash_attn": "flash_attn", "cache_type_k": "cache_type_k",
          "cache_type_v": "cache_type_v", "n_gpu_layers": "n_gpu_layers", "ubatch_size": "n_ubatch"}


def configs_from_args(a: argparse.Namespace) -> list[SweepConfig]:
    if a.batch_size < 1:
        raise UsageError("batch size must be >= 1")
    base = SweepConfig(contexts=parse_contexts(a.contexts), model=a.model, rounds=a.rounds, warmup=a.warmup,
                       n_batch=a.batch_size, mode=a.mode, calib_splits=a.calib_splits, out=a.out, layout=a.layout,
                       label=a.label, probe=not a.no_probe, force=a.force)
    # an untyped -ub: the default, capped at -b as llama.cpp caps it
    given = vars(a) | {"ubatch_size": a.ubatch_size or str(min(SweepConfig.n_ubatch, a.batch_size))}
    lists = {field: split_list(given[dest], dest.replace("_", "-"), LIST_CASTS[field])
             for dest, field in _LISTS.items() if given[dest] is not None}
    return expand(base, lists)


def given_flags(argv: list[str] | None) -> set[str]:
    """argparse dests the user actually typed."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


_RESUME_FIELDS = {"contexts": "contexts", "rounds": "rounds", "warmup": "warmup", "threads": "threads",
                  "flash_attn": "flash_attn", "cache_type_k": "cache_type_k", "cache_type_v": "cache_type_v",
                  "n_gpu_layers": "n_gpu_layers", "ubatch_size": "n_ubatch", "batch_size": "n_batch", "mode": "mode",
                  "calib_splits": "calib_splits", "label": "label"}


def resume_config(a: argparse.Namespace, typed: set[str]) -> tuple[store.Run, SweepConfig]:
    """The stored run's config; a typed flag that contradicts it is the difference of the two configs."""
    run = store.read_run(a.resume)
    if run.record.complete:
        raise UsageError(f"run is already complete, nothing to resume: {a.resume}")
    if run.record.params.order != "round-robin":  # upgraded from schema 1 or 2: no stored rounds to go on from
        raise UsageError(f"run predates round-robin measurement (order {run.record.params.order!r}) and cannot be "
                         f"resumed; start a new run: {a.resume}")
    stored = SweepConfig.from_record(run.record)
    asked = configs_from_args(a)
    if len(asked) != 1:
        raise UsageError("--resume takes single values, not lists")
    fields = tuple(_RESUME_FIELDS[d] for d in typed if d in _RESUME_FIELDS)
    diff = asked[0].differences(stored, fields)
    if diff:
        def show(v):
            return ",".join(str(d) for _, d in v) if isinstance(v, tuple) else v

        flag = {field: dest for dest, field in _RESUME_FIELDS.items()}  # the option a user typed, not the field
        what = "; ".join(f"--{flag.get(k, k).replace('_', '-')} {show(mine)} (the run used {show(theirs)})"
                         for k, (mine, theirs) in diff.items())
        raise UsageError(f"cannot resume with {what}")
    from harness import device, engine  # the device and engine must be the run's

    dev, here = run.record.device, device.device_info()
    for key in ("cpu_model", "hostname"):
        if getattr(dev, key) not in ("", here[key]):
            raise UsageError(f"cannot resume on another device ({key} {here[key]!r}, "
                             f"the run has {getattr(dev, key)!r})")
    if run.record.engine_version not in (None, engine.engine_version()):
        raise UsageError(f"cannot resume with llama-cpp-python {engine.engine_version()}: the run used "
                         f"{run.record.engine_version}")
    return run, stored.replace(model=a.model or stored.model, out=a.out, layout=a.layout, probe=not a.no_probe,
                               force=a.force)


def format_summary(rec: RunRecord) -> str:
    """A plain-text table: one row per depth, calibrated stage ms (raw shares are in the run)."""
    ctxs = rec.sorted_contexts()
    shown = [s for s in STAGES if any(c.stage(s) > 0 for c in ctxs)]
    head = ["context", "depth", "plain ms/tok (95 %)", "overhead"] + [f"{s} ms" for s in shown] + ["sum/plain"]
    rows = []
    for c in ctxs:
        lo, hi = c.plain_ms_ci or (c.plain_ms, c.plain_ms)
        rows.append([c.context, str(c.depth), f"{c.plain_ms:.2f} [{lo:.2f}, {hi:.2f}]", f"x{c.overhead_ratio:.3f}",
                     *(f"{c.stage(s):.2f}" for s in shown),
                     f"{c.calibrated_sum_pct:.1f} %" if c.calibrated_sum_pct is not None else ""])
    inv = rec.invariants
    cost = f" (split cost {ctxs[0].sync_us:.2f} us)" if ctxs[0].sync_us is not None else ""
    how = (f"stage ms are calibrated{cost} and should add up to the plain ms/token" if rec.calibrated
           else "stage ms are raw (no calibration tokens: --calib-splits 0)")
    lines = [f"mode={rec.params.mode}, {len(rec.rounds)} rounds; {how}",
             format_table(head, rows, style="text")]
    if inv is not None and inv.across_depths:
        means = inv.per_stage_mean_pct.get(inv.stage)
        lines.append(f"depth-invariant stages: largest disagreement {inv.max_disagreement_pct:.2f} % ({inv.stage}; "
                     f"{inv.estimator}s over rounds; threshold {inv.threshold_pct:g} %)"
                     + (f"; its means: {means:.2f} %" if means is not None else ""))
    paired = [c for c in ctxs if c.mode_agreement_pp is not None]
    if paired:
        lines.append("stage shares with every node timed (the calibration tokens) minus stages mode, same rounds: "
                     + "; ".join(_mode_words(c) for c in paired))
    if inv is not None:
        steps = checks.steps_pct(inv)
        if steps:
            s = max(steps, key=lambda k: abs(steps[k]))
            lines.append(f"over rounds: largest step {steps[s]:+.1f} % ({s}, after {inv.step_round[s]} of "
                         f"{len(rec.rounds)} rounds; its floor {inv.step_floor_pct[s]:.1f} %, threshold "
                         f"{checks.SHIFT_PCT:g} %)")
    return "\n".join(lines)


def _mode_words(c) -> str:
    """The largest calibrated share difference ops - stages of a context, its interval and rounds."""
    s, pp, ci = c.mode_worst()
    return f"{c.depth}: {s} {pp:+.2f} points" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "") \
        + f" ({c.ops_rounds} rounds)"


def report_run(rec: RunRecord, path: Path) -> None:
    sys.stdout.write(format_summary(rec) + "\n")
    log.info("run written: %s%s", path, " (SYNTHETIC model)" if rec.synthetic else "")
    bad = [f for f in rec.flags if f.kind in MEASUREMENT_FLAGS]
    if bad:
        log.warning("warning: this run is flagged (%s): %s", ", ".join(sorted({f.kind for f in bad})),
                    "; ".join(f"{f.context + ': ' if f.context else ''}{f.message}" for f in bad))


def _main(argv: list[str] | None) -> int:
    a = build_parser().parse_args(argv)
    if a.resume:
        run, cfg = resume_config(a, given_flags(argv))
        if cfg.model is None:
            raise UsageError(f"the run does not name its model file; pass --model: {a.resume}")
        run_sweeps([cfg], Path(cfg.model), resume=run, on_run=report_run)
        return 0
    configs = configs_from_args(a)
    model_path = ensure_default_model() if a.model is None else Path(a.model)
    run_sweeps(configs, model_path, on_run=report_run)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("harness.sweep", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
