"""robust.py's figures: the across-sweep arithmetic (heterogeneity, the ratio to FFN, --vary's arms and pairs, the
counts), checked on made-up sweeps, and one sweep's figures from a real kept tiny run."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
from conftest import ROOT

from harness.errors import UsageError

sys.path.insert(0, str(ROOT / "bench"))
robust = importlib.import_module("robust")
across = importlib.import_module("across")


def _sweeps(slopes, half_width, sync):
    return [{"attn_kv_slope": s, "attn_kv_slope_ci": [s - half_width, s + half_width], "sync_us": u}
            for s, u in zip(slopes, sync, strict=True)]


def test_heterogeneity_separates_device_change_from_sampling_noise():
    steady = across.heterogeneity(_sweeps([3.50, 3.52, 3.49, 3.51, 3.50], 0.10, [0.6, 0.9, 0.7, 0.8, 1.0]))
    assert steady["i2_pct"] == 0.0  # the sweeps disagree less than their own intervals allow
    moving = across.heterogeneity(_sweeps([3.4, 3.6, 3.8, 4.0, 4.2], 0.05, [0.5, 0.7, 0.9, 1.1, 1.3]))
    assert moving["i2_pct"] > 95
    assert moving["r_split_cost"] == pytest.approx(1.0)
    assert moving["within_se_pct"] == pytest.approx(100 * 0.05 / 1.96 / 3.8, rel=1e-3)
    assert across.heterogeneity(_sweeps([3.4, 3.6], 0.05, [0.5, 0.7])) is None
    blind = across.heterogeneity(_sweeps([3.4, 3.6, 3.8], 0.0, [None, 0.7, 0.9]))  # no interval, no split cost
    assert np.isnan(blind["i2_pct"]) and np.isnan(blind["q"]) and np.isnan(blind["r_split_cost"])
    assert moving["slope_by_state"] == {"quick-sync": [], "slow-sync": [], "switched": [],  # saved before the check
                                        "unknown": [3.4, 3.6, 3.8, 4.0, 4.2]}
    checked = [{**r, "state_change": None} for r in _sweeps([3.4, 3.6, 3.8, 3.9], 0.05, [0.5, 1.6, None, 0.9])]
    checked[0]["state_change"] = {"stage": "ffn", "step_pct": -12.0, "after_rounds": 15}
    h = across.heterogeneity(checked)
    assert h["slope_by_state"] == {"quick-sync": [3.9], "slow-sync": [3.6], "switched": [3.4], "unknown": [3.8]}
    assert h["split_us_by_state"]["switched"] == [0.5] and h["split_us_by_state"]["quick-sync"] == [0.9]


def test_slope_over_ffn_cancels_a_uniform_drift_and_thread_counts_are_kept_apart(capsys):
    drift = np.array([1.00, 1.03, 1.05, 1.08, 1.10])  # every stage slows alike, sweep after sweep
    one = [{**r, "threads": 1, "stage_ms_shallowest": {"ffn": 86.0 * f}, "plain_ms": {13: 120.0, 4096: 150.0}}
           for r, f in zip(_sweeps(list(7.1 * drift), 0.1, [0.2] * 5), drift, strict=True)]
    assert across.heterogeneity(one)["ratio_to_ffn_spread_pct"] == pytest.approx(0.0, abs=1e-9)
    # two threads: FFN and attention move apart
    two = [{**r, "threads": 2, "stage_ms_shallowest": {"ffn": f}, "plain_ms": {13: 80.0, 4096: 96.0}}
           for r, f in zip(_sweeps([3.8, 4.2, 3.8, 4.2, 4.3], 0.1, [0.5, 1.1, 0.6, 0.5, 0.8]),
                           [55.0, 52.0, 56.0, 61.0, 58.0], strict=True)]
    assert across.heterogeneity(two)["ratio_to_ffn_spread_pct"] > 10
    assert np.isnan(across.heterogeneity(_sweeps([3.4, 3.6, 3.8], 0.1, [0.5] * 3))["ratio_to_ffn_spread_pct"])
    per = across.across_by_arm([x for pair in zip(two, one, strict=True) for x in pair])
    assert list(per) == ["threads=2", "threads=1"]
    assert per["threads=1"][0] == pytest.approx(100 * 7.1 * 0.10 / (7.1 * drift.mean()))
    assert per["threads=2"][0] == pytest.approx(100 * 0.5 / 4.06)
    out = capsys.readouterr().out
    assert "--- threads=2: 5 sweeps" in out and "--- threads=1: 5 sweeps" in out
    assert "(threads=2) / (threads=1), 5 pairs" in out


def test_vary_parses_one_setting_and_pairs_its_sweeps(capsys):
    assert across.parse_vary(None) == [None]
    assert across.parse_vary("flash_attn=on,off") == [("flash_attn", "on"), ("flash_attn", "off")]
    assert across.parse_vary("threads=1", least=1) == [("threads", 1)]  # robust.py --threads 1: no alternation
    for bad in ("fa=on,off", "threads=2,0", "threads=x,1", "threads=²,1", "flash_attn=on", "flash_attn",
                "flash_attn=on,on", "flash_attn=on,maybe", "cache_type_k=f16,q9", "n_ubatch=a,b"):
        with pytest.raises(UsageError, match="^--vary takes SETTING=A,B"):
            across.parse_vary(bad)

    def sweep(fa, slope, p13, p4k):
        return {"attn_kv_slope": slope, "attn_kv_slope_ci": [slope - 0.05, slope + 0.05], "sync_us": 0.6,
                "threads": 2, "settings": {"threads": 2, "flash_attn": fa}, "plain_ms": {13: p13, 4096: p4k}}

    on = [sweep("on", 4.1, 80.0, 97.0), sweep("on", 4.4, 81.0, 99.0), sweep("on", 4.2, 84.0, 100.0)]
    off = [sweep("off", 1.35, 84.0, 90.0), sweep("off", 1.40, 83.0, 89.0), sweep("off", 1.30, 88.0, 91.0)]
    per = across.across_by_arm([on[0], off[0], off[1], on[1], on[2], off[2]])  # the --vary order: AB BA AB
    assert list(per) == ["flash_attn=on", "flash_attn=off"]  # threads did not vary, so it is not in the label
    rows = across.pair_ratios(("on", on), ("off", off))
    assert rows["attn_kv slope"] == pytest.approx([4.1 / 1.35, 4.4 / 1.40, 4.2 / 1.30])
    assert rows["plain ms, deepest depth"] == pytest.approx([97 / 90, 99 / 89, 100 / 91])
    assert "plain ms, shallowest depth: x0.952, x0.976, x0.955; median x0.955" in capsys.readouterr().out
    saved = [{k: v for k, v in r.items() if k != "settings"} for r in on]  # results saved before settings were kept
    assert list(across.across_by_arm(saved)) == [""]
    assert list(across.across_by_arm(saved + on)) == [""]  # old and new alike: nothing differs that both recorded
    labelled = [{**r, "label": f"robust-{i}-flash_attn-{r['settings']['flash_attn']}"}
                for i, r in enumerate(on)] + [{**r, "label": f"robust-{i}-flash_attn-off"} for i, r in enumerate(off)]
    shuffled = across.pair_ratios(("on", labelled[:3][::-1]), ("off", labelled[3:5]))  # --runs in any order
    assert shuffled["attn_kv slope"] == pytest.approx([4.4 / 1.40, 4.1 / 1.35])  # by pair number; one left out
    assert "1 sweep(s) without a partner left out" in capsys.readouterr().out
    twice = across.pair_ratios(("on", labelled[:2] * 2), ("off", labelled[3:5] * 2))  # two sessions pooled: by order
    assert twice["attn_kv slope"] == pytest.approx([4.1 / 1.35, 4.4 / 1.40] * 2)
    assert "in the order given" in capsys.readouterr().out


def test_robust_figures_of_a_kept_run(tiny_run):
    r = robust.figures(tiny_run)
    assert r["wall_s"] > 0 and set(r["plain_ms"]) == {13, 40, 80}
    assert r["settings"]["threads"] == r["threads"] and r["settings"]["flash_attn"] in ("on", "off", "auto")
    assert set(r["stage_ms_shallowest"]) <= set(robust.checks.INVARIANT_STAGES) and r["stage_ms_shallowest"]["ffn"] > 0
    lo, hi = r["attn_kv_slope_ci"]
    assert lo <= r["attn_kv_slope"] <= hi
    assert set(r["invariant_slopes_off_zero_pct"]) <= set(robust.checks.INVARIANT_STAGES)


def test_robust_splits_a_missed_rise_into_context_offsets_and_other_stages(tiny_run, capsys):
    r = robust.figures(tiny_run)
    assert np.isfinite(r["profiled_rise_ms"])
    robust.report_one(0, {**r, "plain_rise_ms": 10.0, "attn_kv_rise_ms": 10.5, "profiled_rise_ms": 11.0})
    assert "attn_kv rise - plain rise" not in capsys.readouterr().out  # +5 %: within the target, nothing to split
    robust.report_one(0, {**r, "plain_rise_ms": 10.0, "attn_kv_rise_ms": 12.0, "profiled_rise_ms": 11.5})
    assert ("attn_kv rise - plain rise = +2.00 ms = +1.50 (the profiled contexts rose more than the plain ones: their "
            "own offsets) +0.50 (the other stages rose -0.50 ms)") in capsys.readouterr().out


def test_robust_counts_invariant_slopes_off_zero_with_the_unflagged_apart(capsys):
    """Three sweeps with the count, one unflagged and off zero, one saved before it; invariance: judged, all five;
    the interval level each sweep's count used (results saved before the joint check: 95 %)."""
    inv = [dict(invariant_pct=j, invariant_per_stage_pct={"ffn": j, "norm": n}) for j, n in ((1.5, 3), (2.5, 1),
                                                                                               (1, 1.9), (1.9, 2.1))]
    robust.report_counts([{"invariant_slopes_off_zero_pct": {"ffn": -1.0}, "flags": [], **inv[0]},
                          {"invariant_slopes_off_zero_pct": {"norm": 2.0}, "flags": ["drift"], **inv[1]},
                          {"invariant_slopes_off_zero_pct": {}, "flags": [], **inv[2]}, {"flags": [], **inv[3]}])
    out = capsys.readouterr().out
    assert "off 0: in 2 of 3 sweeps; unflagged 1 of 2" in out and "1 sweeps saved before this count" in out
    assert "slope interval (95 % each)" in out
    robust.report_counts([{"invariant_slopes_off_zero_pct": {}, "invariant_slopes_level": 0.99, "flags": [], **inv[0]},
                          {"invariant_slopes_off_zero_pct": {}, "flags": [], **inv[1]}])
    assert "slope interval (95 % and 99 % each) is off 0: in 0 of 2" in capsys.readouterr().out
    assert "the judged stages in 3 of 4 sweeps; all five stages, norm included, in 1 of 4" in out


