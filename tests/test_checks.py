"""The checks every run gets, on made-up rounds (pure unit tests of harness/checks.py's arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest

from harness import checks, stages, stats
from harness.record import ContextSummary, Invariants


def _invariants(st: np.ndarray, depths=(13, 658, 4096)):
    """checks.invariants on made-up stage ms (rounds x depths x stages), plain = their sum."""
    n = st.shape[0]
    plain = st.sum(axis=2)
    rd = stats.RoundData(tuple(map(str, depths)), depths, np.arange(n), plain, plain, st,
                         np.zeros((len(depths), len(stages.STAGES))), np.full(n, np.nan), np.zeros(n))
    contexts = [ContextSummary(**s) for s in stats.summarize(rd, n_boot=20)[0]]
    return contexts, checks.invariants(contexts, rd)


def test_invariance_check_uses_trimmed_values_over_rounds():
    """A lost core makes a few outlier tokens; three of them on one depth move its attn_proj mean by ~6 % but
    not its 20 % trimmed mean, so no drift is flagged. A real shift of every round at one depth is flagged."""
    rng = np.random.default_rng(0)
    n_rounds, depths = 40, (13, 658, 4096)
    base = {stages.FFN: 60.0, stages.LM_HEAD: 15.0, stages.ATTN_PROJ: 5.0, stages.GEMMA3N_EXTRA: 7.0}

    def run(shift_at_deepest: float, outliers_ms: float, noise: float = 0.003):
        st = np.zeros((n_rounds, len(depths), len(stages.STAGES)))
        for s, v in base.items():
            st[:, :, stats.S[s]] = v * (1 + rng.normal(0, noise, (n_rounds, len(depths))))
        st[:, -1, stats.S[stages.ATTN_PROJ]] *= shift_at_deepest
        st[:3, -1, stats.S[stages.ATTN_PROJ]] += outliers_ms
        contexts, inv = _invariants(st, depths)
        drift = [f.message for f in checks.flags(contexts, inv, [], cores=2, synthetic=False, complete=True,
                                                 stop_reason=None) if f.kind == "drift"]
        return inv, drift

    inv, flagged = run(1.0, outliers_ms=4.0)
    assert inv.estimator == checks.ESTIMATOR and inv.per_stage_pct[stages.ATTN_PROJ] < 1.0 and not flagged
    assert inv.per_stage_mean_pct[stages.ATTN_PROJ] > 5.0  # the means see the outliers
    inv, flagged = run(1.05, outliers_ms=0.0)
    assert inv.stage == stages.ATTN_PROJ and 4.0 < inv.max_disagreement_pct < 6.0 and flagged
    assert inv.noise_floor_pct[stages.ATTN_PROJ] < inv.max_disagreement_pct and "beyond this run's noise" in flagged[0]
    assert checks.invariants(contexts=[ContextSummary(**s) for s in stats.summarize(
        stats.RoundData(("a", "b"), (1, 2), np.arange(2), np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2, 9)),
                        np.zeros((2, 9)), np.full(2, np.nan), np.zeros(2)), n_boot=5)[0]]).estimator == "mean"


def test_noise_floor_holds_pure_noise_and_the_flag_says_which_side_it_is_on():
    """On depth-free noise the observed spread exceeds the permutation floor (its 95th percentile) in about
    1 run of 20; the drift flag says whether the disagreement is within the run's floor or beyond it."""
    rng = np.random.default_rng(1)
    spread, floor = [], []
    for _ in range(20):
        x = 60.0 * (1 + rng.normal(0, 0.05, (40, 4)))
        spread.append(checks.spread_pct(checks.depth_values(x)))
        floor.append(checks.noise_floor_pct(x))
    spread, floor = np.array(spread), np.array(floor)
    assert (spread > floor).sum() <= 4  # a floor too low would be crossed often
    assert np.median(floor) < 1.5 * np.percentile(spread, 95)  # ... and one too high never

    def message(floor):
        inv = Invariants(max_disagreement_pct=2.5, stage=stages.FFN, threshold_pct=2.0,
                         noise_floor_pct={} if floor is None else {stages.FFN: floor})
        return [f.message for f in checks.flags([], inv, [], cores=2, synthetic=False, complete=True,
                                                stop_reason=None) if f.kind == "drift"][0]

    assert "within this run's noise (its floor: 3.0 %)" in message(3.0)
    assert "beyond this run's noise (its floor: 1.0 %)" in message(1.0)
    assert "its noise is above the threshold" in message(None)


