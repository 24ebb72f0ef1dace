"""analysis.predict on real tiny-twin runs: holdout validation, md/csv/json, the KV-type rule, bad input
(one line, non-zero exit), and the predicted curves in analysis.plots and the crossover in analysis.compare."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli

from analysis import baseline, forecast, plots, predict, table
from harness import store
from harness.errors import UsageError


def _sweep(tiny: Path, out: Path, contexts: str, *extra: str) -> Path:
    r = run_cli("harness.sweep", "--model", str(tiny), "--contexts", contexts, "--rounds", "4", "--warmup", "1",
                "--no-probe", "--threads", "1", "--out", str(out), *extra)
    assert r.returncode == 0, r.stderr
    return next(out.glob("*.parquet"))


@pytest.fixture(scope="module")
def run4(tiny_gguf, tmp_path_factory) -> Path:
    """Four depths on the tiny twin (window 32; the global layers' n_kv view reaches 512 at depth 320)."""
    return _sweep(tiny_gguf, tmp_path_factory.mktemp("run4"), "13,40,80,320", "--label", "tiny-4d")


@pytest.fixture(scope="module")
def run_q8(tiny_gguf, tmp_path_factory) -> Path:
    return _sweep(tiny_gguf, tmp_path_factory.mktemp("runq8"), "13,40,80,320", "-ctk", "q8_0", "-ctv", "q8_0")


def assert_one_line_error(r, code: int, text: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("analysis.predict: error:") and text in lines[0], r.stderr


def test_holdout_validation_md(run4):
    r = run_cli("analysis.predict", str(run4), "--fit-depths", "13,40,80", "--depth", "1000,4095", "--boot", "300")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Fitted on depths 13, 40, 80" in out and "one-regime fit" in out
    assert "no fitting depth puts a layer in the split-kv regime" in out
    assert "| 320 | held out |" in out and "| 13 | fit |" in out and "1 depth(s) held out" in out
    assert "| 1,000 |" in out and "| 4,095 |" in out and "20 chunked + 5 split-kv" in out
    assert "## Crossovers" in out and "attn_kv reaches ffn" in out
    print(out)  # the holdout table, for the record (pytest -s)


def test_csv_and_json(run4):
    r = run_cli("analysis.predict", str(run4), "--format", "csv", "--depth", "2048", "--boot", "200")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(io.StringIO(r.stdout))
    assert set(df["section"]) == {"parameter", "prediction", "crossover", "validation"}
    pred = df[(df["section"] == "prediction") & (df["depth"] == 2048)].set_index("quantity")
    assert pred.loc["plain_ms", "ci_low"] <= pred.loc["plain_ms", "value"] <= pred.loc["plain_ms", "ci_high"]
    assert {"attn_kv_ms", "attn_kv_pct", "ffn_ms", "kv_read_mib"} <= set(pred.index)
    assert set(df.loc[df["section"] == "crossover", "quantity"]) == {"attn_25pct", "attn_50pct", "attn_eq_ffn"}
    r = run_cli("analysis.predict", str(run4), "--format", "json", "--fit-depths", "13,80,320", "--boot", "200")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    # three fitting depths: one-regime is the only form forward validation (fit on two, predict 320) can check
    assert doc["model"]["fit_depths"] == [13, 80, 320] and doc["model"]["form"] == "one-regime"
    assert [v["depth"] for v in doc["validation"] if not v["fitted"]] == [40]
    assert {x["key"] for x in doc["crossovers"]} == {"attn_25pct", "attn_50pct", "attn_eq_ffn"}
    assert 4096 not in [p["depth"] for p in doc["predictions"]]  # defaults stay below the context length
    assert doc["model"]["context_length"] == 4096 and doc["model"]["cache_type_k"] == "f16"


def test_bad_input_is_one_line(run4, tiny_gguf, tmp_path):
    assert_one_line_error(run_cli("analysis.predict", str(tmp_path / "nope.parquet")), 1, "not found")
    assert_one_line_error(run_cli("analysis.predict", str(baseline.reference_run_path())), 1, "reference run")
    one = _sweep(tiny_gguf, tmp_path / "one", "13")
    assert_one_line_error(run_cli("analysis.predict", str(one)), 1, "needs at least 2")
    for bad in ("abc", "8k", "-5", "13,,40"):
        assert_one_line_error(run_cli("analysis.predict", str(run4), "--depth", bad), 2, "is not a depth")
    assert_one_line_error(run_cli("analysis.predict", str(run4), "--depth", "8192"), 2,
                          "beyond the model's context length (4,096")
    assert_one_line_error(run_cli("analysis.predict", str(run4), "--fit-depths", "13,999"), 2, "999 not measured")
    assert_one_line_error(run_cli("analysis.predict", str(run4), "--fit-depths", "13"), 2, "at least 2")
    assert_one_line_error(run_cli("analysis.predict", str(run4), "-ctk", "q9_9"), 2, "unknown KV cache type")


def test_another_kv_type_needs_a_run_made_with_it(run4, run_q8):
    r = run_cli("analysis.predict", str(run4), "-ctk", "q8_0", "-ctv", "q8_0")
    assert_one_line_error(r, 2, "cannot predict q8_0 from a run made with f16: give a second run made with q8_0 "
                                "(--with RUN2)")
    r = run_cli("analysis.predict", str(run4), "-ctk", "q4_0", "-ctv", "q4_0", "--with", str(run_q8))
    assert_one_line_error(r, 2, f"{run_q8} was made with q8_0")
    r = run_cli("analysis.predict", str(run4), "-ctk", "q8_0", "-ctv", "q8_0", "--with", str(run_q8),
                "--depth", "2048", "--boot", "200")
    assert r.returncode == 0, r.stderr
    assert "KV q8_0" in r.stdout and f"attention over the KV cache and kv_store from {run_q8}" in r.stdout
    assert "Predicted vs measured" not in r.stdout  # no validation against the f16 run's measurements
    assert "split-kv" not in r.stdout.split("## Predicted per token")[1]  # quantized caches never split KV
    r = run_cli("analysis.predict", str(run4), "--with", str(run_q8))
    assert_one_line_error(r, 2, "--with gives the KV cost of another cache type")


def test_kv_source_in_process(run4, run_q8):
    run, q8 = store.read_run(run4), store.read_run(run_q8)
    assert predict.kv_source(run, None, None, []) is None
    assert predict.kv_source(run, "Q8_0", "q8_0", [q8]) is q8
    with pytest.raises(UsageError, match="cannot predict K q8_0, V f16"):
        predict.kv_source(run, "q8_0", None, [q8])
    raw = store.Run(q8.path, q8.record.replace(contexts=tuple(c.replace(stage_ms_calibrated={}, stage_pct_calibrated={})
                                                              for c in q8.record.contexts)), q8.ops)
    with pytest.raises(store.InputError, match=r"another calibration than the run's \(raw vs calibrated\)"):
        predict.kv_source(run, "q8_0", "q8_0", [raw])  # raw attention (profiling overhead in it) on calibrated stages
    with pytest.raises(UsageError, match="'²' is not a depth"):
        predict.parse_depths("13,²", "--depth")


def test_plots_and_compare_show_the_model(run4, tmp_path):
    run, model = table.load(run4)
    tm, _, why = forecast.try_fit(run, n_boot=200)
    assert tm is not None and why == ""
    figs = plots.make_figures(run.record, model, tm)
    assert len(figs["stage_ms"].axes) == 2 and len(plots.make_figures(run.record, model)["stage_ms"].axes) == 1
    shares = figs["stage_shares"].axes[0]
    assert any("time model, fit on 13, 40, 80, 320" in ln.get_label() for ln in shares.get_lines())
    r = run_cli("analysis.plots", str(run4), "-o", str(tmp_path / "plots"))
    assert r.returncode == 0 and len(list((tmp_path / "plots").glob("*.png"))) == 4, r.stderr
    assert forecast.try_fit(store.read_run(baseline.reference_run_path()))[2].startswith("a reference run")
    r = run_cli("analysis.compare", str(run4), "--format", "csv")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(io.StringIO(r.stdout))
    assert {"crossover_depth", "crossover_ci_low", "crossover_ci_high", "crossover_note"} <= set(df.columns)
    assert df["crossover_depth"].nunique(dropna=False) == 1  # one value per group, on every context row
    r = run_cli("analysis.compare", str(run4))
    assert r.returncode == 0 and "attn_kv = ffn at depth [95 %]" in r.stdout, r.stderr


def test_a_run_not_measured_round_robin_has_no_time_model(run4, tmp_path):
    from test_compare import copy_run

    seq = copy_run(run4, tmp_path / "seq.parquet", params={"order": "sequential"})
    assert_one_line_error(run_cli("analysis.predict", str(seq)), 1, "not round-robin")
    r = run_cli("analysis.compare", str(seq), "--format", "csv")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(io.StringIO(r.stdout))
    assert df["crossover_depth"].isna().all() and df["crossover_note"].str.contains("not round-robin").all()
