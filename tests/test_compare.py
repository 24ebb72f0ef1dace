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
from conftest import ROOT, run_cli, write_as_version_2

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
def _rounds(slope_per_tok: float, drift_sd: float, noise_sd: float, n_rounds: int = 30, seed: int = 1):
    """Synthetic RoundData: ffn flat at 60 ms, attn_kv = 1 + slope x depth; every round shifts all depths by the
    same drift (a device changing clocks), plus independent per-token noise."""
    from harness import stages, stats

    rng = np.random.default_rng(seed)
    depths = (100, 400, 900)
    drift = rng.normal(0, drift_sd, (n_rounds, 1))
    st = np.zeros((n_rounds, 3, len(stages.STAGES)))
    st[:, :, stats.S["ffn"]] = 60 + drift + rng.normal(0, noise_sd, (n_rounds, 3))
    st[:, :, stats.S["attn_kv"]] = 1 + slope_per_tok * np.array(depths) + rng.normal(0, noise_sd, (n_rounds, 3))
    plain = st.sum(axis=2)
    return stats.RoundData(labels=tuple(map(str, depths)), depths=depths, rounds=np.arange(n_rounds), plain=plain,
                           profiled=plain, stage=st, segs=np.zeros((3, len(stages.STAGES))),
                           calib_delta=np.full(n_rounds, np.nan), calib_extra=np.zeros(n_rounds))


def _fit(rds, n_boot):
    from harness.stages import STAGES

    return slope.pooled_slopes([slope.round_data_sample(r) for r in rds], [*STAGES, slope.DECODE], n_boot)


def test_slopes_recover_a_line_and_pairing_removes_drift():
    sl = _fit([_rounds(0.003, drift_sd=5.0, noise_sd=0.05)], 500)
    kv, ffn = sl.loc["attn_kv"], sl.loc["ffn"]
    assert kv["ci95_low_ms_per_1k"] < 3.0 < kv["ci95_high_ms_per_1k"]
    assert kv["slope_ms_per_1k"] == pytest.approx(3.0, abs=0.2)
    # ffn carries +-5 ms of drift per round, common to all depths: paired by round it cancels, so the interval
    # stays narrow (an unpaired, per-token fit would see a +-5 ms scatter: an interval ~100x wider)
    assert ffn["ci95_high_ms_per_1k"] - ffn["ci95_low_ms_per_1k"] < 0.2
    covered = [_fit([_rounds(0.003, 5.0, 0.05, seed=k)], 200).loc["ffn"] for k in range(20)]
    assert sum(f["ci95_low_ms_per_1k"] < 0 < f["ci95_high_ms_per_1k"] for f in covered) >= 16  # ~95 % coverage
    assert (kv["n_rounds"], kv["n_depths"]) == (30, 3)
    one = _rounds(0.003, 0, 0.05)
    one = one.__class__(**{**one.__dict__, "depths": (100, 100, 100)})
    assert np.isnan(_fit([one], 50).loc["attn_kv", "slope_ms_per_1k"])


def test_pooled_runs_are_stratified():
    a, b = _rounds(0.003, 1.0, 0.05, seed=1), _rounds(0.003, 1.0, 0.05, seed=2)
    both = _fit([a, b], 300).loc["attn_kv"]
    assert both["n_rounds"] == 60 and both["ci95_low_ms_per_1k"] < 3.0 < both["ci95_high_ms_per_1k"]


def _keep(rd, idx):
    """The same rounds at the depths ``idx`` only (a run made with fewer contexts)."""
    return rd.__class__(**{**rd.__dict__, "labels": tuple(rd.labels[i] for i in idx),
                           "depths": tuple(rd.depths[i] for i in idx), "plain": rd.plain[:, idx],
                           "profiled": rd.profiled[:, idx], "stage": rd.stage[:, idx], "segs": rd.segs[idx]})


