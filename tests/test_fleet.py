"""Fleet layout and engines: Hive-style run paths, recursive discovery, and the DuckDB engine giving
the pandas engine's table (forced either way on a small fleet with every fallback case in it)."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, run_cli, write_as_version_2

from analysis import compare, fleet, fleet_db, slope
from harness import store
from harness.errors import InputError, UsageError
from harness.record import SCHEMA_VERSION
from harness.store import META_KEY

WHEN = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def rewrite(src: Path, dst: Path, edit=None, ops_edit=None) -> Path:
    """A copy of a run with its metadata (and optionally its op table) edited in place by the callbacks."""
    t = pq.read_table(src)
    meta = json.loads(t.schema.metadata[META_KEY])
    if edit:
        edit(meta)
    if ops_edit:
        t = ops_edit(t)
    dst.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, META_KEY: json.dumps(meta).encode()}), dst)
    return dst


def _set(**kv):
    return lambda m: m.update(kv)


def _remeasured(n: int, **kv):
    """``_set`` on a copy that stands for another measurement (its timing differs): not a copy of the same run."""
    return lambda m: m.update(kv, timing={**m["timing"], "load_s": m["timing"]["load_s"] + n})


def _rename_stage(t):
    stage = t["stage"].to_pylist()
    return t.set_column(t.schema.get_field_index("stage"), "stage", [["mystery" if s == "norm" else s for s in stage]])


@pytest.fixture(scope="module")
def small_fleet(tiny_run, tiny_run_1t, tmp_path_factory) -> Path:
    """Hive and flat runs mixed: pooled repeats, two devices, the reference run (no tensor table), an
    incomplete run, a schema-2 run (upgraded on read) and a Parquet file that is not a run."""
    root = tmp_path_factory.mktemp("fleet")
    for n, (src, label) in enumerate(((tiny_run, "phone-a"), (tiny_run, "phone-a"), (tiny_run_1t, "phone-b"))):
        p = store.run_path(root, label, "tiny", "hive", WHEN)
        rewrite(src, p.with_name(f"{p.stem}-{n}.parquet"), _remeasured(n, label=label))
    rewrite(tiny_run, store.run_path(root, "phone-b", "tiny", "flat", WHEN), _set(label="phone-b", complete=False))
    write_as_version_2(tiny_run_1t, store.run_path(root, "old-phone", "tiny", "hive", WHEN), _set(label="old-phone"))
    shutil.copy(next((ROOT / "analysis" / "data").glob("*.parquet")), root / "reference.parquet")
    (root / "device=x").mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(root / "device=x" / "not-a-run.parquet")
    return root


def _compare(paths, engine: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = fleet.load_runs(paths, engine=engine)
    groups = fleet.group_runs(runs)
    df, sl, _ = compare.compare(groups, compare.choose_baseline(groups, None), engine=engine)
    return df, sl


def test_run_path_layouts(tmp_path):
    flat = store.run_path(tmp_path, "pixel 8/pro", "gemma-3n-E4B-it-Q4_K_M", "flat", WHEN)
    assert flat == tmp_path / "20260301T120000Z_pixel-8-pro_gemma-3n-E4B-it-Q4_K_M.parquet"
    hive = store.run_path(tmp_path, "pixel 8/pro", "gemma-3n-E4B-it-Q4_K_M", "hive", WHEN)
    assert hive == tmp_path / "device=pixel-8-pro" / "model=gemma-3n-E4B-it-Q4_K_M" / "20260301T120000Z.parquet"
    assert store.run_path(tmp_path, "a", "b").parent == tmp_path  # flat is the default
    with pytest.raises(UsageError, match="layout"):
        store.run_path(tmp_path, "a", "b", "nested")


def test_write_run_into_hive_layout(tiny_run, tmp_path):
    run = store.read_run(tiny_run)
    p = store.run_path(tmp_path, "dev", "tiny", "hive", WHEN)
    written = store.write_run(run.ops, run.record, p.parent, p.name)
    assert written == p and store.read_run(p).ops.columns.tolist() == run.ops.columns.tolist()  # no partition cols
    assert [r.label for r in fleet.load_runs([tmp_path])] == ["tiny-2t"]


def test_sweep_writes_the_hive_layout(tiny_gguf, tmp_path):
    r = run_cli("harness.sweep", "--model", str(tiny_gguf), "-c", "13", "-r", "1", "--warmup", "0", "--no-probe",
                "--label", "pixel 8", "--layout", "hive", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    (run,) = tmp_path.rglob("*.parquet")
    assert run.relative_to(tmp_path).parts[:2] == ("device=pixel-8", "model=tiny")
    assert [x.label for x in fleet.load_runs([tmp_path])] == ["pixel 8"]


def test_engines_give_the_same_table(small_fleet, caplog):
    with caplog.at_level(logging.WARNING):
        pdf, psl = _compare([small_fleet], "pandas")
        ddf, dsl = _compare([small_fleet], "duckdb")
    assert {"phone-a", "phone-b", "old-phone", "seed-reference"} <= set(pdf["device"])
    assert (pdf[pdf["device"] == "phone-a"]["runs"] == 2).all()  # hive repeats pooled
    assert pdf["group"].str.contains("INCOMPLETE").any()  # the flat incomplete run is found too
    old = pdf[pdf["device"] == "old-phone"]  # schema 2 (repeat/step for round): upgraded on read, slopes too
    assert len(old) == 3 and old["ffn_slope_ms_per_1k"].notna().all() and "old-phone" in set(psl["device"])
    pd.testing.assert_frame_equal(pdf, ddf, rtol=1e-9)
    pd.testing.assert_frame_equal(psl, dsl, rtol=1e-9)
    assert "not-a-run.parquet" in caplog.text  # skipped with a warning by both engines


def test_duckdb_footers_skip_the_bulk_and_defer_odd_files(small_fleet):
    files = sorted(small_fleet.rglob("*.parquet"))
    fast = dict(zip(files, fleet_db.read_footers(files), strict=True))
    slow = {f.relative_to(small_fleet).parts[0] for f, m in fast.items() if m is None}
    assert slow == {"device=old-phone", "device=x"}  # another schema version, not a run: read the pandas way
    good = [m for m in fast.values() if m is not None]
    assert len(good) == 5 and all("tokens" not in m and "gguf" not in m["model"] for m in good)
    assert all(m["schema_version"] == SCHEMA_VERSION and m["contexts"] for m in good)
    full = json.loads(pq.read_schema(files[0]).metadata[META_KEY])
    dropped = {"stage_ms_ci", "stage_ms_calibrated_ci", "plain_ms_ci", "overhead_ratio_ci", "sync_us_ci",
               "mode_diff_pp_ci", "sensors_before", "sensors_after"}

    def context(c: dict) -> dict:
        kept = {k: v for k, v in c.items() if k not in dropped}
        if c.get("graph_bytes"):
            kept["graph_bytes"] = {k: v for k, v in c["graph_bytes"].items()
                                   if k not in {"kv_reads", "layer_weight", "layer_kv", "act"}}
        return kept
    assert fast[files[0]] == {**{k: v for k, v in full.items() if k not in ("tokens", "rounds", "calibration_stages")},
                              "model": {k: v for k, v in full["model"].items() if k != "gguf"},
                              "contexts": [context(c) for c in full["contexts"]]}
    assert full["rounds"] and full["calibration_stages"]
    assert all(c["stage_ms_ci"] and c["graph_bytes"]["kv_reads"] for c in full["contexts"])


def test_duckdb_leaves_older_op_tables_to_the_upgrading_reader(small_fleet):
    files = sorted(map(str, small_fleet.rglob("*.parquet")))
    runs = [f for f in files if "not-a-run" not in f]
    fast, rest = fleet_db.round_sums(runs)
    assert [Path(runs[i]).relative_to(small_fleet).parts[0] for i in rest] == ["device=old-phone"]
    assert set(fast[slope.RUN]) == set(range(len(runs))) - set(rest)  # indices into runs, not into the query
    both = fleet.round_sums(runs, "duckdb")
    assert set(both[slope.RUN]) == set(range(len(runs)))
    key = [slope.RUN, "context", "round", "stage"]
    pd.testing.assert_frame_equal(both.sort_values(key, ignore_index=True),
                                  fleet.round_sums(runs, "pandas").sort_values(key, ignore_index=True),
                                  rtol=1e-9, check_dtype=False)


@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_bad_times_are_left_to_the_checked_reader_by_both_engines(value, tiny_run, tiny_run_1t, tmp_path, caplog):
    """An op time below 0 or NaN: DuckDB's sums do not vouch for the run; the checked reader says what is wrong
    (a warning for a run found in a folder, an error for a named one) with either engine."""
    bad = rewrite(tiny_run, tmp_path / "bad.parquet", ops_edit=lambda t: t.set_column(  # the first op time
        t.schema.get_field_index("time_us"), "time_us", [[value, *t["time_us"].to_pylist()[1:]]]))
    paths = [str(tiny_run_1t), str(bad)]
    assert fleet_db.round_sums(paths)[1] == [1]
    for engine in ("pandas", "duckdb"):
        with caplog.at_level(logging.WARNING):
            long = fleet.round_sums(paths, engine)
        assert set(long[slope.RUN]) == {0} and "no op table for slopes" in caplog.text and "bad.parquet" in caplog.text
        with pytest.raises(InputError, match="time_us.*bad.parquet"):
            fleet.round_sums(paths, engine, named=[str(bad)])


def test_hidden_folders_are_not_searched(tiny_run, tiny_run_1t, tmp_path):
    d = tmp_path / "runs"
    rewrite(tiny_run, d / "a.parquet")
    rewrite(tiny_run_1t, d / ".seed-tmp-abc" / "b.parquet")  # another tool's hidden work folder
    rewrite(tiny_run_1t, d / "sub" / ".c.parquet")
    for engine in ("pandas", "duckdb"):
        assert [Path(r.path).name for r in fleet.load_runs([d], engine=engine)] == ["a.parquet"]
    assert len(fleet.load_runs([d / ".seed-tmp-abc" / "b.parquet"])) == 1  # named: read
    assert len(fleet.load_runs([d / ".seed-tmp-abc"])) == 1  # only what lies below the folder given counts


def _interrupted(run: store.Run, rounds: int, out: Path, name: str, resumed_from: str | None = None, **kv) -> Path:
    """A run as --resume leaves them: its first ``rounds`` rounds, incomplete, naming the run it continued."""
    rec = run.record.replace(complete=False, stop_reason="SIGINT", resumed_from=resumed_from,
                             rounds=run.record.rounds[:rounds],
                             tokens=tuple(t for t in run.record.tokens if t[2] < rounds), **kv)
    return store.write_run(run.ops[run.ops["round"] < rounds], rec, out, name)


@pytest.mark.parametrize("engine", ["pandas", "duckdb"])
def test_copies_and_resumed_runs_are_read_once(engine, tiny_run, tmp_path, monkeypatch, caplog):
    run = store.read_run(tiny_run)
    d, other, copies = tmp_path / "runs", tmp_path / "other", tmp_path / "copies"
    monkeypatch.chdir(tmp_path)  # --resume names the run as it was given: here a relative path
    a = _interrupted(run, 2, d, "20260101T000000Z_a.parquet")
    b = _interrupted(run, 4, d, "20260101T001000Z_b.parquet", str(a.relative_to(tmp_path)))
    c = _interrupted(run, 5, d, "20260101T002000Z_c.parquet", str(b))  # interrupted twice
    x = _interrupted(run, 3, d / "loop", "x.parquet", "y.parquet")  # two runs naming each other: both kept
    y = _interrupted(run, 3, d / "loop", "y.parquet", "x.parquet")
    elsewhere = _interrupted(run, 2, other, a.name, label="another-device")  # a's name, not its device
    copies.mkdir()
    shutil.copy(c, copies / "c-copy.parquet")
    with caplog.at_level(logging.INFO):
        runs = fleet.load_runs([d, other, copies], engine=engine)
    assert sorted(Path(r.path).name for r in runs) == sorted([c.name, x.name, y.name, elsewhere.name])
    assert f"leaving out {a}: continued by {b}" in caplog.text and f"leaving out {b}: continued by {c}" in caplog.text
    assert f"skipping {copies / 'c-copy.parquet'}: a copy of {c}" in caplog.text
    group = next(g for g in fleet.group_runs(runs) if g.label == run.record.label and len(g.runs) == 3)
    assert {Path(r.path).name for r in group.runs} == {c.name, x.name, y.name}
    named = fleet.load_runs([copies / "c-copy.parquet", d], engine=engine)  # the copy named first is the one kept
    assert str(copies / "c-copy.parquet") in {r.path for r in named} and str(c) not in {r.path for r in named}
    shutil.copy(a, other / "0-a-backup.parquet")  # a renamed copy of a, found before a: still continued by b
    kept = fleet.load_runs([other, d], engine=engine)
    assert not {a.name, "0-a-backup.parquet"} & {Path(r.path).name for r in kept if r.label != "another-device"}


def test_duckdb_falls_back_on_a_corrupt_file(small_fleet, tiny_run, tmp_path, caplog):
    d = tmp_path / "fleet"
    shutil.copytree(small_fleet, d)
    bad = d / "device=phone-a" / "truncated.parquet"
    shutil.copy(tiny_run, bad)
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        ddf, dsl = _compare([d], "duckdb")
    assert "DuckDB could not read the fleet" in caplog.text and "truncated.parquet" in caplog.text
    pdf, psl = _compare([small_fleet], "pandas")
    pd.testing.assert_frame_equal(pdf, ddf, rtol=1e-9)
    pd.testing.assert_frame_equal(psl, dsl, rtol=1e-9)


def test_unknown_stage_is_read_by_both_engines(tiny_run, tiny_run_1t, tmp_path):
    rewrite(tiny_run, tmp_path / "a.parquet", ops_edit=_rename_stage)
    shutil.copy(tiny_run_1t, tmp_path / "b.parquet")
    paths = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    key = [slope.RUN, "context", "round", "stage"]
    fast = fleet.round_sums(paths, "duckdb").sort_values(key, ignore_index=True)
    slow = fleet.round_sums(paths, "pandas").sort_values(key, ignore_index=True)
    assert "mystery" in set(fast["stage"]) and "norm" in set(fast["stage"])
    pd.testing.assert_frame_equal(fast, slow, rtol=1e-9, check_dtype=False)
    assert "mystery" in set(_compare([tmp_path], "duckdb")[1]["stage"])


def test_group_slopes_are_lines_through_each_depths_mean(tiny_run, tiny_run_1t):
    """The pooled slope is the least-squares line through each depth's mean stage ms (mean over a group's
    runs): checked against numpy's polyfit on the same means."""
    long = fleet.round_sums([str(tiny_run), str(tiny_run_1t)])
    fit = slope.long_slopes(long, np.array([5, 5]), n_boot=50).set_index("stage")
    per_run = long.groupby([slope.RUN, "depth", "round", "stage"])["ms"].sum().unstack(fill_value=0.0)
    means = per_run.groupby([slope.RUN, "depth"]).mean().groupby("depth").mean()
    for st in ("ffn", "attn_kv"):
        want = np.polyfit(means.index.to_numpy(float), means[st].to_numpy(), 1)[0] * 1000
        assert fit.loc[st, "slope_ms_per_1k"] == pytest.approx(want, rel=1e-9)
        assert fit.loc[st, "ci95_low_ms_per_1k"] < fit.loc[st, "ci95_high_ms_per_1k"]
    assert set(fit["group"]) == {5} and (fit["n_depths"] == 3).all()


