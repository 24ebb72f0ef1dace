"""Checks every run gets: the depth-invariance check (two or more depths), the state-change check over rounds
(ten or more rounds, any number of depths), and the flags a run raises (drift, state, noise, implausible overhead,
calibration, synthetic model, incomplete run).

Physics gives invariants: stages whose work does not depend on depth (FFN, LM head, attention
projections, Gemma 3n extras, norms) must take the same time at every depth. If they do not, the
device drifted within the run, its noise is above the threshold, or (measured on a 2-core VM, up to
~2 %: bench/NOTES.md §11) the stage's time does depend on depth there. The run says so, with a
permutation noise floor per stage that tells noise apart from the other two.

The same stages must also take the same time from round to round. A device that switches state during the
run (measured on the 2-core VM: FFN -12 % and gemma3n_extra +25 % from one round on, bench/NOTES.md §12)
leaves the depth comparisons sound, since every depth sees both states, but mixes two devices in every
per-depth figure. The run says so too.
"""

from __future__ import annotations

import warnings

import numpy as np

from harness import stages, stats
from harness.record import ContextSummary, Flag, Invariants, RoundNoise, RunRecord

INVARIANT_STAGES = (stages.FFN, stages.LM_HEAD, stages.ATTN_PROJ, stages.GEMMA3N_EXTRA, stages.NORM)
INVARIANT_THRESHOLD_PCT = 2.0  # largest allowed (max - min) / mean across depths of an invariant stage
INVARIANT_MIN_SHARE_PCT = 5.0  # judged only on stages holding at least this share (smaller ones: reported)
TRIM = 0.2  # each depth's value: a mean over its rounds without the lowest and highest 20 % (depth_values)
ESTIMATOR = f"paired {TRIM * 100:g} % trimmed mean"  # of within-round ratios (depth_values)
OVERHEAD_EXCESS = 0.03  # a context's profiled/plain ratio this far above the run's median is implausible
STEAL_PCT, OTHERS_CPU_PCT = 2.0, 10.0  # noise: CPU steal / other processes' CPU, % of the rounds' wall x cores
CALIB_SUM_TOL_PCT = 3.0  # calibrated stage ms must add up to the plain ms within this
N_PERM = 400  # permutations for an invariant stage's noise floors
SHIFT_PCT = 5.0  # a state change: an invariant stage's per-round time steps by more than this at one round
SHIFT_MIN_ROUNDS = 5  # rounds on each side of a step
SHIFT_PERM, SHIFT_FLOOR_PCTL = 2000, 99.0  # its floor, rounds shuffled: 95 % over up to 5 stages (Bonferroni)


def spread_pct(v: np.ndarray) -> np.ndarray:
    """(max - min) / mean across depths (the last axis), in %, NaN depths left out."""
    with np.errstate(all="ignore"):
        return 100.0 * (np.nanmax(v, -1) - np.nanmin(v, -1)) / np.nanmean(v, -1)


