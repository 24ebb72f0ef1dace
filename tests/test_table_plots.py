"""analysis.table and analysis.plots: the seed table digit for digit, real runs, the shipped reference run
and bad input (as subprocesses: exit code, one line on stderr, no traceback)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from analysis import baseline, table
from analysis.readmodel import seed_model
from analysis.run_facts import agreement
from harness import store
from harness.errors import OutputError
from harness.record import SCHEMA_VERSION

REF = baseline.reference_run_path()

# the seed notebook's markdown table, copied verbatim
SEED_HEADER = ("| Context | Input tokens | KV-cache MB | FFN read/token MB | Attention read/token MB "
               "| Attention/FFN read ratio | Measured FFN % | Measured attention % |")
SEED_ROWS = (
    "| short | 13 | 0.89 | 1680.0 | 0.89 | 0.001 | 75.3 | 0.9 |",
    "| medium | 172 | 11.76 | 1680.0 | 11.76 | 0.007 | 68.0 | 6.7 |",
    "| long | 658 | 44.98 | 1680.0 | 44.98 | 0.027 | 49.1 | 28.9 |",
)


def test_reference_run_is_shipped_and_flagged():
    rec = store.read_record(REF)
    assert rec.schema_version == SCHEMA_VERSION
    assert rec.reference and not rec.synthetic and rec.label == "seed-reference"
    assert "original device" in rec.note
    by = {c.context: c for c in rec.contexts}
    assert by["short"].stage_pct["ffn"] == 75.3 and by["long"].stage_ms["attn_kv"] == 311.3
    assert by["medium"].plain_ms == 1103.8
    # the seed's FFN time falls 994 -> 529 ms across its contexts: the invariance check calls that drift
    assert rec.invariants.stage == "ffn" and rec.invariants.max_disagreement_pct > 50
    assert "drift" in {f.kind for f in rec.flags}


def test_reference_run_regenerates_identically(tmp_path):
    path = baseline.write_reference_run(tmp_path)
    new, shipped = store.read_run(path), store.read_run(REF)
    assert new.record == shipped.record
    pd.testing.assert_frame_equal(new.ops, shipped.ops)
    with pytest.raises(store.UsageError):
        baseline.write_reference_run(tmp_path)
    assert baseline.write_reference_run(tmp_path, replace=True) == path
    assert [p.name for p in tmp_path.iterdir()] == [baseline.REFERENCE_FILENAME]


def test_seed_table_digit_for_digit():
    r = run_cli("analysis.table", str(REF), "--model-variant", "seed")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| Context |"))
    assert lines[head].startswith(SEED_HEADER[:-1])
    assert lines[head + 1].startswith("|---|---:|---:|---:|---:|---:|---:|---:|")
    for got, want in zip(lines[head + 2:head + 5], SEED_ROWS, strict=True):
        assert got.startswith(want), (got, want)
    assert lines[head + 2].startswith(SEED_ROWS[0] + " 993.80 | 11.80 | 1372.10 |")
    assert "Reference run" in r.stdout and "1,855 MB" in r.stdout
    # auto picks the seed model for the reference run (it carries no tensor table)
    assert run_cli("analysis.table", str(REF)).stdout == r.stdout


def test_table_on_tiny_run(tiny_run):
    rec = store.read_record(tiny_run)
    df = table.build_table(rec, table.load_read_model(rec))
    assert list(df["input_tokens"]) == [13, 40, 80] and df["run_complete"].all()
    # default: calibrated stage figures, raw ones behind calibrated=False
    assert df["ffn_ms"].tolist() == [c.stage_ms_calibrated["ffn"] for c in rec.contexts]
    assert df["attn_ms"].tolist() == [c.stage_ms_calibrated["attn_kv"] for c in rec.contexts]
    assert df["decode_ms"].tolist() == [c.plain_ms for c in rec.contexts]
    raw = table.build_table(rec, table.load_read_model(rec), calibrated=False)
    assert raw["ffn_ms"].tolist() == [c.stage_ms["ffn"] for c in rec.contexts]
    assert (raw["ffn_ms"] >= df["ffn_ms"]).all() and (raw["ffn_ms"] > df["ffn_ms"]).any()
    assert df["roofline_ms"].isna().all()  # the fixture skips the bandwidth probe
    assert (df["ffn_gbps"] > 0).all() and (df["attn_read_mib"].diff().dropna() > 0).all()

    r = run_cli("analysis.table", str(tiny_run))
    assert r.returncode == 0, r.stderr
    assert "read model: exact" in r.stdout and "| 40 |" in r.stdout and "FLAG synthetic" in r.stdout
    assert f"Depth-invariant stages {agreement(store.read_record(tiny_run).invariants)} across depths" in r.stdout
    assert "not measured (no roofline)" in r.stdout

    r = run_cli("analysis.table", str(tiny_run), "--format", "csv", "--model-variant", "exact_padded")
    assert r.returncode == 0, r.stderr
    csv = pd.read_csv(io.StringIO(r.stdout))
    assert list(csv.columns[:3]) == ["context", "input_tokens", "kv_cache_mib"] and len(csv) == 3
    assert (csv["attn_read_mib"] >= df["attn_read_mib"]).all()


def test_table_exact_on_reference_run_with_model_file(tiny_gguf):
    r = run_cli("analysis.table", str(REF), "--model-variant", "exact", "--model", str(tiny_gguf))
    assert r.returncode == 0, r.stderr
    assert "read model: exact" in r.stdout


def test_incomplete_run_is_marked(tiny_run, tmp_path):
    run = store.read_run(tiny_run)
    path = store.write_run(run.ops, run.record.replace(complete=False), tmp_path, "partial.parquet")
    r = run_cli("analysis.table", str(path))
    assert r.returncode == 0 and "INCOMPLETE RUN" in r.stdout and "incomplete" in r.stderr
    csv = pd.read_csv(io.StringIO(run_cli("analysis.table", str(path), "--format", "csv").stdout))
    assert not csv["run_complete"].any()


def test_plots_on_tiny_run(tiny_run, tmp_path):
    r = run_cli("analysis.plots", str(tiny_run), "-o", str(tmp_path / "figs"))
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == sorted(f"{n}.{e}" for n in ("read_per_token", "stage_shares", "stage_ms", "roofline")
                           for e in ("png", "svg"))
    assert all((tmp_path / "figs" / n).stat().st_size > 1000 for n in names)


def test_an_uncalibrated_run_says_so_in_every_reader(tiny_run):
    """One rule (``RunRecord.calibrated``): shares are of the calibrated stage sum unless the run is not calibrated
    (``--calib-splits 0``, v1 runs); the sweep's summary, the table's header, the plot and compare's rows say which."""
    from analysis import compare, compare_plots, fleet, plots, table
    from harness.sweep import format_summary

    rec = store.read_record(tiny_run)
    raw = rec.replace(contexts=tuple(c.replace(stage_ms_calibrated={}, stage_pct_calibrated={}) for c in rec.contexts))
    assert rec.calibrated and not raw.calibrated and raw.contexts[0].sync_us is not None
    assert plots.plot_stage_shares(rec).axes[0].get_ylabel().startswith("% of calibrated stage sum")
    assert plots.plot_stage_shares(raw).axes[0].get_ylabel() == "% of profiled decode wall time"
    assert "stage ms are calibrated" in format_summary(rec) and "stage ms are raw" in format_summary(raw)
    assert "This run has no calibration: stage ms are raw (" in table.render(raw, table.load_read_model(raw))
    g = fleet.group_runs(fleet.load_runs([tiny_run]))[0]
    for c in (rec, raw):  # compare's rows flag the raw run; its share plot reads their typed column
        rows = compare.pooled_rows(replace(g, runs=tuple(replace(r, contexts=c.contexts) for r in g.runs)), "g", 0)
        assert all(("uncalibrated" in r["flags"]) == (c is raw) == (not r["calibrated"]) for r in rows)
        y = compare_plots.plot_stage_share(pd.DataFrame(rows)).axes[0].get_ylabel()
        assert y == ("% of stage sum (raw where uncalibrated)" if c is raw else "% of calibrated stage sum")


