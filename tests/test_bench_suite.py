"""bench/suite.py end to end on the tiny twin: a stages sweep and an ops sweep (which has no calibration token),
their overhead rows, mode agreement (paired by round within the stages sweep, and across the two) and roofline,
as the README's figures are made."""

from __future__ import annotations

import importlib
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
suite = importlib.import_module("suite")


def test_suite_runs_stages_and_ops_sweeps(tiny_gguf, monkeypatch, capsys):
    saved = {}
    monkeypatch.setattr(suite, "save_results", lambda kind, payload: saved.setdefault(kind, payload))
    assert suite.main(["--model", str(tiny_gguf), "--rounds", "3", "--skip", "twin,depth"]) == 0
    res, out = saved["suite"], capsys.readouterr().out
    assert [r["depth"] for r in res["stages"]] == [r["depth"] for r in res["ops"]] == [13, 172, 658]
    assert all(r["sync_us"] is not None for r in res["stages"])
    for key in ("mode_agreement_unpaired_raw_pp", "mode_agreement_unpaired_pp"):  # ops' raw shares, stages' own
        assert len(res[key]) == 3 and all(0 <= v < 100 for v in res[key]), res[key]
    assert "mode agreement, unpaired (two sweeps), stages calibrated, ops raw" in out and "sweep cost" in out
    paired = res["mode_agreement_paired_pp"]  # three rounds: one calibration token at each depth
    assert len(paired) == 3 and all(0 <= v < 100 for v in paired), paired
    raw = res["mode_agreement_paired_ops_raw_pp"]  # the ops tokens' extra splits left in: another figure
    assert len(raw) == 3 and all(0 <= r < 100 and r != p for r, p in zip(raw, paired, strict=True)), (raw, paired)
    assert set(res["targets"]) >= {"mode_agreement_paired_pp"}
    assert all(r["ops_rounds"] == 1 for r in res["stages"]) and "mode agreement, paired by round" in out
