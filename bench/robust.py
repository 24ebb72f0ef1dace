"""Does the measurement survive a noisy device? Back-to-back sweeps, each checked against physics.

    python bench/robust.py [--model GGUF] [--sweeps 5] [--contexts 13,172,658,4096] [--rounds 40] [--keep DIR]
    python bench/robust.py --summarize bench/results/robust-*.json
    python bench/robust.py --runs KEPT/*.parquet        # the same figures from kept runs
    python bench/robust.py --threads 2,1 ...            # sweeps alternate over thread counts, figures per count

Runs N sweeps back to back (all depths resident, measured round-robin) and prints, per sweep:
- the largest disagreement across depths of a depth-invariant stage (ffn, lm_head, attn_proj,
  gemma3n_extra, norm; each depth's 20 % trimmed mean over rounds of calibrated ms, as the run's check judges it;
  the means' spread beside it, and the noise floor: the 95th percentile of the spread with the depths
  shuffled within rounds) -- target <= 2 %;
- the attn_kv rise from the shallowest to the deepest context against the plain-decode rise,
  both paired by round -- target: within 10 % (with the 95 % interval of that disagreement, a bootstrap
  over rounds: how much of it the plain pass's noise explains);
- the attn_kv slope (ms per 1,000 KV tokens, bootstrap interval over rounds);
- capture overhead (profiled / plain) per depth -- target <= x1.03 in stages mode;
- calibrated stage ms summed against the plain ms/token;
- the sweep's wall time (excluding twin generation) -- target <= 3 minutes;
- the flags it raised, and the noise the OS reported (CPU steal, other processes' CPU).
Then the spread of the attn_kv slope across the N sweeps -- target <= 10 % -- and how much of it is the
device changing between sweeps (I2: the share of the between-sweep variance beyond each sweep's own
sampling noise), and its correlation with each sweep's measured split cost and with the same sweep's
depth-invariant stage ms at the shallowest depth. ``--summarize JSON ...`` prints these across-sweep
figures again from saved results, pooling their sweeps; ``--runs`` computes every figure again from kept
runs. ``--threads 2,1`` alternates the sweeps' thread counts (the order reversed every other time, so each
count runs as often first as second) and prints the across-sweep figures per count; ``--runs`` groups kept runs
by the thread count they recorded.
Nothing is asserted: the figures are printed and saved as JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.slope import run_slopes  # noqa: E402
from harness import checks, stats  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.store import read_run  # noqa: E402

SLOW_SYNC_US = 1.0  # split cost from here up: the VM's slow-sync state (quick 0.45-0.7 us, slow 1.3-2.0; NOTES §12)
STATES = ("quick-sync", "slow-sync", "switched", "unknown")
TARGETS = {"invariant_pct": 2.0, "rise_agreement_pct": 10.0, "slope_spread_pct": 10.0, "overhead": 1.03,
           "sweep_s": 180.0}


def one_sweep(a, out: Path, label: str, threads: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "harness.sweep", "-c", a.contexts, "-r", str(a.rounds), "--out", str(out),
           "--label", label, *(["--model", a.model] if a.model else []), *(["-t", str(threads)] if threads else []),
           *a.extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return figures(max(out.glob(f"*{label}_*.parquet")), wall)


def figures(path: Path, wall: float | None = None) -> dict:
    """One sweep's figures from its run file; ``wall`` defaults to the run's own load + sweep time (a kept run
    re-read: the interpreter's start is not in it)."""
    run = read_run(path)
    rec = run.record
    wall = rec.timing.load_s + rec.timing.sweep_s if wall is None else wall
    ctxs = rec.sorted_contexts()
    lo, hi = ctxs[0], ctxs[-1]
    rd = stats.round_data(run.ops, run.tokens)
    cal = stats.calibrated(rd, stats.split_cost_ms(rd.calib_delta, rd.calib_extra))  # (rounds, depths, stages)
    rd_rise, agree_ci = _paired_rise(rd, cal)
    sl = run_slopes(run, rd=rd).loc["attn_kv"]
    inv = rec.invariants if rec.invariants.judged else checks.invariants(list(rec.contexts), rd)  # older runs: redo
    # (same function and seed: a run that stored its noise floors gets the same ones back)
    step = checks.state_change(inv)
    noise_wall = sum(x.wall_s for x in rec.rounds) * rec.params.threads
    return {
        "threads": rec.params.threads, "wall_s": wall, "load_s": rec.timing.load_s, "sweep_s": rec.timing.sweep_s,
        "invariant_pct": rec.invariants.max_disagreement_pct, "invariant_stage": rec.invariants.stage,
        "invariant_per_stage_pct": rec.invariants.per_stage_pct, "invariant_estimator": rec.invariants.estimator,
        "invariant_per_stage_mean_pct": rec.invariants.per_stage_mean_pct,
        "invariant_noise_floor_pct": inv.noise_floor_pct,
        "attn_kv_rise_ms": hi.stage("attn_kv") - lo.stage("attn_kv"), "plain_rise_ms": rd_rise,
        "rise_disagreement_ci_pct": agree_ci,
        "attn_kv_slope": float(sl["slope_ms_per_1k"]),
        "attn_kv_slope_ci": [float(sl["ci95_low_ms_per_1k"]), float(sl["ci95_high_ms_per_1k"])],
        "overhead": {c.depth: c.overhead_ratio for c in ctxs},
        "calibrated_sum_pct": {c.depth: c.calibrated_sum_pct for c in ctxs},
        "plain_ms": {c.depth: c.plain_ms for c in ctxs}, "sync_us": ctxs[0].sync_us,
        "stage_ms_shallowest": {s: lo.stage(s) for s in checks.INVARIANT_STAGES},
        "state_change": None if step is None else {"stage": step, "step_pct": checks.steps_pct(inv)[step],
                                                   "after_rounds": inv.step_round[step]},
        "flags": [f"{f.kind}{'@' + f.context if f.context else ''}" for f in rec.flags if f.kind != "synthetic"],
        "steal_pct": 100 * sum(x.steal_s or 0 for x in rec.rounds) / noise_wall if noise_wall else None,
        "others_cpu_pct": 100 * sum(x.others_cpu_s or 0 for x in rec.rounds) / noise_wall if noise_wall else None,
    }


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the E4B Q4_K_M twin, made if missing)")
    ap.add_argument("--sweeps", type=int, default=5)
    ap.add_argument("--contexts", default="13,172,658,4096")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--keep", type=Path, default=None, help="keep the runs in this folder")
    ap.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="JSON",
                    help="no sweeps: print the across-sweep figures of saved results (all their sweeps pooled)")
    ap.add_argument("--runs", type=Path, nargs="+", default=None, metavar="PARQUET",
                    help="no sweeps: the figures of these kept runs (made by this script with --keep)")
    ap.add_argument("--threads", default=None, help="comma list of thread counts: the sweeps alternate over them "
                    "(default: the sweep's own)")
    ap.add_argument("extra", nargs="*", help="more sweep flags, after --")
    a = ap.parse_args()
    if a.summarize:
        try:
            res = [r for f in a.summarize for r in json.loads(f.read_text())["sweeps"]]
            if not res or any("attn_kv_slope" not in r or "attn_kv_slope_ci" not in r for r in res):
                raise ValueError("no sweeps with an attn_kv slope and its interval")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"robust.py: cannot read saved results: {e}") from None
        across_by_threads(res)
        return
    res = []
    with tempfile.TemporaryDirectory() as tmp:
        d = a.keep or tmp
        Path(d).mkdir(parents=True, exist_ok=True)
        try:
            counts = [int(t) for t in a.threads.split(",")] if a.threads else [None]
            if any(t is not None and t < 1 for t in counts):
                raise ValueError
        except ValueError:
            raise SystemExit(f"robust.py: --threads takes thread counts (integers >= 1), not {a.threads!r}") from None
        plan = [(None, None)] * len(a.runs) if a.runs else [
            (i, t) for i in range(a.sweeps) for t in (counts if i % 2 == 0 else counts[::-1])]
        for k, (i, t) in enumerate(plan):
            try:
                res.append(figures(a.runs[k]) if a.runs else
                           one_sweep(a, Path(d), f"robust-{i}" + (f"-t{t}" if t else ""), t))
            except HarnessError as e:
                raise SystemExit(f"robust.py: {e}") from None
            report_one(k, res[-1])
    per = across_by_threads(res)
    spread, h = per[res[0]["threads"]]
    out = ROOT / "bench" / "results" / f"robust-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "targets": TARGETS, "sweeps": res, "slope_spread_pct": spread,
                               "slope_heterogeneity": h,
                               "by_threads": {t: {"slope_spread_pct": v[0], "slope_heterogeneity": v[1]}
                                              for t, v in per.items()}}, indent=1, default=str))
    print(f"saved {out.relative_to(ROOT)}")