def test_plots_are_written_whole_or_not_at_all(tiny_run, tmp_path, monkeypatch):
    """A figure that cannot be written is one line; one that fails half-way (full disk, Ctrl-C) leaves the old file
    and no temp file: analysis.plots and analysis.compare's plots."""
    from matplotlib.figure import Figure

    from analysis import compare, compare_plots, fleet, plots

    figs = tmp_path / "figs"
    (figs / "stage_ms.png").mkdir(parents=True)  # a folder where a figure goes
    r = run_cli("analysis.plots", str(tiny_run), "-o", str(figs))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "could not write" in r.stderr and "stage_ms.png" in r.stderr
    assert not [p for p in figs.iterdir() if p.name.startswith(".")]

    run, model = table.load(str(tiny_run), "auto", None)
    groups = fleet.group_runs(fleet.load_runs([tiny_run]))
    rows = compare.compare(groups, groups[0].label, slopes=False)[0]
    writers = {"read_per_token.png": lambda d: plots.write_plots(run.record, model, d),
               "compare_stage_ms.png": lambda d: compare_plots.write_plots(rows, d)}
    for stop in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        def half(self, fname, stop=stop, **kw):
            with open(fname, "wb") as f:
                f.write(b"\x89PNG half")
            raise stop

        monkeypatch.setattr(Figure, "savefig", half)
        for first, write in writers.items():
            (out := tmp_path / f"out-{first}").mkdir(exist_ok=True)
            (out / first).write_bytes(b"old figure")
            with pytest.raises(OutputError if isinstance(stop, OSError) else KeyboardInterrupt):
                write(out)
            assert [p.name for p in out.iterdir()] == [first] and (out / first).read_bytes() == b"old figure"


