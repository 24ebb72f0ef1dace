"""Shared fixtures: small synthetic GGUFs and real sweep runs on them, made once per session."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Tests check structure, not speed. OpenMP's default spin-waiting collapses when two llama.cpp processes
# share two cores (every barrier waits for a descheduled thread): let idle OpenMP threads sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
# Sweeps in tests parse their throwaway twins afresh: no entries for them in the user's model cache
# (tests/test_model_cache.py turns it on, in a folder of its own).
os.environ["HARNESS_NO_MODEL_CACHE"] = "1"


def run_cli(module: str, *args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    from harness.twin import write_twin

    return write_twin("tiny", "q4_k_m", tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory) -> Path:
    from harness.twin import write_twin

    return write_twin("tiny-llama", "q8_0", tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


@pytest.fixture
def tiny_seeds(tiny_gguf):
    """The tiny twin loaded, with one prefilled seed context per depth (13 and 40) as bench/locate.py and within.py
    make them: yields (model, engine config of 2 threads, seeds, prompt tokens)."""
    from contextlib import ExitStack

    from harness.config import SweepConfig, parse_contexts
    from harness.engine import Model
    from harness.orchestrate import prompt_tokens

    sys.path.insert(0, str(ROOT / "bench"))
    locate = importlib.import_module("locate")
    cfg = SweepConfig(contexts=parse_contexts("13,40"), threads=2)
    with Model(tiny_gguf) as model, ExitStack() as stack:
        prompt = prompt_tokens(model, True, cfg.max_depth)
        yield model, cfg.engine_config(2), locate._seeds(stack, model, cfg.engine_config(2), [13, 40], prompt), prompt


def _sweep(tiny: Path, out: Path, *extra: str) -> Path:
    r = run_cli("harness.sweep", "--model", str(tiny), "--contexts", "13,40,80", "--rounds", "6",
                "--warmup", "1", "--no-probe", "--out", str(out), *extra)
    assert r.returncode == 0, r.stderr
    runs = sorted(out.glob("*.parquet"))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="session")
def tiny_run(tiny_gguf, tmp_path_factory) -> Path:
    """A real stages-mode sweep on the tiny gemma3n twin: contexts 13, 40 and 80 (window 32)."""
    return _sweep(tiny_gguf, tmp_path_factory.mktemp("runs"), "--label", "tiny-2t", "--threads", "2")


@pytest.fixture(scope="session")
def tiny_run_1t(tiny_gguf, tmp_path_factory) -> Path:
    """The same sweep on 1 thread, under another device label."""
    return _sweep(tiny_gguf, tmp_path_factory.mktemp("runs"), "--label", "tiny-1t", "--threads", "1")


def write_as_version_2(src: Path, path: Path, edit=None) -> dict:
    """Write a run as a schema-2 file would have stored it (sequential repeats x tokens, no rounds):
    the tiny runs' 6 rounds become 2 repeats x 3 tokens. ``edit(meta)`` may change the metadata first."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from harness import store

    run = store.read_run(src)
    meta = run.record.to_dict()
    meta["schema_version"] = 2
    for k in ("rounds", "invariants", "flags"):
        meta.pop(k)
    p = meta["params"]
    p.pop("rounds"), p.pop("order"), p.pop("calib_splits")
    p["tokens"], p["repeats"] = 3, 2
    meta["tokens"] = [[c, d, r // 3, r % 3, ps, w] for c, d, r, ps, _, w in meta["tokens"] if ps != "calibration"]
    for c in meta["contexts"]:
        for k in ("plain_ms_ci", "overhead_ratio_ci", "stage_ms_ci", "stage_ms_calibrated_ci", "sync_us_ci",
                  "calibrated_sum_pct"):
            c.pop(k)
    if edit:
        edit(meta)
    ops = run.ops.assign(repeat=run.ops["round"] // 3, step=run.ops["round"] % 3).drop(columns=["round"])
    t = pa.Table.from_pandas(ops, preserve_index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t.replace_schema_metadata({store.META_KEY: json.dumps(meta).encode()}), path)
    return meta