@pytest.mark.parametrize("n_depths", [3, 1])
def test_state_change_over_rounds_is_found_where_it_is_and_not_in_noise(n_depths):
    """A device that switches state after 15 of 40 rounds (FFN -12 %, gemma3n_extra +25 %, as measured on the
    2-core VM) is flagged with the stage, the size and the round; the same noise without the switch is not.
    A run of one depth gets the same check over rounds, and no depth comparison."""
    rng = np.random.default_rng(2)
    base = {stages.FFN: 55.0, stages.LM_HEAD: 15.0, stages.ATTN_PROJ: 5.0, stages.GEMMA3N_EXTRA: 6.5}

    def run(switch: bool):
        st = np.zeros((40, n_depths, len(stages.STAGES)))
        for s, v in base.items():
            st[:, :, stats.S[s]] = v * (1 + rng.normal(0, 0.015, (40, n_depths)))
        if switch:
            st[15:, :, stats.S[stages.FFN]] *= 0.88
            st[15:, :, stats.S[stages.GEMMA3N_EXTRA]] *= 1.25
        contexts, inv = _invariants(st, (13, 658, 4096)[:n_depths])
        fl = checks.flags(contexts, inv, [], cores=2, synthetic=False, complete=True, stop_reason=None)
        assert inv.across_depths == (n_depths > 1) and (inv.stage == "") == (n_depths == 1)
        assert n_depths > 1 or not any(f.kind == "drift" for f in fl)
        return inv, [f.message for f in fl if f.kind == "state"]

    inv, flagged = run(True)
    assert inv.step_round[stages.GEMMA3N_EXTRA] == inv.step_round[stages.FFN] == 15
    assert 1.20 < inv.step_ratio[stages.GEMMA3N_EXTRA] < 1.30 and 0.85 < inv.step_ratio[stages.FFN] < 0.91
    assert len(flagged) == 1 and flagged[0].startswith("the device changed state during the run: gemma3n_extra")
    assert "after the first 15 rounds" in flagged[0]
    assert ("(one depth)" in flagged[0]) == (n_depths == 1)
    inv, flagged = run(False)
    assert max(abs(100 * (r - 1)) for r in inv.step_ratio.values()) < checks.SHIFT_PCT and not flagged
    if n_depths == 1:  # one depth and too few rounds for two sides of a step: nothing checked, no record
        few = stats.RoundData(("a",), (13,), np.arange(9), np.full((9, 1), 80.0), np.full((9, 1), 80.0),
                              np.full((9, 1, len(stages.STAGES)), 10.0), np.zeros((1, len(stages.STAGES))),
                              np.full(9, np.nan), np.zeros(9))
        assert checks.invariants([ContextSummary(**s) for s in stats.summarize(few, n_boot=5)[0]], few) is None
    assert all(abs(100 * (inv.step_ratio[s] - 1)) < inv.step_floor_pct[s] * 1.5 for s in inv.judged)


def test_trimmed_mean_drops_both_tails_and_skips_nan():

    x = np.array([[1.0, 5.0], [2.0, np.nan], [3.0, 5.0], [4.0, 5.0], [100.0, 50.0]])
    np.testing.assert_allclose(stats.trimmed_mean(x, 0.2), [3.0, 16.25])  # 5 values: 1 cut each side; 4: none
    np.testing.assert_allclose(stats.trimmed_mean(x, 0.0), [22.0, 16.25])


def test_invariance_is_paired_by_round():
    """The VM switches state after 20 of 40 rounds (every depth x1.25) and a lost core hits four low-state
    tokens at one depth. Unpaired, each depth's trim drops a different set of rounds and the level leaks in
    (~3.7 %); divided by each round's median over depths first, the trim drops the outliers and nothing is
    left. A real effect of depth (x1.03 at the deepest, every round) is still measured through the switch."""
    rng = np.random.default_rng(3)
    level = np.r_[np.ones(20), np.full(20, 1.25)][:, None]
    x = 60.0 * level * (1 + rng.normal(0, 0.003, (40, 3)))
    x[:4, 0] *= 1.3
    unpaired = float(checks.spread_pct(stats.trimmed_mean(x, checks.TRIM)))
    paired = float(checks.spread_pct(checks.depth_values(x)))
    assert unpaired > 3.0 and paired < 0.5
    y = 60.0 * level * (1 + rng.normal(0, 0.003, (40, 3))) * np.array([1.0, 1.0, 1.03])
    assert 2.7 < float(checks.spread_pct(checks.depth_values(y))) < 3.3
    st = np.zeros((40, 3, len(stages.STAGES)))  # the run's check judges FFN so, outliers and switch included
    st[:, :, stats.S[stages.FFN]] = x
    for s, v in {stages.LM_HEAD: 15.0, stages.ATTN_PROJ: 5.0, stages.GEMMA3N_EXTRA: 7.0}.items():
        st[:, :, stats.S[s]] = v * level * (1 + rng.normal(0, 0.003, (40, 3)))
    _, inv = _invariants(st)
    assert inv.estimator == checks.ESTIMATOR == "paired 20 % trimmed mean" and inv.per_stage_pct[stages.FFN] < 0.5
    x[5, :] = np.nan  # a round with no value is left out, and so is one missing a depth
    x[6, 0] = np.nan
    assert abs(float(checks.spread_pct(checks.depth_values(x))) - paired) < 0.5