def across_by_threads(res: list[dict]) -> dict:
    """``across`` for each thread count among the sweeps (results saved before the count was kept: one group)."""
    groups = {t: [r for r in res if r.get("threads") == t] for t in dict.fromkeys(r.get("threads") for r in res)}
    per = {}
    for t, grp in groups.items():
        if len(groups) > 1:
            print(f"\n--- {t} thread{'s' if t != 1 else ''}: {len(grp)} sweeps")
        per[t] = across(grp)
    return per


def across(res: list[dict]) -> tuple[float, dict | None]:
    """Print the attn_kv slope's spread across the sweeps, and how much of it is the device changing between
    sweeps rather than each sweep's sampling noise; return the spread in % and ``heterogeneity``'s figures."""
    slopes = np.array([r["attn_kv_slope"] for r in res])
    spread = float(checks.spread_pct(slopes)) if len(slopes) > 1 else float("nan")
    print(f"\nattn_kv slope across {len(res)} sweeps: " + ", ".join(f"{s:.3f}" for s in slopes)
          + f" ms/1k tokens; spread (max - min) / mean = {spread:.1f} % (target across five sweeps: <= "
            f"{TARGETS['slope_spread_pct']:g} %)")
    h = heterogeneity(res)
    if h and np.isfinite(h["q"]):
        print(f"  between sweeps: sd {h['between_sd_pct']:.1f} % of the mean; within a sweep (bootstrap over rounds): "
              f"se {h['within_se_pct']:.1f} %; I2 = {h['i2_pct']:.0f} % of the spread is the device changing between "
              f"sweeps (Cochran's Q {h['q']:.1f} on {len(res) - 1} df); slope vs the sweep's split cost: "
              f"r = {h['r_split_cost']:+.2f}")
        if np.isfinite(h["ratio_to_ffn_spread_pct"]):
            print(f"  slope / the same sweep's FFN ms at the shallowest depth: spread "
                  f"{h['ratio_to_ffn_spread_pct']:.1f} % (a drift that slows every stage alike cancels here)")
        if h["r_stage_shallowest"]:
            print("  slope vs the same sweep's depth-invariant stage ms at the shallowest depth: r = "
                  + ", ".join(f"{k} {v:+.2f}" for k, v in h["r_stage_shallowest"].items()))
    if h:
        groups = [f"{k} {', '.join(f'{v:.3f} ({u:.2f} us)' for v, u in zip(g, h['split_us_by_state'][k], strict=True))}"
                  + (f", spread {checks.spread_pct(np.array(g)):.1f} %" if len(g) > 1 else "")
                  for k, g in h["slope_by_state"].items() if g]
        print(f"  by state (split cost < or >= {SLOW_SYNC_US:g} us; a sweep flagged for a state change apart; unknown: "
              "saved before the state check): "
              + "; ".join(groups))
    return spread, h