def round_ratios(x: np.ndarray) -> np.ndarray:
    """``x`` (rounds x depths [x stages]) with each round divided by its median over depths (its level: drift,
    the VM's state). A round missing any depth, or whose level is not positive, becomes NaN: its median would
    not be the same level's."""
    x = np.where(np.isnan(x).any(axis=1, keepdims=True), np.nan, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a round with no value at all: its ratios stay NaN
        level = np.nanmedian(x, axis=1, keepdims=True)
    with np.errstate(all="ignore"):
        return x / np.where(level > 0, level, np.nan)


def depth_values(x: np.ndarray) -> np.ndarray:
    """Each depth's value for the invariance check, paired by round: the 20 % trimmed mean over rounds of
    ``round_ratios(x)``. The trim then drops what differs between depths within a round (a lost core hitting
    one token), not a different set of rounds at each depth, through which a level that changes mid-run would
    leak in (bench/NOTES.md §17b)."""
    return stats.trimmed_mean(round_ratios(x), TRIM)


def noise_floor_pct(x: np.ndarray, n_perm: int = N_PERM, seed: int = 0) -> float:
    """The 95th percentile of the spread across depths of ``depth_values(x)`` (``x``: rounds x depths) with
    each round's depths shuffled: a permutation null that keeps every round's drift and removes any effect of
    depth. A spread above it is not this run's noise. A round's level does not change when its depths are
    shuffled, so the ratios are taken once and shuffled."""
    rng, r = np.random.default_rng(seed), round_ratios(x)
    tm = np.array([stats.trimmed_mean(rng.permuted(r, axis=1), TRIM) for _ in range(n_perm)])
    return float(np.nanpercentile(spread_pct(tm), 95))


def largest_step(y: np.ndarray, min_rounds: int = SHIFT_MIN_ROUNDS) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``y`` (one value per round, at least 2 * min_rounds of them), the largest step:
    100 * (mean after / mean before - 1) at the round k (>= min_rounds on each side) where it is largest in
    size; for one step in noise the means separate most at the step itself. Returns (steps %, k)."""
    y = np.atleast_2d(y)
    n, ks = y.shape[1], np.arange(min_rounds, y.shape[1] - min_rounds + 1)
    if not len(ks):
        raise ValueError(f"largest_step: {n} rounds, fewer than 2 x {min_rounds}")
    c = np.cumsum(y, 1)
    before, after = c[:, ks - 1] / ks, (c[:, -1:] - c[:, ks - 1]) / (n - ks)
    with np.errstate(all="ignore"):  # a level of 0 before (a tiny stage calibrated to 0 ms) has no relative step
        st = np.where(before > 0, 100.0 * (after / before - 1), np.nan)
    best = np.argmax(np.abs(np.nan_to_num(st, nan=0.0)), 1)
    return st[np.arange(len(y)), best], ks[best]


def state_step(x: np.ndarray, n_perm: int = SHIFT_PERM, seed: int = 0) -> tuple[float, int, float] | None:
    """The largest step over rounds of ``x`` (rounds x depths), each round taken as its median over depths (so
    depth cancels; with three or more depths one token slowed by a lost core does not move it, with two the
    floor below absorbs it): its size in %, the rounds before it, and its floor (the 99th percentile of the
    same statistic in size with the rounds' order shuffled: 95 % over up to five stages). Rounds with no value
    are left out. None with too few rounds for two sides, or no level above 0 before any step."""
    x = x[~np.isnan(x).all(1)]
    y = np.nanmedian(x, 1) if len(x) else np.empty(0)
    if len(y) < 2 * SHIFT_MIN_ROUNDS:
        return None
    step, k = largest_step(y)
    null, _ = largest_step(np.random.default_rng(seed).permuted(np.tile(y, (n_perm, 1)), axis=1))
    if np.isnan(step[0]) or np.isnan(null).all():
        return None  # no round with a level above 0 on the before side: nothing to compare
    return float(step[0]), int(k[0]), float(np.nanpercentile(np.abs(null), SHIFT_FLOOR_PCTL))


def invariants(contexts: list[ContextSummary], rd: stats.RoundData | None = None,
               threshold_pct: float = INVARIANT_THRESHOLD_PCT) -> Invariants | None:
    """Largest disagreement across depths of the depth-invariant stages, judged on stages holding >=
    INVARIANT_MIN_SHARE_PCT of decode. With the run's rounds ``rd`` (same depth order as ``contexts``), each
    depth's value is ``depth_values`` of its calibrated stage ms (a 20 % trimmed mean of within-round ratios):
    the noise here is heavy-tailed (a lost core hits one or two tokens), and a few such tokens on one depth
    move a 40-round mean by 2-4 % with no drift at all; trimmed, the noise floor is 1-2 % (bench/NOTES.md
    §9b), and paired by round a little lower (§17b). Without rounds (the seed's reference run), the
    summaries' means. One depth: only the
    check over rounds (``Invariants.across_depths`` false). None with nothing to check (one depth and fewer
    than 2 * SHIFT_MIN_ROUNDS rounds)."""
    if len(contexts) < (1 if rd is not None else 2):
        return None
    across = len(contexts) > 1
    means = np.array([[c.stage(s) for s in INVARIANT_STAGES] for c in contexts])  # (D, K)
    values, cal = means, None
    if rd is not None:
        cal = stats.calibrated(rd, stats.split_cost_ms(rd.calib_delta, rd.calib_extra))
        cal = cal[:, :, [stats.S[s] for s in INVARIANT_STAGES]]
        values = depth_values(cal)

    per, per_mean, floor, judged, steps = {}, {}, {}, {}, {}
    for k, s in enumerate(INVARIANT_STAGES):
        if means[:, k].mean() <= 0 or not np.nanmean(values[:, k]) > 0:  # NaN too: no round to judge
            continue
        if across:
            per[s], per_mean[s] = float(spread_pct(values[:, k])), float(spread_pct(means[:, k]))
            if cal is not None:
                floor[s] = noise_floor_pct(cal[:, :, k])
        if cal is not None:
            steps[s] = state_step(cal[:, :, k])
        if min(c.share(s) for c in contexts) >= INVARIANT_MIN_SHARE_PCT:
            judged[s] = per.get(s, 0.0)
    if not judged or not (across or any(steps.values())):  # one depth, too few rounds for the check over them
        return None
    worst = max(judged, key=judged.get) if across else ""
    return Invariants(max_disagreement_pct=judged.get(worst, 0.0), stage=worst, threshold_pct=threshold_pct,
                      per_stage_pct=per, estimator=ESTIMATOR if rd is not None else "mean",
                      per_stage_mean_pct=per_mean, noise_floor_pct=floor,
                      step_ratio={s: 1 + v[0] / 100 for s, v in steps.items() if v},
                      step_round={s: v[1] for s, v in steps.items() if v},
                      step_floor_pct={s: v[2] for s, v in steps.items() if v}, judged=tuple(judged))


def steps_pct(inv: Invariants | None) -> dict[str, float]:
    """Each judged stage's largest step over rounds, in % (after / before - 1)."""
    return {s: 100 * (r - 1) for s, r in inv.step_ratio.items() if s in inv.judged} if inv is not None else {}


def state_change(inv: Invariants | None) -> str | None:
    """The judged stage whose step over rounds is largest among those over SHIFT_PCT and over their floor."""
    big = {s: abs(v) for s, v in steps_pct(inv).items() if abs(v) > SHIFT_PCT and abs(v) > inv.step_floor_pct[s]}
    return max(big, key=big.get) if big else None


def flags(contexts: list[ContextSummary], inv: Invariants | None, rounds: list[RoundNoise], *, cores: int,
          synthetic: bool, complete: bool, stop_reason: str | None) -> list[Flag]:
    """Every flag the run raises, in a stable order. ``cores``: the machine's logical CPUs, over which the OS sums the
    steal and busy time the noise flags divide (not the run's threads)."""
    out: list[Flag] = []
    if synthetic:
        out.append(Flag("synthetic", "synthetic twin (random weights): timings are real, outputs are noise"))
    if not complete:
        out.append(Flag("incomplete", f"the sweep stopped early ({stop_reason}): fewer rounds than asked"))
    if inv is not None and inv.across_depths and inv.max_disagreement_pct > inv.threshold_pct:
        fl = inv.noise_floor_pct.get(inv.stage)
        why = ("the device drifted, or its noise is above the threshold" if fl is None else
               f"beyond this run's noise (its floor: {fl:.1f} %): the device drifted, or this stage's time depends "
               "on depth on this device" if inv.max_disagreement_pct > fl else
               f"within this run's noise (its floor: {fl:.1f} %): more rounds would tell")
        out.append(Flag("drift", f"{inv.stage} differs by {inv.max_disagreement_pct:.1f} % across depths "
                        f"({inv.estimator}s over rounds; its bytes do not depend on depth; threshold "
                        f"{inv.threshold_pct:g} %): {why}"))
    step = state_change(inv)
    if step is not None:
        size, of = steps_pct(inv)[step], f" of {len(rounds)}" if rounds else ""
        over, then = (("median over depths", "depths are compared within rounds, so their differences hold, but every "
                       "depth's ms mixes the two states") if inv.across_depths else
                      ("one depth", "its ms mixes the two states"))
        out.append(Flag("state", f"the device changed state during the run: {step}'s time per round ({over}) steps by "
                        f"{size:+.1f} % after the first {inv.step_round[step]}{of} rounds (beyond its shuffled-rounds "
                        f"floor {inv.step_floor_pct[step]:.1f} %; threshold {SHIFT_PCT:g} %): {then}"))
    ratios = [c.overhead_ratio for c in contexts if c.overhead_ratio is not None]
    norm = float(np.median(ratios)) if ratios else 1.0
    for c in contexts:
        ci = c.overhead_ratio_ci  # None: a run from before intervals (version 1/2), not judged on a point
        if c.overhead_ratio is None:
            continue
        if ci is not None and ci[1] < 1.0:
            out.append(Flag("overhead", f"profiled pass faster than plain (x{c.overhead_ratio:.3f}, 95 % "
                            f"[{ci[0]:.3f}, {ci[1]:.3f}]): the device changed speed between passes", c.context))
        elif c.overhead_ratio > norm + OVERHEAD_EXCESS:
            out.append(Flag("overhead", f"profiled/plain x{c.overhead_ratio:.3f} is far above the run's norm "
                            f"(x{norm:.3f})", c.context))
        if c.calibrated_sum_pct is not None and abs(c.calibrated_sum_pct - 100.0) > CALIB_SUM_TOL_PCT:
            out.append(Flag("calibration", f"calibrated stage ms add up to {c.calibrated_sum_pct:.1f} % of the plain "
                            f"ms/token (tolerance {CALIB_SUM_TOL_PCT:g} %)", c.context))
    wall = sum(r.wall_s for r in rounds) * max(1, cores)
    steal = sum(r.steal_s or 0.0 for r in rounds)
    others = sum(r.others_cpu_s or 0.0 for r in rounds)
    if wall > 0 and 100.0 * steal / wall > STEAL_PCT:
        out.append(Flag("noise", f"CPU steal was {100.0 * steal / wall:.1f} % of the measurement time: the "
                        "hypervisor took the CPU away"))
    if wall > 0 and 100.0 * others / wall > OTHERS_CPU_PCT:
        out.append(Flag("noise", f"other processes used {100.0 * others / wall:.1f} % of the CPU during "
                        "measurement"))
    return out


def rechecked(rec: RunRecord, rd: stats.RoundData | None = None) -> tuple[Invariants | None, list[Flag]]:
    """A stored run's invariance check and flags computed again with the current code (a run made before it:
    version 1/2 on read, or an older estimator); ``rd``: its rounds, else the contexts' means are judged."""
    contexts = list(rec.contexts)
    inv = invariants(contexts, rd)
    return inv, flags(contexts, inv, list(rec.rounds), cores=rec.device.logical_cores or 1, synthetic=rec.synthetic,
                      complete=rec.complete, stop_reason=rec.stop_reason)
