"""Twins: layouts follow llama.cpp's recipe, files are shape-faithful, and llama.cpp runs them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import run_cli

from harness.gguf_model import read_model
from harness.presets import PRESETS, layout, type_nbytes, use_more_bits


def _types(preset: str, quant: str) -> dict[str, str]:
    return {n: t for n, _s, t in layout(PRESETS[preset], quant)}


def test_use_more_bits_matches_llama_quant_for_35_layers():
    # i < 35/8=4, i >= 7*35/8=30, or (i - 4) % 3 == 2
    assert [i for i in range(35) if use_more_bits(i, 35)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27,
                                                              30, 31, 32, 33, 34]


def test_e4b_q4_k_m_layout():
    p = PRESETS["gemma-3n-e4b"]
    types = _types("gemma-3n-e4b", "q4_k_m")
    assert p.n_layer == 35 and p.n_embd == 2048 and p.n_ff == 16384 and p.n_vocab == 262400
    assert types["token_embd.weight"] == "Q6_K"  # tied output: Q6_K
    assert types["per_layer_token_embd.weight"] == "Q6_K"
    assert "output.weight" not in types
    six = [i for i in range(35) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert six == [i for i in range(35) if use_more_bits(i, 35)]
    assert [i for i in range(35) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"] == six
    for i in range(35):
        for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up", "inp_gate", "proj"):
            assert types[f"blk.{i}.{t}.weight"] == "Q4_K", (i, t)
        for t in ("laurel_l", "laurel_r", "altup_router"):
            assert types[f"blk.{i}.{t}.weight"] == "F16"
        for t in ("attn_norm", "ffn_norm", "post_ffw_norm", "altup_correct_scale",
                  "altup_predict_coef", "altup_correct_coef"):  # the coefs: F32, as convert_hf_to_gguf writes them
            assert types[f"blk.{i}.{t}.weight"] == "F32"
    assert types["per_layer_model_proj.weight"] == "F16"
    assert types["altup_proj.weight"] == "F16"
    total = sum(type_nbytes(t, s) for _n, s, t in layout(p, "q4_k_m"))
    assert 4.2e9 <= total <= 4.9e9
    n_params = sum(math.prod(s) for _n, s, _t in layout(p, "q4_k_m"))
    assert 6.8e9 < n_params < 6.95e9


def test_pure_layouts_and_e2b():
    t0 = _types("gemma-3n-e4b", "q4_0")
    assert t0["token_embd.weight"] == "Q4_0" and t0["blk.0.ffn_down.weight"] == "Q4_0"
    assert t0["blk.0.laurel_l.weight"] == "F16"
    assert _types("gemma-3n-e4b", "q8_0")["blk.3.attn_v.weight"] == "Q8_0"
    e2b = PRESETS["gemma-3n-e2b"]
    assert e2b.n_layer == 30 and e2b.n_ff == 8192
    assert sum(1 for n in _types("gemma-3n-e2b", "q4_k_m") if n.endswith("ffn_up.weight")) == 30


def test_tiny_file_matches_preset(tiny_gguf):
    info = read_model(tiny_gguf)
    assert info.arch == "gemma3n" and info.synthetic and info.twin_preset == "tiny"
    expected = [(n, s, t) for n, s, t in layout(PRESETS["tiny"], "q4_k_m")]
    got = [(t.name, t.shape, t.ggml_type) for t in info.tensors]
    assert got == expected
    for t in info.tensors:
        assert t.n_bytes == type_nbytes(t.ggml_type, t.shape)
    # file = header + every tensor padded to the 32-byte alignment
    from gguf import GGUFReader

    r = GGUFReader(tiny_gguf)
    assert info.file_bytes == r.data_offset + sum(-(-t.n_bytes // 32) * 32 for t in info.tensors)
    assert info.n_layer == 25 and info.hparams["attention.sliding_window"] == 32
    assert info.hparams["attention.sliding_window_pattern"] == [i % 5 != 4 for i in range(25)]


def test_tiny_loads_and_decodes_in_llama_cpp(tiny_gguf):
    from harness.engine import Context, EngineConfig, Model

    info = read_model(tiny_gguf)
    with Model(tiny_gguf) as m:
        assert m.desc.startswith("gemma3n")
        assert m.n_vocab == PRESETS["tiny"].n_vocab
        assert m.n_params == info.n_params
        with Context(m, EngineConfig(threads=2, n_ctx=64)) as ctx:
            ctx.prefill(list(range(300, 316)))
            walls = [ctx.step(400) for _ in range(3)]
            assert ctx.n_past == 16  # rolled back after each step
    assert all(math.isfinite(w) and w > 0 for w in walls)


@pytest.mark.parametrize("args, needle", [
    (["--preset", "gemma-9000"], "unknown preset"),
    (["--preset", "tiny", "--quant", "q3_x"], "unknown quant"),
])
def test_bad_twin_arguments(tmp_path, args, needle):
    r = run_cli("harness.twin", *args, "-o", str(tmp_path / "x.gguf"))
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


def test_bad_seed_is_refused_before_anything_is_created(tmp_path):
    r = run_cli("harness.twin", "--preset", "tiny", "--seed", "-1", "-o", str(tmp_path / "new" / "neg.gguf"))
    assert r.returncode == 2 and "seed must be an integer >= 0" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


def test_an_existing_file_is_replaced_only_when_it_is_a_twin(tmp_path, tiny_gguf):
    import gguf

    from harness.twin import is_twin

    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    real = tmp_path / "real.gguf"  # a valid GGUF without harness.synthetic: a real model, as far as we know
    w = gguf.GGUFWriter(str(real), "llama")
    w.add_name("not a twin")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_ti_data_to_file(), w.close()
    assert is_twin(tiny_gguf) and not is_twin(real) and not is_twin(notes) and not is_twin(tmp_path / "none")
    for path in (notes, real):
        before = path.read_bytes()
        r = run_cli("harness.twin", "--preset", "tiny", "-o", str(path))
        assert r.returncode == 2 and "exists and is not a synthetic twin" in r.stderr and "remove it" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and path.read_bytes() == before
    twin = tmp_path / "twin.gguf"
    for seed in ("0", "1"):  # the second run replaces the twin the first wrote
        r = run_cli("harness.twin", "--preset", "tiny", "--seed", seed, "-o", str(twin))
        assert r.returncode == 0, r.stderr
    assert is_twin(twin) and sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf", "real.gguf", "twin.gguf"]


def test_an_output_that_cannot_be_written_is_an_output_error_and_leaves_nothing(tmp_path):
    import resource
    import subprocess
    import sys

    from conftest import ROOT

    r = run_cli("harness.twin", "--preset", "tiny", "-o", "/proc/nope/y.gguf")
    assert r.returncode == 1 and "cannot create output folder" in r.stderr and "Traceback" not in r.stderr

    def small_files():  # a write that fails half-way: the file size limit (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    r = subprocess.run([sys.executable, "-m", "harness.twin", "--preset", "tiny", "-o", str(tmp_path / "a/b/t.gguf")],
                       capture_output=True, text=True, cwd=ROOT, preexec_fn=small_files)
    assert r.returncode == 1 and "cannot write twin" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and not list(tmp_path.iterdir())  # no half-written file, no new folder


def test_list_goes_to_stdout_and_the_default_output_is_the_sweeps_default_model():
    from harness.twin import DEFAULT_MODEL, default_out, twin_bytes

    r = run_cli("harness.twin", "--list")
    assert r.returncode == 0 and r.stdout.splitlines()[0].startswith("gemma-3n-e4b") and "tiny" in r.stdout
    assert default_out("gemma-3n-e4b", "q4_k_m") == DEFAULT_MODEL == Path("models/gemma-3n-e4b-q4.gguf")
    assert default_out("tiny", "q8_0") == Path("models/tiny-q8_0.gguf")
    assert round(twin_bytes("gemma-3n-e4b", "q4_k_m") / 1e9, 2) == 4.85  # the size README states


def test_tiny_twin_size_estimate_is_close(tiny_gguf):
    from harness.twin import twin_bytes

    assert abs(twin_bytes("tiny", "q4_k_m") - tiny_gguf.stat().st_size) < 5_000  # the rest: hparams, padding