def heterogeneity(res: list[dict]) -> dict | None:
    """Between-sweep spread of the attn_kv slope against each sweep's own interval: the between-sweep sd, the
    root-mean-square within-sweep standard error (95 % interval width / 3.92), Cochran's Q and I2 (the share
    of the variation beyond sampling noise), and the correlation of the slope with the sweep's split cost."""
    if len(res) < 3:
        return None
    s = np.array([r["attn_kv_slope"] for r in res], float)
    se = np.array([(r["attn_kv_slope_ci"][1] - r["attn_kv_slope_ci"][0]) / 3.92 for r in res], float)
    sync = np.array([r.get("sync_us") for r in res], float)  # None (not measured) -> NaN
    state = [_state(r, y) for r, y in zip(res, sync, strict=True)]
    nan = float("nan")
    q = nan
    if np.isfinite(se).all() and (se > 0).all():  # an interval of zero width (no bootstrap) weighs nothing
        w = 1 / se**2
        q = float((w * (s - (w * s).sum() / w.sum()) ** 2).sum())
    return {"between_sd_pct": float(100 * s.std(ddof=1) / s.mean()),
            "within_se_pct": float(100 * np.sqrt((se**2).mean()) / s.mean()),
            "q": q, "i2_pct": float(100 * max(0.0, (q - (len(s) - 1)) / q)) if q > 0 else nan,
            "r_split_cost": _r(s, sync),
            "ratio_to_ffn_spread_pct": _ratio_spread(s, res),
            "slope_by_state": {k: [float(x) for x, st in zip(s, state, strict=True) if st == k] for k in STATES},
            "split_us_by_state": {k: [float(y) for y, st in zip(sync, state, strict=True) if st == k] for k in STATES},
            "r_stage_shallowest": {k: _r(s, np.array([r["stage_ms_shallowest"][k] for r in res], float))
                                   for k in checks.INVARIANT_STAGES
                                   if all(k in r.get("stage_ms_shallowest", {}) for r in res)}}