def test_robust_runs_reads_a_copy_once(tiny_run, tmp_path, capsys, monkeypatch):
    import shutil

    copy = shutil.copy(tiny_run, tmp_path / "copy.parquet")  # the same measurement under another name
    monkeypatch.setattr(robust, "save_results", lambda kind, payload: None)  # not into the user's bench/results
    robust.main(["--runs", str(tiny_run), str(copy)])
    out = capsys.readouterr().out
    assert "1 of the runs given left out" in out and out.count("sweep 0 (") == 1 and "sweep 1 (" not in out


def test_robust_refigures_a_run_saved_before_the_current_split_cost(tiny_run, tmp_path):
    """A run whose contexts were calibrated on another split-cost estimator is judged on its rounds anew, not
    on its stored calibrated means (here made stale: doubled) beside rises calibrated on the current one."""
    from dataclasses import replace

    from harness import store

    run = store.read_run(tiny_run)
    old = tuple(replace(c, sync_us_estimator="mean", calibrated_sum_pct=2 * c.calibrated_sum_pct,
                        stage_ms_calibrated={s: 2 * v for s, v in c.stage_ms_calibrated.items()},
                        mode_diff_pp={s: 2 * v for s, v in c.mode_diff_pp.items()})
                for c in run.record.contexts)
    stale = store.write_run(run.ops, replace(run.record, contexts=old), tmp_path, "stale.parquet")
    now, then = robust.figures(tiny_run), robust.figures(stale)
    for k in ("attn_kv_rise_ms", "calibrated_sum_pct", "invariant_pct", "invariant_per_stage_pct", "sync_us"):
        assert then[k] == pytest.approx(now[k]), k
    back = store.read_run(stale)  # the mode comparison too, from the run's calibration tokens per stage
    redone = robust.on_current_split_cost(back.record, robust.stats.round_data(back.ops, back.tokens,
                                                                               back.calibration_stages))
    assert [c.mode_diff_pp for c in redone.contexts] == [c.mode_diff_pp for c in run.record.contexts]


