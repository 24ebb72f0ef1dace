"""The typed run record: validation on read names the bad field, every command refuses such a run cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from harness import store
from harness.errors import InputError
from harness.record import ContextSummary, SweepParams
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
