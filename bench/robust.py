"""Does the measurement survive a noisy device? Back-to-back sweeps, each checked against physics.

    python bench/robust.py [--model GGUF] [--sweeps 5] [--contexts 13,172,658,4096] [--rounds 40] [--keep DIR]
    python bench/robust.py --summarize bench/results/robust-*.json
    python bench/robust.py --runs KEPT/*.parquet        # the same figures from kept runs
    python bench/robust.py --vary flash_attn=on,off ... # sweeps alternate over a setting, figures per value

Runs N sweeps back to back (all depths resident, measured round-robin) and prints, per sweep:
- the largest disagreement across depths of a depth-invariant stage, as the run's check judges it (stages
  holding >= 5 % of decode: ffn, lm_head, attn_proj, gemma3n_extra; each depth's calibrated ms,
  checks.depth_values), and the same over all five the issue names (norm too, ~0.5 % of decode), with each
  stage's means' spread beside it and the noise floor (the 95th percentile of the spread with the depths
  shuffled within rounds) -- target <= 2 %;
- the attn_kv rise from the shallowest to the deepest context against the plain-decode rise,
  both paired by round -- target: within 10 % (with the 95 % interval of that disagreement, a bootstrap
  over rounds: how much of it the plain pass's noise explains); a miss is split into how much more the
  profiled contexts rose than the plain ones (each context's own offset) and what the other stages rose;
- the attn_kv slope (ms per 1,000 KV tokens, bootstrap interval over rounds);
- capture overhead (profiled / plain) per depth -- target <= x1.03 in stages mode;
- calibrated stage ms summed against the plain ms/token;
- the sweep's wall time (excluding twin generation) -- target <= 3 minutes;
- the flags it raised, and the noise the OS reported (CPU steal, other processes' CPU);
- the depth-invariant stages whose slope is off 0, the five judged together (each at 99 %, ``slope.off_zero``).
Then the spread of the attn_kv slope across the N sweeps -- target <= 10 % -- and how much of it is the
device changing between sweeps (I2: the share of the between-sweep variance beyond each sweep's own
sampling noise), and its correlation with each sweep's measured split cost and with the same sweep's
depth-invariant stage ms at the shallowest depth; and the capture's own rise with depth (profiled rise - plain
rise, mean over the sweeps, bench/NOTES.md §30).
``--summarize JSON ...`` prints these across-sweep figures again from saved results, pooling their sweeps;
``--runs`` computes every figure again from kept runs (a copy read once, a run that a later one continued
left out, as ``analysis.compare`` does).
``--vary SETTING=A,B`` (a sweep list setting: threads, flash_attn, cache_type_k, ...; ``--threads 2,1``
is ``--vary threads=2,1``) alternates the sweeps over the values (the order reversed every other time, so each
runs as often first as second), prints the across-sweep figures per value, and the ratios A / B of each
adjacent pair; ``--runs`` groups kept runs by the settings they recorded that differ.
Nothing is asserted: the figures are printed and saved as JSON in bench/results/.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import MISSING, fields, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from across import SLOPE_SPREAD_TARGET_PCT, across_by_arm, parse_vary, run_sweep, runs_folder, save_results  # noqa: E402

from analysis import fleet  # noqa: E402
from analysis.slope import JOINT_LEVEL, invariant_off_zero, run_slopes  # noqa: E402
from harness import checks, stats  # noqa: E402
from harness.cli import ArgParser, folder_arg, run_cli  # noqa: E402
from harness.config import LIST_SETTINGS  # noqa: E402
from harness.errors import InputError, UsageError  # noqa: E402
from harness.record import ContextSummary, RunRecord  # noqa: E402
from harness.store import read_run  # noqa: E402
from harness.twin import DEFAULT_MODEL, ensure_default_model  # noqa: E402

SET_HERE = {"-m", "--model", "-c", "--contexts", "-r", "--rounds", "-o", "--out", "--layout", "--label"}
TARGETS = {"invariant_pct": 2.0, "rise_agreement_pct": 10.0, "slope_spread_pct": SLOPE_SPREAD_TARGET_PCT,
           "overhead": 1.03, "sweep_s": 180.0}


def one_sweep(a, out: Path, label: str, arm: tuple[str, str] | None = None) -> dict:
    t0 = time.perf_counter()
    run_sweep(["-c", a.contexts, "-r", str(a.rounds), "--out", str(out), "--label", label,
               *(["--model", a.model] if a.model else []), *([LIST_SETTINGS[arm[0]], str(arm[1])] if arm else []),
               *a.extra])
    wall = time.perf_counter() - t0
    return figures(max(out.glob(f"*{label}_*.parquet")), wall)


def figures(path: Path, wall: float | None = None) -> dict:
    """One sweep's figures from its run file; ``wall`` defaults to the run's own load + sweep time (a kept run
    re-read: the interpreter's start is not in it)."""
    run = read_run(path)
    if run.ops.empty:
        raise InputError(f"the run's op table has no rows: no stage timings to check: {path}")
    rec = run.record
    wall = rec.timing.load_s + rec.timing.sweep_s if wall is None else wall
    ctxs = rec.sorted_contexts()
    lo, hi = ctxs[0], ctxs[-1]
    rd = stats.round_data(run.ops, run.tokens, run.calibration_stages)
    cal = stats.calibrated(rd, stats.split_cost_ms(rd.calib_delta, rd.calib_extra))  # (rounds, depths, stages)
    rd_rise, agree_ci = _paired_rise(rd, cal)
    slopes = run_slopes(run, rd=rd)
    sl = slopes.loc["attn_kv"]
    inv, flags = rec.invariants, rec.flags  # a run made before the current check (no judged stages, another
    stale = any(c.sync_us_estimator != stats.SPLIT_COST_ESTIMATOR for c in ctxs)  # estimator, another split
    if stale:  # cost): its summaries and check redone on the current split cost, and the flags that follow
        rec = on_current_split_cost(rec, rd)
        ctxs = rec.sorted_contexts()
        lo, hi = ctxs[0], ctxs[-1]
    if stale or not inv.judged or inv.estimator != checks.ESTIMATOR:
        inv, flags = checks.rechecked(rec, rd)
    step = checks.state_change(inv)
    noise_wall = sum(x.wall_s for x in rec.rounds) * (rec.device.logical_cores or rec.params.threads)  # all CPUs
    return {
        "label": rec.label, "threads": rec.params.threads,
        "settings": {k: getattr(rec.params, k) for k in LIST_SETTINGS},
        "wall_s": wall, "load_s": rec.timing.load_s, "sweep_s": rec.timing.sweep_s,
        "invariant_pct": inv.max_disagreement_pct, "invariant_stage": inv.stage,
        "invariant_per_stage_pct": inv.per_stage_pct, "invariant_estimator": inv.estimator,
        "invariant_per_stage_mean_pct": inv.per_stage_mean_pct,
        "invariant_noise_floor_pct": inv.noise_floor_pct,
        "attn_kv_rise_ms": hi.stage("attn_kv") - lo.stage("attn_kv"), "plain_rise_ms": rd_rise,
        "profiled_rise_ms": float(np.nanmean(rd.profiled[:, -1] - rd.profiled[:, 0])),  # the same rounds
        "rest_rise_ms": sum(hi.stage(s) - lo.stage(s) for s in stats.S if s != "attn_kv"),  # calibrated
        "rise_disagreement_ci_pct": agree_ci,
        "attn_kv_slope": float(sl["slope_ms_per_1k"]),
        "attn_kv_slope_ci": [float(sl["ci95_low_ms_per_1k"]), float(sl["ci95_high_ms_per_1k"])],
        "overhead": {c.depth: c.overhead_ratio for c in ctxs},
        "calibrated_sum_pct": {c.depth: c.calibrated_sum_pct for c in ctxs},
        "plain_ms": {c.depth: c.plain_ms for c in ctxs}, "sync_us": ctxs[0].sync_us,
        "stage_ms_shallowest": {s: lo.stage(s) for s in checks.INVARIANT_STAGES},
        "invariant_slopes_off_zero_pct": {s: v[1] for s, v in invariant_off_zero(slopes, rec.contexts).items()},
        "invariant_slopes_level": JOINT_LEVEL,  # each stage's interval; results saved before it: 0.95
        "state_change": None if step is None else {"stage": step, "step_pct": checks.steps_pct(inv)[step],
                                                   "after_rounds": inv.step_round[step]},
        "flags": [f"{f.kind}{'@' + f.context if f.context else ''}" for f in flags if f.kind != "synthetic"],
        "steal_pct": 100 * sum(x.steal_s or 0 for x in rec.rounds) / noise_wall if noise_wall else None,
        "others_cpu_pct": 100 * sum(x.others_cpu_s or 0 for x in rec.rounds) / noise_wall if noise_wall else None,
    }


def on_current_split_cost(rec: RunRecord, rd: stats.RoundData) -> RunRecord:
    """``rec`` with its split cost and what it sets (calibrated figures, mode comparison) recomputed from its rounds
    ``rd`` on the current estimator: a run saved before it (NOTES §24) is judged as a new one, not on stored means
    beside rises calibrated anew. A field not recomputed (no cost, no per-stage calibration rows) takes its default."""
    keys = ("stage_ms_calibrated", "stage_ms_calibrated_ci", "stage_pct_calibrated", "calibrated_sum_pct",
            "ops_rounds", "ops_pct_calibrated", "mode_diff_pp", "mode_diff_pp_ci")
    summaries, cost_us, cost_ci = stats.summarize(rd)
    new = {s["context"]: s for s in summaries}
    default = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
               for f in fields(ContextSummary) if f.name in keys}
    ctxs = tuple(replace(c, **{k: new[c.context].get(k, default[k]) for k in keys},
                         sync_us=None if np.isnan(cost_us) else max(0.0, cost_us),
                         sync_us_ci=None if np.isnan(cost_us) else tuple(max(0.0, x) for x in cost_ci),
                         sync_us_estimator=stats.SPLIT_COST_ESTIMATOR) for c in rec.contexts)
    return replace(rec, contexts=ctxs)


