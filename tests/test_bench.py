"""The bench scripts' own analysis and their errors: the same-depth control on a real tiny sweep, paired settings,
one-line errors for bad arguments and files, and results saved whole (robust.py's figures: test_bench_across)."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli

from harness.errors import OutputError

sys.path.insert(0, str(ROOT / "bench"))
robust = importlib.import_module("robust")
across = importlib.import_module("across")
same_depth = importlib.import_module("same_depth")
paired_settings = importlib.import_module("paired_settings")
fleet_bench = importlib.import_module("fleet_bench")
predict_bench = importlib.import_module("predict_bench")
compare_bench = importlib.import_module("compare_bench")
report_screenshot = importlib.import_module("report_screenshot")
suite = importlib.import_module("suite")
estimators = importlib.import_module("estimators")
twin_bench = importlib.import_module("twin_bench")
openmp_bench = importlib.import_module("openmp_bench")


def test_same_depth_control_pairs_twins_and_splits_segments(tiny_gguf, tmp_path):
    r = run_cli("harness.sweep", "--model", str(tiny_gguf), "-c", "13,14,80,81", "-r", "4", "--warmup", "1",
                "--no-probe", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    res = same_depth.analyse(next(tmp_path.glob("*.parquet")))
    assert res["depths"] == [13, 14, 80, 81] and res["rounds"] == 4
    assert set(res["stages"]) >= {"ffn", "lm_head"}
    for v in res["stages"].values():
        assert len(v["twins_pct"]) == 2 and all(np.isfinite(v["twins_pct"]))
        point, lo, hi = v["deep_vs_shallow_pct"]
        assert lo <= hi and np.isfinite(point)
    seg = res["segments"]
    assert seg and all(k in ("after_full_context_attention", "elsewhere") for s in seg.values() for k in s)
    assert any("after_full_context_attention" in s for s in seg.values())  # the tiny twin has full-context layers
    # a tiny stage calibrated to 0 ms in a shallow round has no ratio (it made an inf, then a NaN interval)
    pct = same_depth._paired_pct(np.array([1.0, 1.1, 0.9, 1.0]), np.array([0.0, 1.0, 1.0, 1.0]))
    assert pct == pytest.approx([0.0, -10.0, 10.0])


def test_segments_put_an_injected_growth_where_it_was_injected():
    """Three layers, layer 1 full-context; every deep context's attn_proj segment after layer 1's attention
    takes 10 µs longer: the split must find +10 there and 0 elsewhere."""
    import pandas as pd

    rows = []
    for ctx, depth in (("a", 13), ("b", 14), ("c", 4096), ("d", 4097)):
        for rnd in range(6):
            for layer in range(3):
                base = 100 * layer
                after = 20.0 + (10.0 if depth > 1000 and layer == 1 else 0.0)
                rows += [(ctx, depth, rnd, base + 5, layer, "attn_proj", 30.0 + rnd),
                         (ctx, depth, rnd, base + 10, layer, "attn_kv", 5.0 if depth < 1000 else 50.0),
                         (ctx, depth, rnd, base + 20, layer, "attn_proj", after + rnd)]
    ops = pd.DataFrame(rows, columns=["context", "depth", "round", "node_first", "layer", "stage", "time_us"])
    seg = same_depth.segments(ops, ["a", "b"], ["c", "d"], {1})["attn_proj"]
    assert seg["after_full_context_attention"][:3] == pytest.approx([10.0, 10.0, 10.0])
    assert seg["after_full_context_attention"][3] == 1
    assert seg["elsewhere"][:3] == pytest.approx([0.0, 0.0, 0.0]) and seg["elsewhere"][3] == 5
    assert same_depth.full_context_layers({"0": 1024, "1": 8192, "2": 1024}) == {1}


def test_paired_settings_measures_both_settings_in_the_same_rounds(tiny_gguf):
    from harness.config import SweepConfig, parse_contexts
    from harness.engine import Model
    from harness.orchestrate import prompt_tokens

    cfg = SweepConfig(contexts=parse_contexts("13,40"), threads=2)
    with Model(tiny_gguf) as model:
        prompt = prompt_tokens(model, True, cfg.max_depth)
        ms = paired_settings.measure(model, cfg, [("flash_attn", "on"), ("flash_attn", "off")], prompt, 4, 1)
    assert ms.shape == (4, 2, 2) and np.isfinite(ms).all() and (ms > 0).all()
    f = paired_settings.paired(ms, [13, 40])
    assert f["ratio"] == pytest.approx(list(ms[:, 0].mean(axis=0) / ms[:, 1].mean(axis=0)))
    assert all(lo <= hi for lo, hi in f["ratio_ci"])


def test_paired_settings_figures_on_made_up_rounds():
    depths = [13, 1024, 4096]
    d = np.array(depths, float)
    drift = np.array([1.0, 1.1, 0.9, 1.2])[:, None]  # every context of a round alike: pairing removes it
    a, b = 10 + 3e-3 * d, 11 + 1e-3 * d  # A is cheaper shallow, dearer deep; equal at depth 500
    ms = np.stack([drift * a, drift * b], axis=1)  # (rounds, arms, depths)
    f = paired_settings.paired(ms, depths)
    assert f["crossover_depths"] == [pytest.approx(500.0, rel=0.02)]
    assert f["crossover_share"] == 1.0 and f["crossover_ci"] == pytest.approx([500.0, 500.0])  # drift cancels
    assert f["ratio"] == pytest.approx(list(a / b))
    assert f["rise_ms"] == pytest.approx([drift.mean() * 3e-3 * 4083, drift.mean() * 1e-3 * 4083])
    assert paired_settings.paired(ms[:, ::-1], depths)["crossover_depths"] == f["crossover_depths"]
    assert paired_settings.paired(np.stack([drift * a, drift * a * 2], axis=1), depths)["crossover_depths"] == []


def _one_line_error(capsys, rc: int, code: int, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("script, args, needle", [
    ("fleet_bench", ["--sizes", "10,abc"], "--sizes"),
    ("fleet_bench", ["--sizes", "0"], "--sizes"),
    ("fleet_bench", ["--engines", "polars"], "--engines"),
    ("predict_bench", ["--fit", "abc"], "--fit"),
    ("predict_bench", ["--fit", "13,99"], "--fit depth(s) 99 are not in --contexts"),
    ("predict_bench", ["--contexts", "13,172", "--fit", "13,172"], "no depth is held out"),
    ("predict_bench", ["--rounds", "0"], "--rounds"),
    ("compare_bench", ["--runs", "0"], "--runs must be >= 1"),
    ("robust", ["--sweeps", "0"], "--sweeps"),
    ("robust", ["--sweeps", "-3"], "--sweeps"),
    ("robust", ["--threads", "2", "--vary", "flash_attn=on,off"], "not both"),
    ("robust", ["--", "-fa", "on,off"], "extra sweep flags on,off: robust.py sets"),
    ("robust", ["--", "--layout=hive"], "extra sweep flags --layout=hive"),
    ("same_depth", ["--sweeps", "0"], "--sweeps"),
    ("same_depth", ["--depths", "13,x"], "--depths"),
    ("paired_settings", ["--vary", "fa=on,off"], "--vary takes SETTING=A,B"),
    ("twin_bench", ["--dir", "{tmp}/missing"], "--dir: not a folder"),
    ("openmp_bench", ["--tokens", "0"], "--tokens"),
    ("suite", ["--skip", "ops,bogus"], "--skip: unknown part(s) bogus"),
    ("suite", ["--rounds", "0"], "--rounds"),
    ("report_screenshot", ["{html}", "-o", "{tmp}/x.png", "--width", "-5"], "--width"),
    ("report_screenshot", ["{html}", "-o", "{tmp}"], "a folder, not a file"),
])
def test_bench_scripts_refuse_bad_arguments_in_one_line(script, args, needle, tmp_path, capsys):
    html = tmp_path / "r.html"
    html.write_text("<html></html>")
    argv = [a.format(html=html, tmp=tmp_path) for a in args]
    _one_line_error(capsys, globals()[script].main(argv), 2, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]  # nothing made


@pytest.mark.parametrize("script", ["robust", "same_depth", "fleet_bench"])
def test_keep_must_be_a_folder(script, tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("mine")
    _one_line_error(capsys, globals()[script].main(["--keep", str(f)]), 2, "argument --keep: not a folder")
    assert f.read_text() == "mine"


def test_bench_scripts_refuse_bad_input_files_in_one_line(tmp_path, capsys, monkeypatch):
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    text, plain = tmp_path / "notes.parquet", tmp_path / "plain.parquet"
    text.write_text("not parquet")
    pq.write_table(pa.table({"a": [1]}), plain)  # Parquet, but no run metadata
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for bad in (text, plain):  # checked before the pool starts (it used to restart failing workers for ever)
        _one_line_error(capsys, fleet_bench.main(["--sizes", "10", "--source", str(bad)]), 1, str(bad))
        _one_line_error(capsys, compare_bench.main(["--runs", "3", "--source", str(bad)]), 1, str(bad))
        _one_line_error(capsys, predict_bench.main(["--run", str(bad)]), 1, str(bad))
        _one_line_error(capsys, estimators.main([str(bad)]), 1, str(bad))
    _one_line_error(capsys, predict_bench.main(["--run", str(tmp_path / "none.parquet")]), 1, "not found")
    assert not list((tmp_path / "tmp").iterdir())  # no temp folder left behind
    _one_line_error(capsys, report_screenshot.main([str(text), "-o", "/proc/nope/x.png"]), 1, "-o: cannot write")
    _one_line_error(capsys, report_screenshot.main([str(tmp_path / "no.html"), "-o", "x.png"]), 1, "no such file")


def test_runs_without_op_rows_or_fitting_depths_are_refused(tiny_run, tmp_path, capsys):
    import pyarrow.parquet as pq

    t = pq.read_table(tiny_run)
    empty = tmp_path / "no-rows.parquet"
    pq.write_table(t.slice(0, 0), empty)  # the metadata kept, the op table empty
    for script, argv in (("robust", ["--runs", str(empty)]), ("estimators", [str(empty)]),
                         ("same_depth", ["--runs", str(empty)])):
        _one_line_error(capsys, globals()[script].main(argv), 1, "op table has no rows")
    # the default --fit depths (13, 172, 658, 2048) against a run of 13, 40, 80: the missing ones are named
    _one_line_error(capsys, predict_bench.main(["--run", str(tiny_run)]), 2, "depth(s) 172, 658, 2048 not measured")
    _one_line_error(capsys, predict_bench.main(["--run", str(tiny_run), "--fit", "13,40,80"]), 1, "no depth of")


def test_results_are_saved_whole_and_never_replace_earlier_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(across.time, "strftime", lambda *_: "STAMP")  # two saves in the same second
    a = across.save_results("x", {"v": 1, "p": tmp_path}, tmp_path / "res")
    b = across.save_results("x", {"v": 2}, tmp_path / "res")
    assert (a.name, b.name) == ("x-STAMP.json", "x-STAMP-1.json")
    assert a != b and json.loads(a.read_text()) == {"v": 1, "p": str(tmp_path)} and json.loads(b.read_text())["v"] == 2
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == sorted([a.name, b.name])  # no temp file left
    assert capsys.readouterr().out.splitlines() == [f"saved {a}", f"saved {b}"]
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="cannot save the results"):
        across.save_results("x", {}, tmp_path / "file" / "res")



locate = importlib.import_module("locate")
locate_stats = importlib.import_module("locate_stats")


def test_locate_block_holds_every_variant_at_every_depth(tiny_seeds):
    model, ecfg, seeds, prompt = tiny_seeds
    variants = list(locate_stats.VARIANTS)
    assert [s.n_past for s in seeds] == [13, 40]
    wall, attn, slot, steal = locate.block(model, ecfg, seeds, variants, 2, 3, 1, prompt)
    assert wall.shape == attn.shape == (3, len(variants), 2) and (wall > 0).all() and 0 <= steal <= 1
    split = [v in locate.SPLIT_AROUND_ATTENTION for v in variants]
    assert np.isfinite(attn[:, split]).all() and np.isnan(attn[:, [not s for s in split]]).all()
    assert (attn[:, split] < wall[:, split]).all()  # the attention is part of the token
    assert slot == [(variants.index(v) - 2) % len(variants) for v in variants]  # block 2: rotated by 2
    for r in range(4):  # a variant's depths back to back, in turn ascending and descending
        keys = locate._round_keys(len(variants), 2, r)
        assert sorted(keys) == [(i, j) for i in range(len(variants)) for j in range(2)]
        assert all(keys[k][0] == keys[k + 1][0] for k in range(0, len(keys), 2))
    assert {tuple(j for _, j in locate._round_keys(5, 2, r)[:2]) for r in range(2)} == {(0, 1), (1, 0)}


def test_locate_figures_find_an_excess_and_a_creation_order_effect(tmp_path, capsys):
    rng = np.random.default_rng(0)
    blocks, rounds, variants = 40, 6, list(locate_stats.DEFAULT_VARIANTS)
    slot = np.array([[(i - b) % 5 for i in range(5)] for b in range(blocks)])
    wall = 90 + rng.normal(0, 0.5, (blocks, rounds, 5, 2)) + rng.normal(0, 3, (blocks, rounds, 1, 1))  # drift: all
    wall[..., 1] += 20 + 0.3 * slot[:, None, :]  # rise 20 ms, +0.3 ms per later slot
    wall[:, :, variants.index("attn"), 1] += 2.0  # the capture's excess, in one variant only
    attn = np.where(np.isin(variants, locate_stats.SPLIT_AROUND_ATTENTION)[None, None, :, None], wall - 70, np.nan)
    f = locate_stats.figures(wall, attn, slot, variants)
    assert f["reference"] == ["plain", "plain2"]
    assert f["first_created_ms"][0] == pytest.approx(-0.3 * 2.5, abs=0.15)  # slot 0 against slots 1-4
    assert f["slot_slope_ms"] == pytest.approx(0.3, abs=0.1)
    assert f["per_variant"]["attn"]["excess_ms"][0] == pytest.approx(2.0, abs=0.2)
    for v in ("plain2", "stages", "last"):  # every variant takes every slot alike: the slots' effect cancels
        lo, hi = f["per_variant"][v]["excess_ci_ms"]
        assert lo < 0 < hi and hi - lo < 0.5, v
    assert f["per_variant"]["stages"]["rest_rise_ms"][0] == pytest.approx(0.0, abs=1e-9)  # attn is wall - 70
    saved = tmp_path / "a.json"
    saved.write_text(json.dumps({"variants": variants, "depths": [13, 4096], "steal": [0.0] * blocks,
                                 "wall_ms": wall.tolist(), "attn_ms": attn.tolist(), "slot": slot.tolist()}))
    short = tmp_path / "b.json"  # fewer rounds per block: padded with NaN rounds when pooled
    short.write_text(json.dumps({"variants": variants, "depths": [13, 4096], "steal": [0.0] * blocks,
                                 "wall_ms": wall[:, :3].tolist(), "attn_ms": attn[:, :3].tolist(),
                                 "slot": slot.tolist()}))
    g, depths, steal = locate_stats.pooled([str(saved), str(short)])
    assert g["blocks"] == 2 * blocks and depths == [13, 4096] and len(steal) == 2 * blocks
    assert g["per_variant"]["attn"]["excess_ms"][0] == pytest.approx(2.0, abs=0.2)  # padded rounds left out
    assert locate.main(["--load", str(saved)]) == 0 and "creation order: +0.3" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"variants": variants[:2], "depths": [13, 4096], "steal": [], "wall_ms": [[[[1]]]],
                               "attn_ms": [], "slot": []}))
    _one_line_error(capsys, locate.main(["--load", str(saved), str(bad)]), 1, "variants or depths differ")
    bad.write_text(json.dumps({**json.loads(saved.read_text()), "attn_ms": []}))  # well-formed, wrong shape
    _one_line_error(capsys, locate.main(["--load", str(bad)]), 1, "not a locate.py result")
    bad.write_text("{")
    _one_line_error(capsys, locate.main(["--load", str(bad)]), 1, "cannot read saved locate.py figures")
    for wrong in ("stages,attn", "plain,bogus", "plain,plain", "pre,stages"):  # a reference is needed: plain or plain2
        _one_line_error(capsys, locate.main(["--variants", wrong]), 2, "plain or plain2 among them")
