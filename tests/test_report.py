"""analysis.report: one self-contained HTML page (tables, inline SVG, metadata, flags, no external
references), its bad-input errors, and the console entry points of every command."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, run_cli

from analysis import report, run_facts
from harness import store
from harness.store import META_KEY

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

DRIFT = {"kind": "drift", "message": "plain ms/token drifted +6.2 % from first to last repeat", "context": "long"}
NOISE = {"kind": "noise", "message": "other processes used 23.0 % of the CPU during measurement"}
URL = re.compile(r"url\(\s*['\"]?([^'\")]*)", re.I)


class Page(HTMLParser):
    """Every tag with its attributes, the text of <style> elements, and the visible text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.styles: list[str] = []
        self.text: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        (self.styles if self._in_style else self.text).append(data)


def parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    return p


def flagged_copy(src: Path, dst: Path, **changes) -> Path:
    t = pq.read_table(src)
    meta = {**json.loads(t.schema.metadata[META_KEY]), **changes}
    dst.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, META_KEY: json.dumps(meta).encode()}), dst)
    return dst


def assert_self_contained(text: str) -> None:
    page = parse(text)
    tags = {t for t, _ in page.tags}
    assert not tags & {"script", "link", "img", "iframe", "object", "embed", "base", "video", "audio", "source"}
    refs = [v for _, attrs in page.tags for k, v in attrs.items() if k in ("src", "href", "xlink:href", "srcset",
                                                                            "action", "data", "poster")]
    refs += [m.group(1) for _, attrs in page.tags for m in URL.finditer(attrs.get("style") or "")]
    refs += [m.group(1) for css in page.styles for m in URL.finditer(css)]
    assert refs and all(r.startswith("#") for r in refs), [r for r in refs if not r.startswith("#")]
    assert "@import" not in "".join(page.styles)
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I)  # not even a namespace URL


@pytest.fixture(scope="module")
def page(tiny_run, tiny_run_1t, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("report-runs")
    shutil.copy(tiny_run, d / "a.parquet")
    flagged_copy(tiny_run_1t, d / "sub" / "b.parquet", flags=[DRIFT, NOISE], complete=False, stop_reason="SIGINT")
    shutil.copy(next((ROOT / "analysis" / "data").glob("*.parquet")), d / "reference.parquet")
    return report.build([str(d)], title="Fleet report test")


def test_report_is_self_contained(page):
    assert_self_contained(page)
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    assert "@media print" in page and "break-before: page" in page


def test_report_has_tables_figures_metadata_and_flags(page, tiny_run):
    p = parse(page)
    text = " ".join(p.text)
    n_svg = sum(1 for t, _ in p.tags if t == "svg")
    assert n_svg == 3 * 4 + 2  # four per run; the comparison: stage bars and shares (no bandwidth: no roofline)
    assert "Fleet report test" in text and "3 runs" in text
    # the measurement table (analysis.table, one column per context) and the comparison (analysis.compare)
    for want in ("Measurement table", "Decode ms/token", "FFN read/token MB", "short (13)", "40 (40)", "80 (80)",
                 "Stage slopes", "Decode compare: 3 runs", "context short (depth 13)", "speedup", "x roofline"):
        assert want in text, want
    assert sum(1 for t, _ in p.tags if t == "table") >= 3 * 5
    # device, model and engine metadata
    meta = json.loads(pq.read_schema(tiny_run).metadata[META_KEY])
    for want in (meta["device"]["cpu_model"], meta["model"]["content_hash"], meta["engine_version"], "flash attention",
                 "KV cache types", "tiny synthetic twin (q4_k_m)", "llama.cpp system info", "Gemma 3n E4B"):
        assert want in text, want
    # flags: the run's own list (drift, noise), synthetic, incomplete, reference
    for want in (DRIFT["message"], "context long", NOISE["message"], "Synthetic twin",
                 "Incomplete run: the sweep stopped early (SIGINT)", "Recorded figures of the seed notebook"):
        assert want in text, want
    warnings = [a for t, a in p.tags if t == "div" and a.get("class") == "flag warning"]
    infos = [a for t, a in p.tags if t == "div" and a.get("class") == "flag info"]
    assert len(warnings) >= 2 * 4 and infos  # summary + run section each
    assert page.index(DRIFT["message"]) < page.index("Decode compare")  # flags come first


def test_flags_come_from_the_record_and_what_it_implies(tiny_run):
    from harness.record import Bandwidth, Flag

    rec = store.read_record(tiny_run)
    kinds = [f.kind for f in run_facts.flags(rec)]
    assert kinds.count("synthetic") == 1 and "no-roofline" in kinds  # swept with --no-probe
    rec = rec.replace(flags=(Flag("drift", "ffn differs by 9 %"),), synthetic=False,
                      device=rec.device.replace(bandwidth=Bandwidth(read_gbps=40.0)), complete=False, stop_reason="x")
    got = run_facts.flags(rec)
    assert [f.kind for f in got] == ["drift", "incomplete"] and all(f.level == run_facts.WARNING for f in got)


def test_single_run_cli(tiny_run, tmp_path):
    out = tmp_path / "deep" / "r.html"
    r = run_cli("analysis.report", str(tiny_run), "-o", str(out))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    text = out.read_text()
    assert_self_contained(text)
    assert "Decode compare" not in text and text.count("<svg") == 4 and "Measurement table" in text
    assert not [f for f in out.parent.iterdir() if f.name.startswith(".tmp-")]


def test_write_leaves_the_old_report_and_no_temp_file_when_interrupted(tmp_path, monkeypatch):
    out = tmp_path / "r.html"
    out.write_text("old report")

    def interrupted(self, data, *args, **kw):  # Ctrl-C half-way through the write
        with open(self, "w") as f:
            f.write(data[:5])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.write("<html>new report</html>", out)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"] and out.read_text() == "old report"
    assert report.write("<html>new</html>", out) == out and out.read_text() == "<html>new</html>"
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


@pytest.mark.parametrize("case", ["missing", "folder as output", "not a run", "no runs", "bad variant"])
def test_bad_input_is_one_line(case, tiny_run, tmp_path):
    plain = tmp_path / "plain.parquet"
    plain.write_bytes(b"PAR1 not really")
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {"missing": [str(tmp_path / "nope.parquet"), "-o", str(tmp_path / "r.html")],
            "folder as output": [str(tiny_run), "-o", str(tmp_path)],
            "not a run": [str(plain), "-o", str(tmp_path / "r.html")],
            "no runs": [str(empty), "-o", str(tmp_path / "r.html")],
            "bad variant": [str(tiny_run), "-o", str(tmp_path / "r.html"), "--model-variant", "guess"]}[case]
    r = run_cli("analysis.report", *args)
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("analysis.report: error:"), r.stderr
    assert not (tmp_path / "r.html").exists()


def test_report_does_not_import_the_engine():
    code = ("import sys, analysis.report, analysis.fleet_db, analysis.run_facts, analysis.report_html; "
            "bad = [m for m in ('llama_cpp', 'harness.engine', 'harness.capture') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_every_command_is_a_console_entry_point():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    want = {"harness-sweep": "harness.sweep", "harness-twin": "harness.twin", "harness-table": "analysis.table",
            "harness-plots": "analysis.plots", "harness-compare": "analysis.compare",
            "harness-report": "analysis.report"}
    assert {k: v.split(":")[0] for k, v in scripts.items() if k in want} == want
    readme = (ROOT / "README.md").read_text()
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))
        assert f"`{name}" in readme, f"{name} is not in the README commands table"