def _paired_rise(rd: stats.RoundData, cal: np.ndarray) -> tuple[float, list[float]]:
    """Plain ms/token at the deepest minus the shallowest depth (mean of per-round differences), and the 95 %
    interval (bootstrap over rounds) of (attn_kv rise - plain rise) / plain rise in %: the sampling noise of
    the agreement check."""
    d_plain = rd.plain[:, -1] - rd.plain[:, 0]
    attn = cal[:, :, stats.S["attn_kv"]]
    d_attn = attn[:, -1] - attn[:, 0]
    rows = stats.boot_indices(len(d_plain))
    with np.errstate(all="ignore"):
        ratio = 100 * (np.nanmean(d_attn[rows], axis=1) / np.nanmean(d_plain[rows], axis=1) - 1)
    return float(np.nanmean(d_plain)), [float(x) for x in stats.interval(ratio)]


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="robust.py", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the E4B Q4_K_M twin, made if missing)")
    ap.add_argument("--sweeps", type=int, default=5)
    ap.add_argument("--contexts", default="13,172,658,4096")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--keep", type=folder_arg, default=None, help="keep the runs in this folder")
    ap.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="JSON",
                    help="no sweeps: print the across-sweep figures of saved results (all their sweeps pooled)")
    ap.add_argument("--runs", type=Path, nargs="+", default=None, metavar="PARQUET",
                    help="no sweeps: the figures of these kept runs (made by this script with --keep)")
    ap.add_argument("--vary", default=None, metavar="SETTING=A,B",
                    help=f"the sweeps alternate over these values of one setting ({', '.join(LIST_SETTINGS)})")
    ap.add_argument("--threads", default=None, help="comma list of thread counts: --vary threads=...")
    ap.add_argument("extra", nargs="*", help="more sweep flags, after --")
    a = ap.parse_args(argv)
    if a.sweeps < 1 or a.rounds < 1:
        raise UsageError(f"--sweeps and --rounds must be >= 1, got {a.sweeps} and {a.rounds}")
    if a.summarize:
        try:
            res = [r for f in a.summarize for r in json.loads(f.read_text())["sweeps"]]
            if not res or any("attn_kv_slope" not in r or "attn_kv_slope_ci" not in r for r in res):
                raise ValueError("no sweeps with an attn_kv slope and its interval")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"cannot read saved results: {e}: {' '.join(map(str, a.summarize))}") from None
        across_by_arm(res)
        report_counts(res)
        report_capture(res)
        return 0
    if a.threads and a.vary:
        raise UsageError("give --threads or --vary, not both")
    clash = [x for x in a.extra if x.split("=", 1)[0] in SET_HERE or "," in x]  # each sweep must write one run,
    if clash:  # named as one_sweep reads it
        raise UsageError(f"extra sweep flags {' '.join(clash)}: robust.py sets the model, contexts, rounds, output "
                         "and label itself and reads one run per sweep (a list of settings: --vary)")
    if a.runs:  # copies of a run read once, a run that a later one continued (--resume) left out: as compare does
        kept = {r.path for r in fleet.load_runs(a.runs)}
        if len(kept) < len(a.runs):
            print(f"{len(a.runs) - len(kept)} of the runs given left out (a copy, or continued by a later run)")
        a.runs = [r for r in dict.fromkeys(a.runs) if str(r) in kept]
    arms = parse_vary(f"threads={a.threads}", least=1) if a.threads else parse_vary(a.vary)
    plan = [(None, None)] * len(a.runs) if a.runs else [
        (i, arm) for i in range(a.sweeps) for arm in (arms if i % 2 == 0 else arms[::-1])]
    if not a.runs and a.model is None:  # made before the first sweep, so no sweep's wall time holds it
        ensure_default_model(ROOT / DEFAULT_MODEL)
    res = []
    with tempfile.TemporaryDirectory() as tmp, runs_folder(Path(a.keep or tmp), make=not a.runs) as d:
        for k, (i, arm) in enumerate(plan):
            res.append(figures(a.runs[k]) if a.runs else
                       one_sweep(a, d, f"robust-{i}" + (f"-{arm[0]}-{arm[1]}" if arm else ""), arm))
            report_one(k, res[-1])
    per = across_by_arm(res)
    spread, h = next(iter(per.values())) if len(per) == 1 else (float("nan"), None)  # several arms: by_arm only
    report_counts(res)
    report_capture(res)
    by_arm = {t: {"slope_spread_pct": v[0], "slope_heterogeneity": v[1]} for t, v in per.items()}
    save_results("robust", {"args": vars(a), "targets": TARGETS, "sweeps": res, "slope_spread_pct": spread,
                            "slope_heterogeneity": h, "by_arm": by_arm})
    return 0