def test_pooled_runs_at_different_depths_and_levels_make_no_slope_of_their_levels():
    from harness import stats

    a, b = _rounds(0.003, 0.0, 0.05, seed=1), _rounds(0.003, 0.0, 0.05, seed=2)
    b.stage[:, :, stats.S["ffn"]] += 6.0  # b's device is 10 % slower in ffn, and b measured only 100 and 900
    b = _keep(b.__class__(**{**b.__dict__, "plain": b.stage.sum(axis=2)}), [0, 2])
    sl = _fit([a, b], 300)
    ffn, kv = sl.loc["ffn"], sl.loc["attn_kv"]
    # a mean over whichever runs measured a depth would read b's level as +6 ms at 100 and 900 only: a V, no line;
    # pooled within runs the flat stage stays flat and the line keeps its slope
    assert ffn["ci95_low_ms_per_1k"] < 0 < ffn["ci95_high_ms_per_1k"] and abs(ffn["slope_ms_per_1k"]) < 0.2
    assert kv["slope_ms_per_1k"] == pytest.approx(3.0, abs=0.1) and kv["n_depths"] == 3 and kv["n_rounds"] == 60
    assert ffn["intercept_ms"] == pytest.approx(63.0, abs=0.2)  # at the two runs' mean level
    same = _fit([a, _rounds(0.003, 0.0, 0.05, seed=2)], 0)  # one set of depths: the line through the pooled means
    means = np.mean([r.stage[:, :, stats.S["attn_kv"]].mean(axis=0) for r in (a, _rounds(0.003, 0.0, 0.05, seed=2))],
                    axis=0)
    assert same.loc["attn_kv", "slope_ms_per_1k"] == pytest.approx(1000 * np.polyfit((100, 400, 900), means, 1)[0])


def test_a_depth_few_resamples_draw_is_left_out_not_read_as_zero():
    rd = _rounds(0.003, 0.0, 0.05, n_rounds=40)
    rd.stage[2:, 2, :] = np.nan  # the deepest depth has 2 valid rounds of 40: ~13 % of resamples draw neither
    rd.plain[2:, 2] = np.nan
    kv = _fit([rd], 500).loc["attn_kv"]
    assert kv["ci95_low_ms_per_1k"] > 2.5, kv  # a resample without that depth fits the other two, not a 0 there
    assert kv["slope_ms_per_1k"] == pytest.approx(3.0, abs=0.2)


def test_run_slopes_on_a_real_run(tiny_run):
    run = read_run(tiny_run, only=slope.NEEDED_COLUMNS)
    s = slope.run_slopes(run, n_boot=200)
    assert list(s.columns) == slope.SLOPE_COLUMNS
    assert {"ffn", "attn_kv", slope.DECODE} <= set(s.index)
    assert (s["n_rounds"] == len(run.record.rounds)).all() and (s["n_depths"] == 3).all()
    assert (s["ci95_low_ms_per_1k"] <= s["ci95_high_ms_per_1k"]).all()
    # the invariant stages' joint (99 %) interval holds the 95 % one, from the same resamples
    assert (s["joint_low_ms_per_1k"] <= s["ci95_low_ms_per_1k"]).all()
    assert (s["joint_high_ms_per_1k"] >= s["ci95_high_ms_per_1k"]).all()
    inv = s.loc[list(slope.checks.INVARIANT_STAGES)]
    assert (inv["joint_low_ms_per_1k"] < inv["joint_high_ms_per_1k"]).all()


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
    copy_run(tiny_run, d / "repeat.parquet", timing={"load_s": 99.0})  # another measurement, same settings: pooled
    copy_run(tiny_run, d / "sub" / "other-model.parquet", model={"content_hash": "sha256s:0000feed"})
    copy_run(tiny_run, d / "sub" / "fa-on.parquet", params={"flash_attn": "on"})
    copy_run(tiny_run, d / "sub" / "partial.parquet", complete=False)
    shutil.copy(tiny_run, d / "sub" / "copy.parquet")  # the same run found again: read once, not pooled
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


def test_labels_without_label_and_hostname(tiny_run):
    from harness.record import DeviceMeta
    from harness.store import read_record

    rec = read_record(tiny_run).replace(label="", device=DeviceMeta(cpu_model="Cortex-X3", physical_cores=8,
                                                                     hostname="phone1"))
    assert fleet.device_label(rec) == "Cortex-X3 8c"
    assert fleet.device_label(rec, with_hostname=True) == "Cortex-X3 8c @phone1"
    assert fleet.device_label(rec.replace(label="Cortex-X3 8c"), with_hostname=True) == "Cortex-X3 8c @phone1"
    assert fleet.device_label(rec.replace(label="pixel"), with_hostname=True) == "pixel"


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