def test_auto_engine_threshold():
    m = fleet.DUCKDB_MIN_RUNS
    assert [fleet.resolve_engine(e, n) for e, n in (("auto", m - 1), ("auto", m), ("pandas", 10**6))] == [
        "pandas", "duckdb", "pandas"]
    with pytest.raises(UsageError):
        fleet.resolve_engine("spark", 1)


def test_compare_cli_engine_flag(small_fleet):
    out = {}
    for engine in ("pandas", "duckdb"):
        r = run_cli("analysis.compare", str(small_fleet), "--engine", engine, "--format", "csv")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        out[engine] = pd.read_csv(io.StringIO(r.stdout))
    pd.testing.assert_frame_equal(out["pandas"], out["duckdb"], rtol=1e-6)
    r = run_cli("analysis.compare", str(small_fleet), "--engine", "spark")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_readme_duckdb_queries_run_on_a_hive_fleet(small_fleet, tmp_path, monkeypatch):
    """Every ```sql block of the README that starts with '-- DuckDB' runs, as written, next to a Hive fleet in runs/."""
    for f in small_fleet.glob("device=phone-*/model=*/*.parquet"):
        dst = tmp_path / "runs" / f.relative_to(small_fleet)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```sql\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    duck = [b for b in blocks if b.startswith("-- DuckDB")]
    assert len(duck) >= 3 and any(b.startswith("-- Spark SQL") for b in blocks)
    con = duckdb.connect()
    for sql in duck:
        for stmt in filter(str.strip, sql.split(";")):
            df = con.execute(stmt).df()
        if "device" in df.columns:
            assert {"phone-a", "phone-b"} <= set(df["device"]), (sql, df)
    assert len(pq.read_table(tmp_path / "footers.parquet")) == 3  # the footer export for Spark