def all_five_pct(r: dict) -> float:
    """A sweep's largest disagreement over every depth-invariant stage, norm included (the check judges >= 5 %)."""
    return max(r["invariant_per_stage_pct"].values(), default=float("nan"))


def report_counts(res: list[dict]) -> None:
    """Sweeps within the invariance target (judged stages; all five), and how many have a depth-invariant stage
    whose slope interval excludes 0, and how many of the unflagged."""
    t = TARGETS["invariant_pct"]
    print(f"\ninvariance within {t:g} %: the judged stages in {sum(r['invariant_pct'] <= t for r in res)} of {len(res)}"
          f" sweeps; all five stages, norm included, in {sum(all_five_pct(r) <= t for r in res)} of {len(res)}")
    has = [r for r in res if "invariant_slopes_off_zero_pct" in r]
    off = [(bool(r["invariant_slopes_off_zero_pct"]), bool(r["flags"])) for r in has]
    levels = " and ".join(sorted({f"{100 * r.get('invariant_slopes_level', 0.95):g} %" for r in has}))
    if off:
        print(f"invariant stages whose slope interval ({levels} each) is off 0: in {sum(o for o, _ in off)}"
              f" of {len(off)} sweeps; unflagged {sum(o for o, f in off if not f)} of {sum(not f for _, f in off)} "
              "(target: 0 of the unflagged)")
    if len(off) < len(res):
        print(f"  ({len(res) - len(off)} sweeps saved before this count: re-read their kept runs with --runs)")