def test_a_named_run_whose_op_table_is_bad_is_an_error_a_found_one_a_warning(tiny_run, tiny_run_1t, tmp_path):
    """Footers that read, op tables that do not: damaged data pages, no stage column, times stored as text."""
    data, t = bytearray(tiny_run.read_bytes()), pq.read_table(tiny_run)
    data[100:5000] = bytes(b ^ 0x5A for b in data[100:5000])
    (tmp_path / "pages.parquet").write_bytes(bytes(data))
    pq.write_table(t.drop_columns(["stage"]), tmp_path / "nostage.parquet")
    pq.write_table(t.set_column(t.schema.get_field_index("time_us"), "time_us", t["time_us"].cast("string")),
                   tmp_path / "texttime.parquet")
    for bad in (tmp_path / f"{n}.parquet" for n in ("pages", "nostage", "texttime")):
        r = run_cli("analysis.compare", str(bad), str(tiny_run_1t))
        assert_one_line_error(r)
        assert str(bad) in r.stderr, r.stderr
        (d := tmp_path / f"found-{bad.stem}").mkdir()
        for f in (bad, tiny_run_1t):
            shutil.copy(f, d / f.name)
        r = run_cli("analysis.compare", str(d), "--format", "csv")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "no op table for slopes: " in r.stderr and str(d / bad.name) in r.stderr
        sl = pd.read_csv(io.StringIO(r.stdout)).set_index("device")["ffn_slope_ms_per_1k"]
        assert sl["tiny-2t"].isna().all() and sl["tiny-1t"].notna().all()  # its table rows stay, without slopes


@pytest.mark.parametrize("engine", ["pandas", "duckdb"])
def test_an_old_format_run_gets_its_slopes(engine, tiny_run, tiny_run_1t, tmp_path):
    write_as_version_2(tiny_run_1t, tmp_path / "old.parquet")  # repeat/step in its op table, no round column
    df = compare_csv(str(tmp_path / "old.parquet"), str(tiny_run), "--engine", engine)
    assert set(df["device"]) == {"tiny-1t", "tiny-2t"} and df["attn_kv_slope_ms_per_1k"].notna().all()


def test_plot_that_cannot_be_written_is_a_one_line_error(tiny_run, tmp_path):
    (tmp_path / "compare_stage_ms.png").mkdir()  # a folder where a figure goes
    r = run_cli("analysis.compare", str(tiny_run), "--no-slopes", "--plots", str(tmp_path))
    assert_one_line_error(r)
    assert "could not write" in r.stderr and "compare_stage_ms.png" in r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_slope_table_marks_an_invariant_stage_whose_interval_excludes_zero():
    """format_md marks ffn (bytes independent of depth) whose joint (99 %) interval excludes 0, and says what the
    mark means; attn_kv's excludes 0 too but its work grows with depth: no mark; lm_head's 95 % interval excludes 0
    but its 99 % one does not (one of five invariant stages would by chance): no mark."""
    import pandas as pd

    from analysis.compare import format_md
    from analysis.slope import SLOPE_COLUMNS
    from harness.stages import STAGES

    sl = pd.DataFrame([["dev", "g", s, *v[:4], 40, 2, *v[4:]] for s, v in
                       {"ffn": (-0.2, -0.3, -0.1, 50.0, -0.35, -0.05), "attn_kv": (4.0, 3.9, 4.1, 0.5, 3.8, 4.2),
                        "lm_head": (0.1, 0.02, 0.18, 15.0, -0.01, 0.21)}.items()],
                      columns=["device", "group", "stage", *SLOPE_COLUMNS])
    df = pd.DataFrame(columns=["context", "depth", "device", "group", *(f"{s}_ms" for s in STAGES)])
    md = format_md(df, sl, [], "dev", 1)
    assert "-0.200 [-0.300, -0.100]!" in md and "4.000 [3.900, 4.100] |" in md and "0.100 [0.020, 0.180] |" in md
    assert "! a depth-invariant stage" in md
    clean = format_md(df, sl[sl.stage != "ffn"], [], "dev", 1)
    assert "!" not in clean.split("## slope")[1].replace("attn_kv = ffn", "")
