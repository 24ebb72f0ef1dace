"""harness/stats.py on made-up rounds: the calibration token's tables as matrices, the split cost, and the two
modes compared paired by round (pure unit tests of the arithmetic)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from harness import columns, stages, stats


def test_round_data_puts_each_calibration_token_at_its_round_and_depth():
    """Round numbers that skip (a resumed run), a stage this harness does not know, a context not in the run."""
    ops = pd.DataFrame([("a", 13, r, 0, 5, "x", 0, "MUL_MAT", stages.FFN, 50.0) for r in (0, 1, 5)]
                       + [("b", 658, r, 0, 5, "x", 0, "MUL_MAT", stages.FFN, 60.0) for r in (0, 1, 5)],
                       columns=list(columns.OP_COLUMNS))
    tokens = pd.DataFrame([(c, d, r, p, 1, 100.0) for c, d in (("a", 13), ("b", 658)) for r in (0, 1, 5)
                           for p in (columns.PLAIN, columns.PROFILED)]
                          + [("a", 13, 0, columns.CALIBRATION, 9, 120.0), ("b", 658, 5, columns.CALIBRATION, 9, 130.0)],
                          columns=list(columns.TOKEN_COLUMNS))
    calib = pd.DataFrame([("a", 13, 0, stages.FFN, 4, 70.0), ("a", 13, 0, "new-stage", 2, 30.0),
                          ("b", 658, 5, stages.FFN, 6, 80.0), ("b", 658, 5, stages.HOST, 0, 5.0),
                          ("zz", 9, 1, stages.FFN, 3, 1.0)], columns=list(columns.CALIB_STAGE_COLUMNS))
    rd = stats.round_data(ops, tokens, calib)
    ffn, other, host = stats.S[stages.FFN], stats.S[stages.OTHER], stats.S[stages.HOST]
    assert list(rd.rounds) == [0, 1, 5] and list(rd.calib_depth) == [0, -1, 1]  # "zz" is in no depth: left out
    assert rd.ops_stage[0, ffn] == pytest.approx(0.07) and rd.ops_stage[0, other] == pytest.approx(0.03)
    assert rd.ops_segs[0, ffn] == 4 and rd.ops_segs[0, other] == 2 and rd.ops_segs[2, host] == 0
    assert rd.ops_stage[2, ffn] == pytest.approx(0.08) and rd.ops_stage[2, host] == pytest.approx(0.005)
    assert np.isnan(rd.ops_stage[1]).all() and not rd.ops_segs[1].any()
    assert list(rd.calib_extra) == [8, 0, 8]  # 9 splits against the profiled token's 1
    assert stats.round_data(ops, tokens).ops_stage is not None  # no table: every round without a token
    assert (stats.round_data(ops, tokens).calib_depth == -1).all()


def test_mode_diff_pairs_the_ops_token_with_its_own_rounds_stages_token():
    """FFN's time moves from round to round (a VM state) and gemma3n_extra's does not, so shares differ by round:
    the ops token must be compared with the stages tokens of its own rounds (all rounds would give 13's ops token a
    difference it does not have). A stage the ops token times 5 % longer at one depth shows there only."""
    n, cost, lv = 12, 0.01, np.tile([1.0, 1.3, 0.8, 1.1, 1.25, 0.9], 2)
    ffn, ext = stats.S[stages.FFN], stats.S[stages.GEMMA3N_EXTRA]
    segs = np.zeros((2, len(stages.STAGES)))
    segs[:, ffn], segs[:, ext] = 10, 100
    st = np.zeros((n, 2, len(stages.STAGES)))
    st[:, :, ffn], st[:, :, ext] = (60 * lv + 10 * cost)[:, None], 10 + 100 * cost
    ops, ops_segs = np.zeros((n, len(stages.STAGES))), np.zeros((n, len(stages.STAGES)))
    ops_segs[:, ffn], ops_segs[:, ext] = 30, 500
    at = np.arange(n) % 2
    ops[:, ffn], ops[:, ext] = 60 * lv + 30 * cost, 10 * np.where(at == 1, 1.05, 1.0) + 500 * cost
    plain = st.sum(axis=2)
    rd = stats.RoundData(("a", "b"), (13, 658), np.arange(n), plain, plain, st, segs, np.full(n, cost * 400),
                         np.full(n, 400.0), ops, ops_segs, at)
    d0, d1 = stats.mode_diff(rd, cost, 0), stats.mode_diff(rd, cost, 1)
    assert d0["ops_rounds"] == d1["ops_rounds"] == 6
    assert max(abs(v) for v in d0["mode_diff_pp"].values()) < 1e-9
    f1 = 60 * lv[1::2].sum()
    want = 100 * (63 / (f1 + 63) - 60 / (f1 + 60))
    assert d1["mode_diff_pp"][stages.GEMMA3N_EXTRA] == pytest.approx(want)
    assert d1["mode_diff_pp"][stages.FFN] == pytest.approx(-want)
    lo, hi = d1["mode_diff_pp_ci"][stages.GEMMA3N_EXTRA]
    assert 0 < lo <= want <= hi
    noisy = replace(rd, calib_delta=cost * 400 * np.random.default_rng(1).uniform(0.5, 1.5, n))  # cost uncertain
    lo2, hi2 = stats.mode_diff(noisy, cost, 1)["mode_diff_pp_ci"][stages.GEMMA3N_EXTRA]
    assert hi2 - lo2 > 2 * (hi - lo)  # ... and the interval says so (500 of the ops token's splits are extras')
    assert stats.mode_diff(rd, float("nan"), 1) == {}  # no split cost: nothing calibrated to compare
    raw = stats.mode_diff(rd, cost, 0, ops_calibrated=False)["mode_diff_pp"]  # ops' 20 more splits uncorrected
    assert raw[stages.GEMMA3N_EXTRA] > 0.3 and raw[stages.FFN] < 0
    few = replace(rd, calib_depth=np.where(np.arange(n) == 0, 0, 1))
    one = stats.mode_diff(few, cost, 0)  # one round at depth 0: a difference, no interval
    assert one["ops_rounds"] == 1 and "mode_diff_pp" in one and "mode_diff_pp_ci" not in one
    no_ops = replace(rd, ops_stage=None, ops_segs=None, calib_depth=None)
    assert stats.mode_diff(no_ops, cost, 1) == {}  # a run that kept no calibration tokens per stage


def test_split_cost_is_not_moved_by_one_token_a_lost_core_hit():
    """40 rounds, 2,710 extra splits at ~1 us each, token noise +-1 ms; one stages token 40 ms slow (NOTES §24)."""
    rng = np.random.default_rng(3)
    delta = 2.71 + rng.normal(0, 1.0, 40)
    extra = np.full(40, 2710.0)
    clean = stats.split_cost_ms(delta, extra)
    delta[7] -= 40.0
    assert abs(stats.split_cost_ms(delta, extra) - clean) < 0.1e-3  # under 0.1 us
    assert abs(np.mean(delta) / np.mean(extra) - clean) > 0.3e-3  # the mean it replaced: moved by ~0.37 us
    delta[3], extra[5] = np.nan, 0.0  # rounds without a calibration token are left out
    boot = stats.split_cost_ms(np.tile(delta, (4, 1)), np.tile(extra, (4, 1)))  # resampled rows: one cost each
    assert boot.shape == (4,) and np.allclose(boot, stats.split_cost_ms(delta, extra))
    assert np.isnan(stats.split_cost_ms(np.full(5, np.nan), np.zeros(5)))


def test_mean_se_is_over_finite_units_and_refuses_one():
    m, se = stats.mean_se(np.array([1.0, 2.0, 3.0, np.nan, np.inf]))
    assert float(m) == pytest.approx(2.0) and float(se) == pytest.approx(1.0 / np.sqrt(3))
    m, se = stats.mean_se(np.array([[1.0, 2.0], [3.0, np.nan], [5.0, 4.0]]))  # per column, each its own n
    assert m == pytest.approx([3.0, 3.0]) and se == pytest.approx([2.0 / np.sqrt(3), np.sqrt(2) / np.sqrt(2)])
    assert np.isnan(stats.mean_se(np.array([7.0]))[1])  # one unit: no standard error


def test_interval_level_sets_the_percentiles_and_95_is_the_default():
    """stats.interval takes the central ``level`` of the resamples (99 %: the invariant stages' joint check)."""
    x = np.arange(1001, dtype=float)[:, None] * [1.0, 2.0]
    assert stats.interval(x) == pytest.approx(np.array([[25.0, 50.0], [975.0, 1950.0]]))
    assert stats.interval(x, level=0.99) == pytest.approx(np.array([[5.0, 10.0], [995.0, 1990.0]]))
    x[0, 0] = np.nan  # NaN resamples are left out
    assert stats.interval(x, level=0.99)[:, 0] == pytest.approx([1 + 0.005 * 999, 1000 - 0.005 * 999])
