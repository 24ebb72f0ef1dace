"""harness/model_cache.py on a real tiny twin: parsed once per file version, the same ModelInfo from the cache,
and every problem with an entry falls back to a parse."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from harness import gguf_model, model_cache
from harness.errors import InputError


@pytest.fixture
def parses(monkeypatch, tmp_path):
    """The cache on, in a folder of this test's own; counts the real parses."""
    monkeypatch.delenv(model_cache.OFF_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []
    real = gguf_model.read_model
    monkeypatch.setattr(gguf_model, "read_model", lambda p: calls.append(p) or real(p))
    return calls


def test_a_model_is_parsed_once_per_file_version(tiny_gguf, tmp_path, parses):
    model = tmp_path / "m.gguf"
    model.write_bytes(tiny_gguf.read_bytes())
    fresh = model_cache.read_model(model)
    assert len(parses) == 1 and model_cache.entry_path(model).is_file()
    again = model_cache.read_model(str(model))
    assert len(parses) == 1 and again == fresh == gguf_model.ModelInfo.from_dict(fresh.to_dict())
    assert again.path == str(model) and again.n_params == fresh.n_params and again.hparams == fresh.hparams
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed (or was rewritten)
    model_cache.read_model(model)
    assert len(parses) == 2


def test_a_bad_or_unwritable_entry_means_a_parse(tiny_gguf, parses, monkeypatch, caplog):
    entry = model_cache.entry_path(tiny_gguf)
    entry.parent.mkdir(parents=True)
    entry.write_text('{"path": "x", "tensors": [')  # cut short
    info = model_cache.read_model(tiny_gguf)
    assert len(parses) == 1 and info.arch == "gemma3n"
    assert model_cache.read_model(tiny_gguf) == info and len(parses) == 1  # the parse rewrote it
    entry.unlink()
    entry.parent.rmdir()
    entry.parent.write_text("a file where the cache folder goes")  # cannot be written, even as root
    with caplog.at_level(logging.INFO, logger="harness.model_cache"):
        assert model_cache.read_model(tiny_gguf) == info
    assert len(parses) == 2 and "could not cache the model metadata" in caplog.text


def test_off_switch_and_a_non_gguf_file(tiny_gguf, tmp_path, parses, monkeypatch):
    monkeypatch.setenv(model_cache.OFF_ENV, "1")
    model_cache.read_model(tiny_gguf)
    model_cache.read_model(tiny_gguf)
    assert len(parses) == 2 and not (tmp_path / "cache").exists()
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(InputError, match="x.gguf"):
        model_cache.read_model(bad)


def test_the_sweep_reads_its_model_through_the_cache(tiny_gguf, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != model_cache.OFF_ENV}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "harness.sweep", "--model", str(tiny_gguf), "-c", "short", "-r", "1", "--warmup",
           "0", "--no-probe", "--out", str(tmp_path / "runs")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in (tmp_path / "cache" / "decode-harness" / "models").iterdir()] == \
        [model_cache.entry_path(tiny_gguf).name]