def test_plots_roofline_title_says_when_no_bandwidth():
    from analysis import plots
    from harness.record import Bandwidth, DeviceMeta

    rec = store.read_record(REF)
    assert "no roofline" in plots.plot_roofline(rec, seed_model()).axes[0].get_title()
    rec = rec.replace(device=DeviceMeta(bandwidth=Bandwidth(read_gbps=40.0)))
    ax = plots.plot_roofline(rec, seed_model()).axes[0]
    assert "no roofline" not in ax.get_title()
    assert any("roofline 40.0 GB/s" in t.get_text() for t in ax.get_legend().get_texts())


# ------------------------------------------------------------------ bad input
def _future_run(tiny_run, tmp_path):
    t = pq.read_table(tiny_run)
    meta = json.loads(t.schema.metadata[store.META_KEY])
    meta["schema_version"] = SCHEMA_VERSION + 1
    p = tmp_path / "future.parquet"
    pq.write_table(t.replace_schema_metadata({store.META_KEY: json.dumps(meta).encode()}), p)
    return p


def _bad_inputs(tiny_run, tiny_gguf, tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), plain)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    trunc = tmp_path / "trunc.parquet"
    shutil.copy(tiny_run, trunc)
    with open(trunc, "r+b") as f:
        f.truncate(trunc.stat().st_size // 2)
    return {
        "plain parquet": ([str(plain)], 1),
        "gguf as run": ([str(tiny_gguf)], 1),
        "text file": ([str(text)], 1),
        "missing file": ([str(tmp_path / "nope.parquet")], 1),
        "future schema": ([str(_future_run(tiny_run, tmp_path))], 1),
        "truncated": ([str(trunc)], 1),
        "exact without model": ([str(REF), "--model-variant", "exact"], 2),
        "missing model file": ([str(REF), "--model-variant", "exact", "--model", str(tmp_path / "x.gguf")], 1),
        "text as model": ([str(REF), "--model-variant", "exact", "--model", str(text)], 1),
        "bad variant": ([str(REF), "--model-variant", "approx"], 2),
    }


@pytest.mark.parametrize("module", ["analysis.table", "analysis.plots"])
def test_bad_input_is_one_line(module, tiny_run, tiny_gguf, tmp_path):
    out = ["-o", str(tmp_path / "figs")] if module == "analysis.plots" else []
    cases = _bad_inputs(tiny_run, tiny_gguf, tmp_path)
    if module == "analysis.plots":  # same loader as the table: a sample is enough (matplotlib start-up is slow)
        cases = {k: cases[k] for k in ("plain parquet", "truncated", "exact without model")}
    for case, (args, code) in cases.items():
        r = run_cli(module, *args, *out)
        assert r.returncode == code, (case, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr, case
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(f"{module}: error:"), (case, r.stderr)
        assert r.stdout == "", case
    r = run_cli(module, "--format", "xml", str(REF), *out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(module)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_analysis_modules_do_not_import_the_engine():
    code = ("import sys, analysis.readmodel, analysis.baseline, analysis.table, analysis.plots; "
            "bad = [m for m in ('llama_cpp', 'harness.engine', 'harness.capture', 'harness.sweep', 'harness.twin') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REF.parents[2])
    assert r.returncode == 0, r.stdout + r.stderr


def test_table_has_slopes_with_three_depths(tiny_run):
    r = run_cli("analysis.table", str(tiny_run))
    assert r.returncode == 0, r.stderr
    assert "Slopes against depth" in r.stdout and "| attn_kv |" in r.stdout and "| decode |" in r.stdout
    csv = run_cli("analysis.table", str(tiny_run), "--format", "csv")
    assert "attn_kv_slope_ms_per_1k" in csv.stdout.splitlines()[0]


def test_invariant_stage_slope_off_zero_is_said_out_loud():
    """A depth-invariant stage whose slope interval excludes 0 is reported with what it amounts to over the
    depths (ms and % of the stage); one whose interval holds 0, or a depth-dependent stage, is not."""
    from types import SimpleNamespace

    from analysis.slope import SLOPE_COLUMNS, invariant_off_zero
    from harness.stages import STAGES

    rows = {s: [0.0, -0.1, 0.1, 0.0, 40, 2, -0.15, 0.15] for s in STAGES}
    rows["ffn"] = [-0.25, -0.4, -0.1, 50.0, 40, 2, -0.45, -0.05]  # ms per 1k tokens: -1.0 ms over 4,000 tokens
    rows["attn_kv"] = [4.0, 3.9, 4.1, 0.5, 40, 2, 3.8, 4.2]  # depends on depth: not reported
    rows["lm_head"] = [0.1, 0.02, 0.18, 15.0, 40, 2, -0.01, 0.21]  # off 0 at 95 % only: chance over five stages
    sl = pd.DataFrame.from_dict(rows, orient="index", columns=SLOPE_COLUMNS)
    ms = {"ffn": 50.0, "lm_head": 15.0, "attn_proj": 5.0, "gemma3n_extra": 7.0, "norm": 0.5, "attn_kv": 1.0}
    ctxs = [SimpleNamespace(depth=d, stage=lambda s: ms.get(s, 0.0)) for d in (4013, 13)]
    off = invariant_off_zero(sl, ctxs)
    assert list(off) == ["ffn"] and off["ffn"] == pytest.approx((-1.0, -2.0))
    rows["gemma3n_extra"] = [0.1, 0.05, 0.2, 0.0, 40, 2, 0.02, 0.25]  # off zero, but the model has no such stage
    ms["gemma3n_extra"] = 0.0
    assert list(invariant_off_zero(pd.DataFrame.from_dict(rows, "index", columns=SLOPE_COLUMNS), ctxs)) == ["ffn"]


def test_table_says_which_invariant_slope_excludes_zero(tiny_run, monkeypatch):
    """The line beneath the slopes names the stage, its interval and what it amounts to over the depths."""
    monkeypatch.setattr(table, "invariant_off_zero", lambda sl, contexts: {"ffn": (-0.56, -1.0)})
    out = table.render(store.read_record(tiny_run), seed_model(), run=store.read_run(tiny_run))
    line = next(x for x in out.splitlines() if x.startswith("- ffn: its bytes do not depend on depth"))
    assert "-0.56 ms, -1.0 % over the depths" in line and "interval over rounds does not hold" in line


def test_a_probe_slower_than_the_engine_is_said_to_be_no_roofline(tiny_run):
    """A memory-bound probe cannot be slower than the best stage the engine achieves; when it is, the table says so."""
    from analysis import roofline
    from harness.record import Bandwidth
    rec = store.read_record(tiny_run)
    model = table.load_read_model(rec)
    best = roofline.faster_than_probe(rec.contexts, 1e-9, model)[2]  # the fastest stage's GB/s
    for bw, said in ((0.9 * best, True), (1.1 * best, False), (None, False)):
        r = rec.replace(device=rec.device.replace(bandwidth=Bandwidth(read_gbps=bw) if bw else None))
        assert ("**The probe is no roofline here**" in table.render(r, model)) is said, bw