def _ratio_spread(s: np.ndarray, res: list[dict]) -> float:
    """Spread in % of each sweep's slope divided by its FFN ms at the shallowest depth: a drift that slows every
    stage alike cancels here, the VM's two-thread states (which move FFN and attention apart) do not."""
    ffn = np.array([r.get("stage_ms_shallowest", {}).get("ffn", np.nan) for r in res], float)
    return float(checks.spread_pct(s / ffn)) if np.isfinite(ffn).all() else float("nan")


def _state(r: dict, sync_us: float) -> str:
    if "state_change" not in r:  # saved before the check existed: a switch would go unseen
        return "unknown"
    if r["state_change"]:
        return "switched"
    return "unknown" if not np.isfinite(sync_us) else "slow-sync" if sync_us >= SLOW_SYNC_US else "quick-sync"


def _r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r, NaN unless both are finite and vary."""
    ok = np.isfinite(x).all() and np.isfinite(y).all() and x.std() > 0 and y.std() > 0
    return float(np.corrcoef(x, y)[0, 1]) if ok else float("nan")


def report_one(i: int, r: dict) -> None:
    dis = 100 * (r["attn_kv_rise_ms"] - r["plain_rise_ms"]) / r["plain_rise_ms"] if r["plain_rise_ms"] else np.nan
    lo, hi = r["attn_kv_slope_ci"]
    n, (c0, c1) = r["threads"], r["rise_disagreement_ci_pct"]
    print(f"sweep {i} ({n} thread{'s' if n != 1 else ''}): {r['wall_s']:.0f} s wall (load {r['load_s']:.1f} s); "
          f"invariant stages within {r['invariant_pct']:.2f} % ({r['invariant_stage']}); attn_kv rise "
          f"{r['attn_kv_rise_ms']:+.2f} ms vs plain {r['plain_rise_ms']:+.2f} ms "
          f"({dis:+.1f} % [{c0:+.1f}, {c1:+.1f}]); attn_kv slope {r['attn_kv_slope']:.3f} [{lo:.3f}, {hi:.3f}] "
          f"ms/1k; split {r['sync_us']:.2f} us", flush=True)
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
          + f" | steal {r['steal_pct']:.1f} % others {r['others_cpu_pct']:.1f} % | flags {r['flags'] or '-'}",
          flush=True)


if __name__ == "__main__":
    main()