def test_a_found_run_whose_op_table_is_damaged_loses_its_section_a_named_one_is_an_error(tiny_run, tiny_run_1t,
                                                                                          tmp_path, caplog):
    d = tmp_path / "runs"
    d.mkdir()
    bad = d / "damaged.parquet"
    data = bytearray(tiny_run.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8  # the footer (and the record in it) stays readable
    data[4:len(data) - footer] = bytes(len(data) - footer - 4)  # every data page zeroed
    bad.write_bytes(bytes(data))
    shutil.copy(tiny_run_1t, d / "good.parquet")
    html = report.build([str(d)])
    assert "damaged.parquet" in caplog.text and "no detailed section" in caplog.text and "<html" in html
    with pytest.raises(store.InputError, match="damaged.parquet"):
        report.build([str(bad), str(d / "good.parquet")])


def test_what_a_reader_leaves_out_is_still_said(tiny_run, tiny_run_1t, tmp_path):
    """Runs beyond --detail keep their flags in the summary; twin runs are their own SYNTHETIC rows in compare; raw
    stage figures (no calibration, or --raw) say so in the header every reader shares, and in the table's CSV."""
    import io

    import pandas as pd

    from analysis import fleet, plots, table

    d = tmp_path / "runs"
    flagged_copy(tiny_run, d / "a.parquet")
    flagged_copy(tiny_run_1t, d / "b.parquet", flags=[DRIFT])
    text = " ".join(parse(report.build([str(d)], detail=0)).text)
    assert "No flags" not in text and "2 runs not detailed" in text and "1 run not detailed" in text
    real = flagged_copy(tiny_run, d / "real.parquet", synthetic=False)  # the same model file, said to be real
    names = fleet.group_names(fleet.group_runs(fleet.load_runs([str(d / "a.parquet"), str(real)])))
    assert sorted("SYNTHETIC" in n for n in names) == [False, True]
    rec = store.read_record(tiny_run)
    raw = rec.replace(contexts=tuple(c.replace(stage_ms_calibrated={}, stage_pct_calibrated={}) for c in rec.contexts))
    model = table.load_read_model(rec)
    for r, cal, said in ((rec, True, ""), (raw, True, "This run has no calibration"), (rec, False, "Shown with --raw")):
        head = " ".join(table.describe(r, model, cal))
        assert f"{said}: stage ms are raw" in head if said else "stage ms are raw" not in head
        csv = pd.read_csv(io.StringIO(table.render(r, model, "csv", calibrated=cal)))
        assert set(csv["stage_figures"]) == {"raw" if said else "calibrated"}
    assert "stage ms raw (no calibration)" in plots.make_figures(raw, model)["stage_ms"].axes[0].get_title()
    inv = rec.invariants  # the invariance figure in words: within its threshold or beyond it
    assert run_facts.agreement(inv.replace(max_disagreement_pct=1.0, threshold_pct=2.0)) == (
        "agree within 1.00 % (threshold 2 %)")
    assert run_facts.agreement(inv.replace(max_disagreement_pct=3.0)).startswith("disagree by up to 3.00 %")
