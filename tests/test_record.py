"""The typed run record: validation on read names the bad field, every command refuses such a run cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli, write_as_version_2

from harness import store
from harness.errors import InputError
from harness.record import ContextSummary, SweepParams
from harness.store import read_record, read_run
from harness.typed import RecordError


def _edit(src: Path, dst: Path, edit) -> Path:
    t = pq.read_table(src)
    meta = json.loads(t.schema.metadata[store.META_KEY])
    edit(meta)
    pq.write_table(t.replace_schema_metadata({store.META_KEY: json.dumps(meta).encode()}), dst)
    return dst


BAD = {  # valid JSON, right schema version, one field missing or mistyped
    "missing plain_ms": (lambda m: m["contexts"][1].pop("plain_ms"), "contexts[1].plain_ms: missing"),
    "threads as text": (lambda m: m["params"].__setitem__("threads", "two"), "params.threads: expected an integer"),
    "stage_ms not a map": (lambda m: m["contexts"][0].__setitem__("stage_ms", [1, 2]),
                           "contexts[0].stage_ms: expected an object"),
    "negative duration": (lambda m: m["contexts"][2]["stage_ms"].__setitem__("ffn", -3.0),
                          "contexts[2].stage_ms.ffn: a duration"),
    "no label": (lambda m: m.pop("label"), "field label: missing"),
    "token row short": (lambda m: m["tokens"][0].pop(), "tokens[0]: expected 6 items"),
}


@pytest.fixture(scope="module")
def bad_runs(tiny_run, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    return {k: _edit(tiny_run, d / f"{i}.parquet", e) for i, (k, (e, _)) in enumerate(BAD.items())}


@pytest.mark.parametrize("case", list(BAD))
def test_reading_names_the_field_and_the_file(bad_runs, case):
    with pytest.raises(InputError) as e:
        store.read_record(bad_runs[case])
    msg = str(e.value)
    assert BAD[case][1] in msg and str(bad_runs[case]) in msg and "\n" not in msg


@pytest.mark.parametrize("command", ["analysis.table", "analysis.plots", "analysis.compare", "resume"])
def test_every_command_refuses_a_mistyped_run(bad_runs, command, tmp_path):
    for case, path in bad_runs.items():
        if command == "resume":
            r = run_cli("harness.sweep", "--resume", str(path), "--out", str(tmp_path / "runs"))
        else:
            extra = ["-o", str(tmp_path / "figs")] if command == "analysis.plots" else []
            r = run_cli(command, str(path), *extra)
        prog = "harness.sweep" if command == "resume" else command
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1, (case, r.returncode, r.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: bad run metadata"), (case, r.stderr)
        assert BAD[case][1].split(":")[0] in lines[0] and "Traceback" not in r.stderr
        assert r.stdout == ""
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_notebook_loader_refuses_a_mistyped_run(bad_runs):
    from analysis import table  # what the notebook's first cell calls

    with pytest.raises(InputError, match=r"contexts\[1\]\.plain_ms: missing"):
        table.load(bad_runs["missing plain_ms"])


def test_typed_checks():
    good = {"label": "a", "depth": 3}
    from harness.record import ContextSpec

    assert ContextSpec.from_dict(good) == ContextSpec("a", 3)
    with pytest.raises(RecordError, match="depth: expected an integer"):
        ContextSpec.from_dict({"label": "a", "depth": 3.5})
    with pytest.raises(RecordError, match="depth: expected an integer"):
        ContextSpec.from_dict({"label": "a", "depth": True})  # a bool is not an int here
    with pytest.raises(RecordError, match="label: expected str"):
        ContextSpec.from_dict({"label": 7, "depth": 3})
    c = ContextSummary(context="x", depth=1, timed_tokens=2, plain_ms=3, profiled_ms=3.1, stage_ms={"ffn": 2},
                       stage_pct={"ffn": 64.5}, covered_pct=99, attributed_pct=100, plain_ms_ci=(2.5, 3.5))
    d = c.to_dict()
    assert d["plain_ms_ci"] == [2.5, 3.5] and ContextSummary.from_dict(d) == c  # lists back to tuples
    with pytest.raises(RecordError, match=r"plain_ms_ci: expected 2 items"):
        ContextSummary.from_dict({**d, "plain_ms_ci": [1.0]})
    assert ContextSummary.from_dict({**d, "plain_ms_ci": None}).plain_ms_ci is None  # optional
    with pytest.raises(RecordError, match="stage_ms.ffn: a duration"):
        ContextSummary.from_dict({**d, "stage_ms": {"ffn": float("nan")}})
    with pytest.raises(RecordError, match="contexts: missing"):
        SweepParams.from_dict({"rounds": 1})


# ---------------------------------------------------------------- format versions
def test_newer_schema_and_non_runs_are_refused(tiny_run, tiny_gguf, tmp_path):
    import json

    import pyarrow.parquet as pq

    t = pq.read_table(tiny_run)
    meta = json.loads(t.schema.metadata[store.META_KEY])
    meta["schema_version"] = 99
    pq.write_table(t.replace_schema_metadata({store.META_KEY: json.dumps(meta).encode()}), tmp_path / "new.parquet")
    with pytest.raises(store.InputError, match="newer"):
        read_record(tmp_path / "new.parquet")
    pq.write_table(t.replace_schema_metadata({}), tmp_path / "plain.parquet")
    with pytest.raises(store.InputError, match="not a harness run"):
        read_record(tmp_path / "plain.parquet")
    with pytest.raises(store.InputError, match="not a Parquet run"):
        read_record(tiny_gguf)
    (tmp_path / "cut.parquet").write_bytes(tiny_run.read_bytes()[:1000])
    with pytest.raises(store.InputError):
        read_record(tmp_path / "cut.parquet")
    r = run_cli("harness.sweep", "--model", str(tiny_run), "--no-probe", "--out", str(tmp_path))
    assert r.returncode == 1 and "bad magic" in r.stderr and "Traceback" not in r.stderr


def test_older_schema_is_upgraded_on_read(tiny_run, tmp_path):
    import json

    import pyarrow.parquet as pq

    v2 = write_as_version_2(tiny_run, tmp_path / "v2.parquet")
    up = read_run(tmp_path / "v2.parquet")
    assert up.record.params.order == "sequential" and up.record.params.rounds == 6
    assert sorted(set(up.ops["round"])) == list(range(6))
    assert list(up.ops.columns) == list(read_run(tiny_run).ops.columns)
    assert sorted(set(up.tokens["round"])) == list(range(6))
    assert up.record.contexts[0].plain_ms_ci is None and up.record.contexts[0].stage_ms == v2["contexts"][0]["stage_ms"]
    assert up.record.contexts[0].sync_us_estimator == "per segment"  # no calibration tokens then
    inv = up.record.invariants  # the check version 3 added, on the contexts' means; the flags it implies
    assert inv.estimator == "mean" and inv.across_depths and "synthetic" in {f.kind for f in up.record.flags}
    assert ("drift" in {f.kind for f in up.record.flags}) == (inv.max_disagreement_pct > inv.threshold_pct)
    # a version-1 file: no calibration fields yet
    t = pq.read_table(tmp_path / "v2.parquet")
    v1 = {**v2, "schema_version": 1, "params": {k: v for k, v in v2["params"].items() if k != "callback"}}
    v1["contexts"] = [{k: v for k, v in c.items() if k not in ("sync_us", "noop_sync_us", "stage_ms_calibrated",
                                                                "stage_pct_calibrated")} for c in v2["contexts"]]
    pq.write_table(t.replace_schema_metadata({store.META_KEY: json.dumps(v1).encode()}), tmp_path / "v1.parquet")
    rec = read_record(tmp_path / "v1.parquet")
    assert rec.params.callback == "python" and rec.contexts[0].sync_us is None
    assert not rec.calibrated and rec.contexts[0].stage_ms_calibrated == {}  # not raw figures under calibrated names
    assert rec.contexts[0].stage("ffn") == rec.contexts[0].stage_ms["ffn"]  # readers fall back to the raw figures


def test_metadata_is_validated_on_write(tiny_run, tmp_path):
    run = read_run(tiny_run)
    c0 = run.record.contexts[0]
    bad = run.record.replace(contexts=(c0.replace(plain_ms=float("nan")),))
    with pytest.raises(ValueError, match="contexts.0..plain_ms"):
        store.write_run(run.ops, bad, tmp_path, "x.parquet")
    bad = run.record.replace(contexts=(c0.replace(stage_ms={"ffn": -1.0}),))
    with pytest.raises(ValueError, match="stage_ms.ffn"):
        store.write_run(run.ops, bad, tmp_path, "x.parquet")
    assert not list(tmp_path.iterdir())


OLD_BAD = {  # a damaged version-1 or -2 footer: a one-line error naming the field, never an upgrade's crash
    "v1 params text": (1, lambda m: m.__setitem__("params", "oops"), "field params: expected an object"),
    "v2 params text": (2, lambda m: m.__setitem__("params", "oops"), "field params: expected an object"),
    "v1 contexts int": (1, lambda m: m.__setitem__("contexts", 5), "field contexts: expected a list"),
    "v2 context text": (2, lambda m: m.__setitem__("contexts", ["a"]), r"field contexts[0]: expected an object"),
    "v2 tokens map": (2, lambda m: m.__setitem__("tokens", {"a": 1}), "field tokens: expected a list"),
    "v2 no contexts": (2, lambda m: m.__setitem__("contexts", []), "field contexts: empty"),  # readers index them
    "v1 stage_ms list": (1, lambda m: [c.pop("stage_ms_calibrated") for c in m["contexts"]]
                         + [m["contexts"][0].__setitem__("stage_ms", [1, 2])], "field contexts[0].stage_ms"),
}


@pytest.fixture(scope="module")
def old_bad_runs(tiny_run, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("oldbad")
    out = {}
    for i, (case, (version, edit, _)) in enumerate(OLD_BAD.items()):
        def damage(m, version=version, edit=edit):
            edit(m)
            m["schema_version"] = version
        out[case] = d / f"{i}.parquet"
        write_as_version_2(tiny_run, out[case], damage)
    return out


@pytest.mark.parametrize("case", list(OLD_BAD))
def test_damaged_old_runs_are_refused_in_one_line(old_bad_runs, case):
    with pytest.raises(InputError) as e:
        read_record(old_bad_runs[case])
    msg = str(e.value)
    assert OLD_BAD[case][2] in msg and str(old_bad_runs[case]) in msg and "\n" not in msg


def test_damaged_old_runs_cli_and_folder_scan(old_bad_runs, tiny_run, tmp_path, caplog):
    from analysis import fleet

    r = run_cli("analysis.table", str(old_bad_runs["v1 params text"]))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"analysis.table: error: bad run metadata, field params: expected an "
                                             f"object, got str: {old_bad_runs['v1 params text']}"]
    folder = tmp_path / "runs"
    folder.mkdir()
    for i, p in enumerate(old_bad_runs.values()):
        (folder / f"bad{i}.parquet").write_bytes(p.read_bytes())
    (folder / tiny_run.name).write_bytes(tiny_run.read_bytes())
    runs = fleet.load_runs([folder], engine="pandas")
    assert [Path(r.path).name for r in runs] == [tiny_run.name]  # the damaged ones skipped with a warning
    assert all(f"bad{i}.parquet" in caplog.text for i in range(len(OLD_BAD)))


def _edit_table(src: Path, dst: Path, name: str, values) -> Path:
    t = pq.read_table(src)
    t = t.set_column(t.schema.get_field_index(name), name, pa.array(values(t.column(name).to_pylist())))
    pq.write_table(t, dst)  # the footer (harness.run) is kept: only the op table is damaged
    return dst


BAD_TABLES = {  # column, new values (from the old ones), what the error says
    "time as text": ("time_us", lambda v: [str(x) for x in v], "column time_us holds string, expected number"),
    "context as int": ("context", lambda v: [7] * len(v), "column context holds int64, expected text"),
    "depth as text": ("depth", lambda v: [str(x) for x in v], "column depth holds string, expected integer"),
    "null round": ("round", lambda v: pa.array([None] * len(v), pa.int64()), "column round has empty (null) values"),
    "null stage": ("stage", lambda v: [None, *v[1:]], "column stage has empty (null) values"),
    "negative time": ("time_us", lambda v: [-x for x in v], "column time_us has negative, NaN or infinite"),
    "NaN time": ("time_us", lambda v: [*v[:-1], float("nan")], "column time_us has negative, NaN or infinite"),
    "inf time": ("time_us", lambda v: [float("inf"), *v[1:]], "column time_us has negative, NaN or infinite"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_damaged_op_tables_are_refused(tiny_run, tmp_path, case):
    from analysis import slope

    name, values, needle = BAD_TABLES[case]
    bad = _edit_table(tiny_run, tmp_path / "bad.parquet", name, values)
    read_record(bad)  # the footer is fine
    for only in (None, slope.NEEDED_COLUMNS):
        with pytest.raises(InputError) as e:
            read_run(bad, only=only)
        assert needle in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value)
    r = run_cli("analysis.table", str(bad))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("analysis.table: error: run table"), r.stderr
    assert needle in lines[0] and str(bad) in lines[0] and "Traceback" not in r.stderr
    assert read_run(bad, only=["node", "op"]).ops.shape[1] == 2  # only the columns read are checked


def test_old_op_tables_are_checked_too(tiny_run, tmp_path):
    """A version-2 table stores repeat and step (round is made from them): their types are checked."""
    write_as_version_2(tiny_run, tmp_path / "v2.parquet")
    bad = _edit_table(tmp_path / "v2.parquet", tmp_path / "bad.parquet", "step", lambda v: [str(x) for x in v])
    with pytest.raises(InputError, match="column step holds string, expected integer"):
        read_run(bad, only=["round", "time_us"])


def test_only_the_current_schema_version_is_written(tiny_run, tmp_path):
    run = read_run(tiny_run)
    for v in (2, 4):
        with pytest.raises(ValueError, match=f"schema version {v}: this harness writes version 3"):
            store.write_run(run.ops, run.record.replace(schema_version=v), tmp_path / "out", "x.parquet")
    with pytest.raises(ValueError, match="infinite op times"):
        store.write_run(run.ops.assign(time_us=float("inf")), run.record, tmp_path / "out", "x.parquet")
    assert not (tmp_path / "out").exists()  # refused before the folder is made


def test_infinite_measured_values_are_refused_nan_intervals_kept(tiny_run, tmp_path):
    c0 = read_record(tiny_run).contexts[0].to_dict()
    nan = float("nan")
    kept = ContextSummary.from_dict({**c0, "plain_ms_ci": [nan, nan], "stage_ms_ci": {"ffn": [nan, nan]}})
    assert kept.plain_ms_ci[0] != kept.plain_ms_ci[0]  # an interval no resample filled stays NaN
    for where, change in (("plain_ms", {"plain_ms": float("inf")}),
                          (r"plain_ms_ci\[0\]", {"plain_ms_ci": [float("-inf"), 1.0]}),
                          (r"stage_ms_ci.ffn\[1\]", {"stage_ms_ci": {"ffn": [0.0, float("inf")]}}),
                          ("stage_pct.ffn", {"stage_pct": {"ffn": float("inf")}})):
        with pytest.raises(RecordError, match=f"{where}: a measured value or its interval must be finite"):
            ContextSummary.from_dict({**c0, **change})
    bad = _edit(tiny_run, tmp_path / "inf.parquet", lambda m: m["contexts"][0].__setitem__("plain_ms", float("inf")))
    with pytest.raises(InputError, match=r"contexts\[0\]\.plain_ms: a measured value .* must be finite"):
        read_record(bad)


def test_resuming_a_run_from_before_round_robin_is_refused(tiny_run, tmp_path):
    old = tmp_path / "old.parquet"
    write_as_version_2(tiny_run, old, lambda m: m.update(complete=False, stop_reason="SIGINT"))
    assert read_record(old).params.order == "sequential"
    r = run_cli("harness.sweep", "--resume", str(old), "--out", str(tmp_path / "runs"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"harness.sweep: error: run predates round-robin measurement (order "
                                             f"'sequential') and cannot be resumed; start a new run: {old}"]
    assert not (tmp_path / "runs").exists()