def report_capture(res: list[dict]) -> None:
    """The capture's own rise with depth over the sweeps (bench/NOTES.md §30): profiled rise - plain rise, mean and
    standard error (a context's own offset makes one sweep blind to it), beside the other stages' rise for scale.
    attn_kv's rise + theirs is the profiled rise exactly, so this cannot say in which stages the excess lands."""
    x = np.array([[r["profiled_rise_ms"] - r["plain_rise_ms"], r["rest_rise_ms"]] for r in res if "rest_rise_ms" in r])
    if len(x) < 2:
        return
    m, se = stats.mean_se(x)
    print(f"capture's rise with depth, over {len(x)} sweeps (mean +- se): profiled rise - plain rise {m[0]:+.2f} +- "
          f"{se[0]:.2f} ms; the stages other than attn_kv rose {m[1]:+.2f} +- {se[1]:.2f} ms (which stages hold the "
          "excess, these or attn_kv, the totals cannot say)")


def report_one(i: int, r: dict) -> None:
    dis = 100 * (r["attn_kv_rise_ms"] - r["plain_rise_ms"]) / r["plain_rise_ms"] if r["plain_rise_ms"] else np.nan
    lo, hi = r["attn_kv_slope_ci"]
    n, (c0, c1) = r["threads"], r["rise_disagreement_ci_pct"]
    cfg = r.get("settings")
    fa = f", fa {cfg['flash_attn']}, kv {cfg['cache_type_k']}/{cfg['cache_type_v']}" if cfg else ""
    print(f"sweep {i} ({n} thread{'s' if n != 1 else ''}{fa}): {r['wall_s']:.0f} s wall (load {r['load_s']:.1f} s); "
          f"invariant stages within {r['invariant_pct']:.2f} % ({r['invariant_stage']}; all five "
          f"{all_five_pct(r):.2f} %); attn_kv rise "
          f"{r['attn_kv_rise_ms']:+.2f} ms vs plain {r['plain_rise_ms']:+.2f} ms "
          f"({dis:+.1f} % [{c0:+.1f}, {c1:+.1f}]); attn_kv slope {r['attn_kv_slope']:.3f} [{lo:.3f}, {hi:.3f}] "
          f"ms/1k; split {r['sync_us']:.2f} us", flush=True)
    if abs(dis) > TARGETS["rise_agreement_pct"] and "profiled_rise_ms" in r:  # saved before it: not known
        gap, ctx = r["attn_kv_rise_ms"] - r["plain_rise_ms"], r["profiled_rise_ms"] - r["plain_rise_ms"]
        print(f"   attn_kv rise - plain rise = {gap:+.2f} ms = {ctx:+.2f} (the profiled contexts rose more than the "
              f"plain ones: their own offsets) {gap - ctx:+.2f} (the other stages rose {ctx - gap:+.2f} ms)")
    st = r.get("state_change")
    if st:
        print(f"   the device changed state in this sweep: {st['stage']} stepped by {st['step_pct']:+.1f} % after "
              f"{st['after_rounds']} rounds (its ms mix two states; depths are still paired)")
    print("   overhead " + " ".join(f"{d}:x{v:.3f}" for d, v in r["overhead"].items())
          + " | calibrated sum/plain " + " ".join(f"{d}:{v:.1f}%" for d, v in r["calibrated_sum_pct"].items())
          + f" | per-stage spread ({r['invariant_estimator']}s) "
          + " ".join(f"{s}:{v:.1f}%" for s, v in r["invariant_per_stage_pct"].items())
          + " (means " + " ".join(f"{s}:{v:.1f}%" for s, v in r["invariant_per_stage_mean_pct"].items())
          + "; noise floor, 95th percentile with depths shuffled within rounds: "
          + " ".join(f"{s}:{v:.1f}%" for s, v in r["invariant_noise_floor_pct"].items()) + ")"
          + f" | steal {r['steal_pct']:.1f} % others {r['others_cpu_pct']:.1f} % | flags {r['flags'] or '-'}"
          + " | invariant slopes off 0 (% over the depths): "
          + (" ".join(f"{s}:{v:+.1f}%" for s, v in r.get("invariant_slopes_off_zero_pct", {}).items()) or "-"),
          flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_cli("robust.py", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
