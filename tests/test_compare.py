"""Device compare (analysis.compare): grouping, pooling, baseline, slopes, plots and bad inputs."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, run_cli

from analysis import fleet, slope
from harness.store import META_KEY, read_run

REFERENCE_RUNS = sorted((ROOT / "analysis" / "data").glob("*.parquet"))


def copy_run(src: Path, dst: Path, **changes) -> Path:
    """A copy of a run with top-level metadata keys replaced (``model`` / ``params`` dicts are merged)."""
    table = pq.read_table(src)
    meta = json.loads(table.schema.metadata[META_KEY])
    for k, v in changes.items():
        meta[k] = {**meta[k], **v} if isinstance(v, dict) and isinstance(meta.get(k), dict) else v
    dst.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, META_KEY: json.dumps(meta).encode()}), dst)
    return dst


def compare_csv(*args: str) -> pd.DataFrame:
    r = run_cli("analysis.compare", *args, "--format", "csv")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return pd.read_csv(io.StringIO(r.stdout), keep_default_na=True)


def assert_one_line_error(r) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("analysis.compare: error:"), r.stderr


# ---------------------------------------------------------------- slope fit
@pytest.mark.parametrize(("df", "q"), [(1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423),
                                       (1000, 1.9623)])
def test_t_quantile_matches_tables(df, q):
    assert slope.t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)


def test_fit_slope_recovers_a_line_and_its_interval():
    rng = np.random.default_rng(1)
    x = np.repeat([100, 400, 900], 20)
    y = 2.0 + 0.003 * x + rng.normal(0, 0.05, len(x))  # 3 ms per 1,000 tokens
    fit = slope.fit_slope(x, y)
    assert fit.ci95_low_ms_per_1k < 3.0 < fit.ci95_high_ms_per_1k
    assert fit.slope_ms_per_1k == pytest.approx(3.0, abs=0.3)
    assert (fit.n_tokens, fit.n_depths) == (60, 3)
    one_depth = slope.fit_slope(np.full(5, 10), np.ones(5))
    assert np.isnan(one_depth.slope_ms_per_1k) and np.isnan(one_depth.ci95_low_ms_per_1k)


def test_stage_slopes_on_a_real_run(tiny_run):
    ops = read_run(tiny_run, only=slope.NEEDED_COLUMNS).ops
    s = slope.stage_slopes(ops)
    assert list(s.columns) == slope.SLOPE_COLUMNS
    assert {"ffn", "attn_kv"} <= set(s.index)
    n_tokens = ops.groupby(list(slope.TOKEN_KEY)).ngroups
    assert (s["n_tokens"] == n_tokens).all() and (s["n_depths"] == 3).all()
    assert (s["ci95_low_ms_per_1k"] <= s["slope_ms_per_1k"]).all()
    assert (s["slope_ms_per_1k"] <= s["ci95_high_ms_per_1k"]).all()


# ---------------------------------------------------------------- compare CLI
def test_two_devices_table_baseline_slopes_and_plots(tiny_run, tiny_run_1t, tmp_path):
    plots = tmp_path / "plots"
    r = run_cli("analysis.compare", str(tiny_run), str(tiny_run_1t), "--plots", str(plots))
    assert r.returncode == 0, r.stderr
    md = r.stdout
    assert "baseline: tiny-1t" in md  # default: first complete label, alphabetically
    assert "| tiny-1t |" in md and "| tiny-2t |" in md
    assert "speedup" in md and "## slope" in md
    assert md.count("## context") == 3
    for stem in ("compare_stage_ms", "compare_stage_share", "compare_roofline"):
        for ext in ("png", "svg"):
            assert (plots / f"{stem}.{ext}").stat().st_size > 1000

    df = compare_csv(str(tiny_run), str(tiny_run_1t), "--baseline", "tiny-2t")
    assert set(df["device"]) == {"tiny-1t", "tiny-2t"}
    assert sorted(df["depth"].unique()) == [13, 40, 80]
    assert len(df) == 6
    for col in ("plain_ms", "tokens_per_s", "ffn_ms", "ffn_pct", "ffn_gbps", "attn_kv_gbps", "bandwidth_gbps",
                "x_roofline", "base_speedup", "ffn_slope_ms_per_1k", "attn_kv_slope_ci95_low_ms_per_1k",
                "attn_kv_slope_ci95_high_ms_per_1k"):
        assert col in df.columns, col
    base = df[df["device"] == "tiny-2t"]
    assert np.allclose(base["base_speedup"], 1.0)
    other = df[df["device"] == "tiny-1t"]
    assert np.allclose(other["base_speedup"], base["plain_ms"].to_numpy() / other["plain_ms"].to_numpy())
    assert other["base_note"].str.contains("base threads=2").all()  # the differing setting is named
    assert df["ffn_gbps"].gt(0).all()  # tensor table present: achieved GB/s filled
    assert df["bandwidth_gbps"].isna().all() and df["x_roofline"].isna().all()  # swept with --no-probe
    assert df["group"].str.contains("threads=").all()  # threads differ: shown in the row label


def test_different_models_and_incomplete_runs_are_not_pooled(tiny_run, tmp_path):
    d = tmp_path / "fleet"
    d.mkdir()
    shutil.copy(tiny_run, d / tiny_run.name)
    copy_run(tiny_run, d / "repeat.parquet")  # same device, model and settings: pooled
    copy_run(tiny_run, d / "sub" / "other-model.parquet", model={"content_hash": "sha256s:0000feed"})
    copy_run(tiny_run, d / "sub" / "fa-on.parquet", params={"flash_attn": "on"})
    copy_run(tiny_run, d / "sub" / "partial.parquet", complete=False)
    df = compare_csv(str(d))
    short = df[df["depth"] == 13]
    assert len(short) == 4 and set(short["device"]) == {"tiny-2t"}
    assert short["group"].is_unique
    pooled = short[short["runs"] == 2]
    assert len(pooled) == 1 and pooled["sd_over"].iloc[0] == "runs"
    assert (short[short["runs"] == 1]["sd_over"] == "tokens").all()
    assert short["group"].str.contains("INCOMPLETE").sum() == 1
    assert short["group"].str.contains("flash_attn=on").sum() == 1
    assert short["group"].str.contains(r"\[0000feed\]").sum() == 1  # same name, other model: key shown
    assert np.allclose(short["base_speedup"], 1.0)  # every group is its own baseline on the only device


def test_baseline_with_another_model_says_what_differs(tiny_run, tmp_path):
    other = copy_run(tiny_run, tmp_path / "x.parquet", label="other-dev", model={"content_hash": "sha256s:beef"})
    r = run_cli("analysis.compare", str(tiny_run), str(other), "--baseline", "other-dev")
    assert r.returncode == 0, r.stderr
    assert "## notes" in r.stdout
    assert "ran a different model" in r.stdout
    assert "no baseline: model differs" in r.stdout


@pytest.mark.skipif(not REFERENCE_RUNS, reason="no reference run under analysis/data")
def test_reference_run_appears_as_a_device(tiny_run):
    df = compare_csv(str(tiny_run), str(REFERENCE_RUNS[0].parent))
    ref = df[df["reference"]]
    assert len(ref) >= 3 and ref["device"].nunique() == 1
    assert ref["ffn_gbps"].isna().all() and ref["bandwidth_gbps"].isna().all()  # blanks, not errors
    assert ref["ffn_ms"].gt(0).all()
    assert not (df[~df["reference"]]["device"] == ref["device"].iloc[0]).any()
    assert "tiny-2t" in set(df["device"])  # the default baseline is never the reference


def test_labels_without_label_and_hostname():
    meta = {"device": {"cpu_model": "Cortex-X3", "physical_cores": 8, "hostname": "phone1"}}
    assert fleet.device_label(meta) == "Cortex-X3 8c"
    assert fleet.device_label(meta, with_hostname=True) == "Cortex-X3 8c @phone1"
    assert fleet.device_label({**meta, "label": "Cortex-X3 8c"}, with_hostname=True) == "Cortex-X3 8c @phone1"
    assert fleet.device_label({**meta, "label": "pixel"}, with_hostname=True) == "pixel"


# ---------------------------------------------------------------- bad inputs
def test_empty_folder_is_a_one_line_error(tmp_path):
    assert_one_line_error(run_cli("analysis.compare", str(tmp_path)))


def test_non_run_parquet_is_a_one_line_error(tmp_path):
    f = tmp_path / "plain.parquet"
    pd.DataFrame({"a": [1, 2]}).to_parquet(f)
    assert_one_line_error(run_cli("analysis.compare", str(f)))
    assert_one_line_error(run_cli("analysis.compare", str(tmp_path)))  # a folder of non-runs


def test_unknown_baseline_is_a_usage_error(tiny_run):
    r = run_cli("analysis.compare", str(tiny_run), "--baseline", "no-such-device")
    assert_one_line_error(r)
    assert r.returncode == 2 and "tiny-2t" in r.stderr


def test_missing_path_is_a_one_line_error(tmp_path):
    assert_one_line_error(run_cli("analysis.compare", str(tmp_path / "nope")))