def test_robust_prints_the_captures_rise_with_depth_over_its_sweeps(tiny_run, capsys):
    """Over sweeps: profiled rise - plain rise, beside the other stages' rise; on a real run attn_kv's rise and
    theirs make the profiled rise (the calibration cancels: the same segments at every depth), up to what the
    calibration clips at 0 (often, on the tiny twin's microsecond stages)."""
    from harness import stats, store

    r, run = robust.figures(tiny_run), store.read_run(tiny_run)
    rd = stats.round_data(run.ops, run.tokens)
    sub = rd.segs * max(stats.split_cost_ms(rd.calib_delta, rd.calib_extra), 0.0)  # (depths, stages), as calibrated
    clipped = np.nanmean(np.maximum(sub - rd.stage, 0).sum(axis=2), axis=0)  # per depth, mean over rounds
    gap = r["attn_kv_rise_ms"] + r["rest_rise_ms"] - r["profiled_rise_ms"]
    assert abs(gap) <= clipped[0] + clipped[-1] + 1e-9
    res = [{"profiled_rise_ms": p + x, "plain_rise_ms": p, "rest_rise_ms": y} for p, x, y in
           ((16.0, 0.4, 0.3), (17.0, 0.5, 0.2), (18.0, 0.6, 0.4))]
    robust.report_capture([*res, {"plain_rise_ms": 1.0}])  # one saved before the figure: left out
    out = capsys.readouterr().out
    assert ("over 3 sweeps (mean +- se): profiled rise - plain rise +0.50 +- 0.06 ms; the stages other than attn_kv "
            "rose +0.30 +- 0.06 ms") in out
    robust.report_capture(res[:1])
    assert capsys.readouterr().out == ""  # one sweep cannot tell
