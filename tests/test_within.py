"""bench/within.py: one context per depth whose ask table changes token by token, on a real tiny twin, and its figures
on made-up rounds (an injected excess found, the null control at 0, pooled results, one-line errors)."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
within = importlib.import_module("within")
within_stats = importlib.import_module("within_stats")


def _one_line_error(capsys, rc: int, code: int, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_a_block_times_every_table_in_one_context_per_depth(tiny_seeds):
    model, ecfg, seeds, prompt = tiny_seeds
    tables = list(within_stats.TABLES)
    wall, attn, host, steal = within.block(model, ecfg, seeds, tables, 1, 4, 1, prompt[-1])
    assert wall.shape == attn.shape == host.shape == (4, len(tables), 2) and (wall > 0).all() and 0 <= steal <= 1
    split = [t in within_stats.SPLIT_AROUND_ATTENTION for t in tables]
    assert (attn[:, split] > 0).all() and np.isnan(attn[:, [not s for s in split]]).all()
    assert (attn[:, split] + host[:, split] < wall[:, split]).all() and (host >= 0).all()  # parts of the token
    f = within_stats.figures(*(x[None].repeat(2, axis=0) for x in (wall, attn)), tables, host[None].repeat(2, axis=0))
    assert f["blocks"] == 2 and f["rounds"] == 8 and set(f["per_table"]) == set(tables)
    assert "excess_ms" not in f["per_table"]["last"] and "attn_kv_rise_ms" in f["per_table"]["attn"]
    assert all("host_rise_ms" in g for g in f["per_table"].values())


def test_figures_find_an_injected_excess_and_nothing_in_the_null_control(tmp_path, capsys):
    rng = np.random.default_rng(0)
    blocks, rounds, tables = 12, 40, ["last", "last2", "stages", "attn"]
    wall = 90 + rng.normal(0, 1, (blocks, rounds, 4, 2)) + rng.normal(0, 3, (blocks, 1, 1, 1))  # a block's offset
    wall[..., 1] += 20 + rng.normal(0, 5, (blocks, rounds, 1))  # the device's drift: every table's rise alike
    wall[:, :, 2, 1] += 0.5  # stages: +0.5 ms more at depth
    wall[0, 0, 2, 1] += 400  # one wild token: the trimmed mean does not see it
    attn = np.where(np.isin(tables, within_stats.SPLIT_AROUND_ATTENTION)[None, None, :, None], wall - 70, np.nan)
    host = np.zeros_like(wall) + 0.2
    host[..., 1] += 0.1  # set-up that grows with depth
    f = within_stats.figures(wall, attn, tables, host)
    g = f["per_table"]
    assert g["stages"]["excess_trimmed_ms"]["mean"] == pytest.approx(0.5, abs=0.25)
    assert g["stages"]["excess_trimmed_ms"]["ci"][0] > 0
    assert g["stages"]["excess_ms"]["mean"] > 0.5 + 400 / rounds / blocks - 0.25  # the plain mean does
    for t in ("last2", "attn"):  # nothing injected: within three standard errors of 0
        assert abs(g[t]["excess_trimmed_ms"]["mean"]) < 3 * g[t]["excess_trimmed_ms"]["se"], t
    assert g["attn"]["rest_rise_ms"]["mean"] == pytest.approx(0.0, abs=1e-9)  # attn_kv is wall - 70
    assert g["stages"]["attn_kv_minus_reference_ms"]["mean"] == pytest.approx(g["stages"]["excess_ms"]["mean"])
    assert all(h["host_rise_ms"]["mean"] == pytest.approx(0.1) for h in g.values())
    assert "host_rise_ms" not in within_stats.figures(wall, attn, tables)["per_table"]["last"]  # saved before it
    saved, short = tmp_path / "a.json", tmp_path / "b.json"
    body = {"tables": tables, "depths": [13, 4096], "steal": [0.0] * blocks}
    saved.write_text(json.dumps({**body, "wall_ms": wall.tolist(), "attn_ms": attn.tolist()}))
    short.write_text(json.dumps({**body, "wall_ms": wall[:, :10].tolist(), "attn_ms": attn[:, :10].tolist()}))
    h, depths, steal = within_stats.pooled([str(saved), str(short)])  # padded with NaN rounds
    assert h["blocks"] == 2 * blocks and h["rounds"] == blocks * 50 and len(steal) == 2 * blocks
    assert h["per_table"]["stages"]["excess_trimmed_ms"]["mean"] == pytest.approx(0.5, abs=0.25)
    assert within.main(["--load", str(saved)]) == 0 and "stages rise" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**body, "tables": tables[:2], "wall_ms": [[[[1]]]], "attn_ms": []}))
    _one_line_error(capsys, within.main(["--load", str(saved), str(bad)]), 1, "tables or depths differ")
    bad.write_text(json.dumps({**body, "wall_ms": wall.tolist(), "attn_ms": []}))  # well-formed, wrong shape
    _one_line_error(capsys, within.main(["--load", str(bad)]), 1, "not a within.py result")
    bad.write_text("{")
    _one_line_error(capsys, within.main(["--load", str(bad)]), 1, "cannot read saved within.py figures")
    for wrong in ("stages,attn", "last,bogus", "last,last", "last"):
        _one_line_error(capsys, within.main(["--tables", wrong]), 2, "last among them")
    _one_line_error(capsys, within.main(["--blocks", "1"]), 2, "--blocks must be >= 2")
