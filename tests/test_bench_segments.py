"""bench/segments.py: a depth-invariant stage's rise with depth read per segment name (made-up op tables for the
arithmetic; a real tiny sweep end to end; one-line errors)."""

from __future__ import annotations

import importlib
import sys

import pandas as pd
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
segments = importlib.import_module("segments")
across = importlib.import_module("across")


def _ops(post_norm_extra_us: float, rounds: int = 5, deep_lo: int = 13, deep_hi: int = 4096) -> pd.DataFrame:
    """Two layers at depths 13 and 4096: the deep context's ffn_post_norm segments take ``post_norm_extra_us``
    longer and its unnamed output projections 3 µs longer, per layer, except in round 0, where the deep output
    projections take 500 µs longer (one outlier round of five, which the 20 % trimmed mean drops); the FFN the
    same; a kv_store segment not asked for; a 5 µs segment; and a round 9 with the shallow context only."""
    rows = []
    for ctx, depth in (("short", deep_lo), ("long", deep_hi)):
        deep = depth > deep_lo
        for r in [*range(rounds), *([9] if not deep else [])]:
            for layer in range(2):
                n = 100 * layer
                rows += [(ctx, depth, r, n + 60, n + 67, f"node_{n + 67}", layer, "MUL_MAT", "attn_proj",
                          70.0 + r + (500.0 if r == 0 else 3.0) * deep),
                         (ctx, depth, r, n + 70, n + 70, f"tiny-{layer}", layer, "ADD", "norm", 2.5 + 10 * deep),
                         (ctx, depth, r, n + 80, n + 94, f"ffn_out-{layer}", layer, "MUL_MAT", "ffn", 2500.0 + 7 * r),
                         (ctx, depth, r, n + 95, n + 96, f"ffn_post_norm-{layer}", layer, "MUL", "norm",
                          10.0 + post_norm_extra_us * deep),
                         (ctx, depth, r, n + 50, n + 52, f"cache_k_l{layer} (view)", layer, "SET_ROWS", "kv_store",
                          9.0)]
    return pd.DataFrame(rows, columns=["context", "depth", "round", "node_first", "node", "name", "layer", "op",
                                       "stage", "time_us"])


def test_differences_are_paired_per_segment_name_with_layers_summed():
    d = segments.run_differences(_ops(2.0), ["norm", "attn_proj", "ffn"])
    assert d.loc[("norm", "ffn_post_norm"), "diff_us"] == pytest.approx(4.0)  # 2 µs in each of 2 layers
    assert d.loc[("attn_proj", "(unnamed MUL_MAT)"), "diff_us"] == pytest.approx(6.0)  # the outlier round trimmed
    assert d.loc[("ffn", "ffn_out"), "diff_us"] == pytest.approx(0.0)
    assert d.loc[("norm", "ffn_post_norm"), "shallow_us"] == pytest.approx(20.0)
    assert "kv_store" not in d.index.get_level_values(0) and set(d["deep"]) == {4096}
    # round 9 has no deep context: left out (its shallow time would move the shallow mean otherwise)
    assert d.loc[("attn_proj", "(unnamed MUL_MAT)"), "shallow_us"] == pytest.approx(2 * 72.0)


def test_summary_over_runs_is_mean_se_share_and_count():
    out = segments.summarize([segments.run_differences(_ops(x), ["norm", "ffn"]) for x in (2.0, 3.0, -0.5)])
    r = out.loc[("norm", "ffn_post_norm")]
    assert (r["diff_us"], r["runs"], r["higher"]) == (pytest.approx(3.0), 3, 2)  # +4, +6, -1
    assert r["se_us"] == pytest.approx(pd.Series([4.0, 6.0, -1.0]).std() / 3 ** 0.5)
    assert r["pct"] == pytest.approx(15.0)
    assert list(out.index) == [("norm", "ffn_post_norm"), ("ffn", "ffn_out")]  # largest rise first; `tiny` < 20 µs
    assert segments.segment_key(pd.Series(["node_3047", "attn_post_norm-12", "result_output"]),
                                pd.Series(["MUL_MAT", "MUL", "MUL_MAT"])).tolist() == [
        "(unnamed MUL_MAT)", "attn_post_norm", "result_output"]


def test_runs_must_share_their_depths_and_be_stage_mode(monkeypatch, capsys):
    from types import SimpleNamespace

    runs = {"a": _ops(2.0), "b": _ops(2.0, deep_hi=658)}
    mode = {"c": "ops"}
    monkeypatch.setattr(segments, "read_run", lambda p, only=None: SimpleNamespace(
        ops=runs.get(str(p)), record=SimpleNamespace(params=SimpleNamespace(mode=mode.get(str(p), "stages")))))
    for argv, needle in ((["a", "b"], "depths 13 -> 658 and 13 -> 4096 differ between the runs"),
                         (["c"], "c: a run in ops mode")):
        assert segments.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_a_real_tiny_sweep_end_to_end(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(segments, "save_results", lambda kind, payload: across.save_results(kind, payload, tmp_path))
    assert segments.main([str(tiny_run), str(tiny_run), "--stages", "ffn,norm"]) == 0
    out = capsys.readouterr().out
    assert "depths 13 -> 80" in out and "ffn_out" in out and ("2 of 2" in out or "0 of 2" in out)
    assert len(list(tmp_path.glob("segments-*.json"))) == 1


def test_bad_input_is_one_line(tiny_run, tmp_path, capsys):
    import pyarrow.parquet as pq

    empty = tmp_path / "no-rows.parquet"
    pq.write_table(pq.read_table(tiny_run).slice(0, 0), empty)  # the metadata kept, the op table empty
    for argv, code, needle in ((["--stages", "ffn,bogus", str(tiny_run)], 2, "--stages"),
                               ([str(tmp_path / "none.parquet")], 1, "none.parquet"),
                               ([str(empty)], 1, "op table has no rows")):
        rc = segments.main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == code and needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