def test_a_run_without_calibration_tokens_is_not_called_calibrated():
    st = np.zeros((6, 2, len(stages.STAGES)))
    st[:, :, stats.S[stages.FFN]] = 60.0
    plain = st.sum(axis=2)
    rd = stats.RoundData(("a", "b"), (13, 658), np.arange(6), plain, plain * 1.1, st,
                         np.ones((2, len(stages.STAGES))), np.full(6, np.nan), np.zeros(6))
    out, cost_us, _ = stats.summarize(rd, n_boot=20)
    assert np.isnan(cost_us)
    c = ContextSummary(**out[0])
    assert not c.stage_ms_calibrated and c.calibrated_sum_pct is None  # raw figures are not relabelled
    assert c.stage(stages.FFN) == pytest.approx(60.0)  # readers fall back to the raw stage ms
    calib = stats.RoundData(*[getattr(rd, f) for f in ("labels", "depths", "rounds", "plain", "profiled", "stage",
                                                       "segs")], np.full(6, 0.05), np.full(6, 10.0))
    c = ContextSummary(**stats.summarize(calib, n_boot=20)[0][0])
    assert c.stage_ms_calibrated[stages.FFN] == pytest.approx(60.0 - 0.005) and c.calibrated_sum_pct is not None


def test_zero_threads_is_refused_not_defaulted():
    from harness.config import SweepConfig, parse_contexts
    from harness.errors import UsageError

    with pytest.raises(UsageError, match="threads must be >= 1"):
        SweepConfig(contexts=parse_contexts("13,40"), threads=0).validate()
    assert SweepConfig(contexts=parse_contexts("13,40")).validate().threads is None


def test_a_stage_calibrated_to_zero_in_early_rounds_gives_no_nan_step():
    """norm is ~0.1 ms: calibration can clip it to 0 ms in a run's first rounds. A relative step from a level of
    0 is undefined; it must be left out, not stored as inf with a NaN floor (which the record refuses, and a
    sweep then lost its measurement writing it)."""
    x = np.full((40, 3), 0.1)
    x[:12] = 0.0
    step = checks.state_step(x)
    assert step is not None and np.isfinite(step[0]) and np.isfinite(step[2])
    assert checks.state_step(np.zeros((40, 3))) is None
    rng = np.random.default_rng(3)
    st = np.zeros((40, 3, len(stages.STAGES)))
    st[:, :, stats.S[stages.FFN]] = 60 + rng.normal(0, 0.1, (40, 3))
    st[12:, :, stats.S[stages.NORM]] = 0.1
    contexts, inv = _invariants(st)
    assert all(np.isfinite(v) for v in (*inv.step_ratio.values(), *inv.step_floor_pct.values()))
    Invariants.from_dict(inv.to_dict())  # the record takes it


def test_noise_is_shared_over_every_cpu_and_missing_counters_stay_unknown(monkeypatch):
    """The OS sums steal and busy time over every logical CPU, so the flags divide by those, not by the run's
    threads; a counter the OS lacks (steal on macOS) and a clock it only guesses (no cpufreq) are None, not 0."""
    from harness import device
    from harness.record import RoundNoise

    rounds = [RoundNoise(round=0, order=(), wall_s=1.0, steal_s=0.0, others_cpu_s=0.15)]
    noisy = [checks.flags([], None, rounds, cores=c, synthetic=False, complete=True, stop_reason=None) for c in (1, 2)]
    assert [[f.kind for f in fl] for fl in noisy] == [["noise"], []]  # 15 % of one CPU, 7.5 % of two
    before = {"steal_s": None, "busy_s": 1.0, "own_s": 0.5, "t": 0.0}
    assert device.noise_between(before, {**before, "busy_s": 2.0, "t": 1.0})["steal_s"] is None
    monkeypatch.setattr(device, "LIVE_CLOCK", False)
    assert device.sample_sensors()["cpu_mhz"] is None


def test_a_profiled_pass_faster_than_plain_is_judged_on_its_interval():
    """Below x1.0 with an interval wholly below it: flagged. A run from before intervals (version 1/2, checked on
    read) has only the point ratio, and a point below 1 is noise-level: not flagged."""
    c = ContextSummary(context="short", depth=13, timed_tokens=40, plain_ms=100.0, profiled_ms=99.0, stage_ms={},
                       stage_pct={}, covered_pct=99.8, attributed_pct=100.0, overhead_ratio=0.99)
    for ci, flagged in (((0.98, 0.995), True), ((0.98, 1.002), False), (None, False)):
        fl = checks.flags([c.replace(overhead_ratio_ci=ci)], None, [], cores=2, synthetic=False, complete=True,
                          stop_reason=None)
        assert any("faster than plain" in f.message for f in fl) == flagged, ci

