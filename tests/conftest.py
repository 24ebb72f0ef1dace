"""Shared fixtures: small synthetic GGUFs and real sweep runs on them, made once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
