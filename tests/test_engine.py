"""Engine adapter, eval hooks and capture through the real llama.cpp on the tiny twin."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from harness import engine, stages
from harness.capture import Capture
from harness.errors import EngineError
from harness.hook import NativeHook

PROMPT = list(range(300, 316))
TOKEN = 400


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


@pytest.fixture(scope="module")
def model(tiny_gguf):
    with engine.Model(tiny_gguf) as m:
        yield m


def _profiled(model, mode="stages", native=None, asks=None, **cfg):
    """A capture and its discovered context (the caller closes the context)."""
    cap = Capture(mode, native=native, asks=asks)
    ctx = engine.Context(model, engine.EngineConfig(threads=2, n_ctx=64, **cfg), cap.callback, cap.user_data)
    ctx.prefill(PROMPT)
    cap.discover(ctx, TOKEN)
    return cap, ctx


def _bounds(p):
    return [(g.node_first, g.node_last) for g in p.segments]


def _check_segments(p, n_nodes):
    segs = p.segments
    assert segs and segs[0].node_first == 0 and segs[-1].node_last == n_nodes - 1
    for a, b in zip(segs, segs[1:], strict=False):
        assert b.node_first == a.node_last + 1  # contiguous, in order, no overlap
    assert all(g.node_first <= g.node_last and g.time_ns >= 0 for g in segs)
    covered = sum(g.time_ns for g in segs)
    assert covered <= p.wall_ns and p.host_ns == p.wall_ns - covered
    assert p.n_splits == len(segs)


# ---------------------------------------------------------------- start-up
def test_import_has_no_side_effects():
    code = ("import llama_cpp\ncalls = []\n"
            "llama_cpp.llama_backend_init = lambda: calls.append('backend_init')\n"
            "llama_cpp.llama_log_set = lambda *a: calls.append('log_set')\n"
            "import harness.engine, harness.capture, harness.hook\n"
            "assert calls == [] and not harness.engine._backend_ready, calls\n"
            "assert not harness.hook.NativeHook._tried  # nothing compiled at import\n"
            "harness.engine.init_backend(); harness.engine.init_backend()\n"
            "assert calls == ['log_set', 'backend_init'] and harness.engine._backend_ready, calls\n")
    r = _python(code)
    assert r.returncode == 0, r.stderr


def test_layout_check_passes_on_this_build(model):
    assert engine._backend_ready
    engine.check_layout()


def _shifted(extra_head: list, op_params: int = 16):
    class Wrong(ctypes.Structure):
        pass

    Wrong._fields_ = [*extra_head, ("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                      ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int),
                      ("op_params", ctypes.c_int32 * op_params), ("flags", ctypes.c_int32),
                      ("src", ctypes.POINTER(Wrong) * 10), ("view_src", ctypes.c_void_p),
                      ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]
    return Wrong


@pytest.mark.parametrize("wrong", [_shifted([("pad", ctypes.c_int64)]), _shifted([], op_params=14)],
                         ids=["shifted-head", "short-op-params"])
def test_layout_check_fails_on_wrong_struct(model, monkeypatch, wrong):
    monkeypatch.setattr(engine, "_GGMLTensor", wrong)
    with pytest.raises(EngineError, match="ggml_tensor layout differs") as e:
        engine.check_layout()
    msg = str(e.value)
    assert "\n" not in msg and f"llama-cpp-python {engine.engine_version()}" in msg


def test_threadpool_attached_and_openmp_reported(model):
    cfg = engine.EngineConfig(threads=2, n_ctx=32)
    with engine.Context(model, cfg) as ctx:
        assert ctx.threadpool_attached
        ctx.prefill(PROMPT[:4])
        assert ctx.step(TOKEN) > 0
    assert not ctx.threadpool_attached  # freed with the context
    with engine.Context(model, engine.EngineConfig(threads=2, n_ctx=32, threadpool=False)) as ctx:
        assert not ctx.threadpool_attached
    assert engine.openmp_enabled() == ("OPENMP = 1" in engine.system_info())


def test_cache_types_are_ggml_type_ids():
    assert engine.CACHE_TYPES == {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6,
                                  "q5_1": 7}


# ---------------------------------------------------------------- hooks
def test_hook_fallbacks(tmp_path):
    check = "from harness.capture import Capture; print(Capture().backend)"
    r = _python(check, HARNESS_PYTHON_CALLBACK="1", XDG_CACHE_HOME=str(tmp_path / "a"))
    assert r.returncode == 0 and r.stdout.strip() == "python", r.stderr
    empty = tmp_path / "bin"
    empty.mkdir()
    r = _python(check, PATH=str(empty), CC="no-such-cc", XDG_CACHE_HOME=str(tmp_path / "b"))
    assert r.returncode == 0 and r.stdout.strip() == "python", r.stderr
    assert not (tmp_path / "b" / "decode-harness").exists() or not any((tmp_path / "b" / "decode-harness").iterdir())
    r = _python(check, XDG_CACHE_HOME=str(tmp_path / "c"))  # a fresh cache: built once, named by its digest
    assert r.returncode == 0 and r.stdout.strip() == "native", r.stderr
    assert [p.name[:10] for p in (tmp_path / "c" / "decode-harness").iterdir()] == ["eval_hook_"]


def test_native_and_python_hooks_agree(model):
    if not NativeHook.available():
        pytest.skip("no C compiler: native hook unavailable")
    got = {}
    for native in (True, False):
        cap, ctx = _profiled(model, native=native)
        with ctx:
            p = cap.step(ctx, TOKEN)
        assert cap.backend == ("native" if native else "python")
        _check_segments(p, len(cap.nodes))
        got[native] = (len(cap.nodes), cap.syncs_per_token, _bounds(p), [n.name for n in cap.nodes])
    assert got[True] == got[False]


# ---------------------------------------------------------------- capture
@pytest.mark.parametrize("mode", ["stages", "ops"])
def test_segments_cover_the_graph_in_order(model, mode):
    cap, ctx = _profiled(model, mode=mode)
    with ctx:
        for _ in range(2):
            p = cap.step(ctx, TOKEN)
            _check_segments(p, len(cap.nodes))
            assert len(p.segments) == cap.syncs_per_token
        if mode == "ops":
            assert cap.step(ctx, TOKEN, extra_splits=5).n_splits == len(cap.nodes)  # nothing left to ask
        assert cap.calibrate(ctx, TOKEN, steps=1) > 0
        assert len(cap.step(ctx, TOKEN).segments) == cap.syncs_per_token  # calibrate left the table alone


def test_extra_splits_add_exactly_k_boundaries(model):
    cap, ctx = _profiled(model)
    with ctx:
        base = _bounds(cap.step(ctx, TOKEN))
        base_ends = {last for _, last in base}
        for k in (1, 3, 10, 40):
            p = cap.step(ctx, TOKEN, extra_splits=k)
            _check_segments(p, len(cap.nodes))
            assert len(p.segments) == len(base) + k and p.n_splits == len(base) + k
            ends = {g.node_last for g in p.segments}
            extra = sorted(ends - base_ends)
            assert base_ends <= ends and len(extra) == k
            assert extra == sorted({g.node_last for g in cap.step(ctx, TOKEN, extra_splits=k).segments} - base_ends)
            for i in extra:  # inside a stage run, on a node that computes something
                assert cap.stages[i] == cap.stages[i + 1] and cap.nodes[i].op not in stages.NOOP_OPS
            if k > 1:  # spread through the graph, not bunched at one end
                assert extra[0] < len(cap.nodes) // 2 < extra[-1]
        assert len(cap.step(ctx, TOKEN).segments) == len(base)
        with pytest.raises(ValueError):
            cap.step(ctx, TOKEN, extra_splits=-1)


def test_an_ask_rule_replaces_the_modes_table(model):
    def around_attention(st):  # the rule bench/locate.py uses: a boundary wherever attn_kv starts or ends
        return [i == len(st) - 1 or (st[i] == stages.ATTN_KV) != (st[i + 1] == stages.ATTN_KV) for i in range(len(st))]

    cap, ctx = _profiled(model, asks=around_attention)
    with ctx:
        p = cap.step(ctx, TOKEN)
        _check_segments(p, len(cap.nodes))
        want = [i for i, a in enumerate(around_attention(cap.stages)) if a]
        assert [g.node_last for g in p.segments] == want and cap.syncs_per_token == len(want)
        kinds = [cap.stages[g.node_last] == stages.ATTN_KV for g in p.segments]
        assert any(kinds) and all(a != b for a, b in zip(kinds, kinds[1:], strict=False))  # attention, the rest, ...
        assert len(cap.step(ctx, TOKEN, extra_splits=3).segments) == len(want) + 3
    for bad in (lambda st: [True] * (len(st) - 1), lambda st: [True] * (len(st) - 1) + [False]):
        cap = Capture(asks=bad)
        with engine.Context(model, engine.EngineConfig(threads=2, n_ctx=64), cap.callback, cap.user_data) as ctx:
            ctx.prefill(PROMPT)
            with pytest.raises(ValueError, match="ask table"):
                cap.discover(ctx, TOKEN)


def test_named_rules_change_the_table_token_by_token(model):
    def last(st):
        return [i == len(st) - 1 for i in range(len(st))]

    cap = Capture(rules={"last": last})
    with engine.Context(model, engine.EngineConfig(threads=2, n_ctx=64), cap.callback, cap.user_data) as ctx:
        ctx.prefill(PROMPT)
        cap.discover(ctx, TOKEN)
        base = _bounds(cap.step(ctx, TOKEN))
        for rule in ("last", None, "last", "last"):  # the same context, the table chosen per token
            p = cap.step(ctx, TOKEN, rule=rule)
            _check_segments(p, len(cap.nodes))
            assert _bounds(p) == ([(0, len(cap.nodes) - 1)] if rule else base) and p.n_splits == len(p.segments)
        assert len(cap.step(ctx, TOKEN, extra_splits=2).segments) == len(base) + 2  # the mode's table, still
        for bad in ({"rule": "bogus"}, {"rule": "last", "extra_splits": 1}):
            with pytest.raises(ValueError, match="rule must be one of"):
                cap.step(ctx, TOKEN, **bad)
    for name in ("all", 0):
        with pytest.raises(ValueError, match="rule names are strings"):
            Capture(rules={name: last})
    cap = Capture(rules={"short": lambda st: [True] * (len(st) - 1)})
    with engine.Context(model, engine.EngineConfig(threads=2, n_ctx=64), cap.callback, cap.user_data) as ctx:
        ctx.prefill(PROMPT)
        with pytest.raises(ValueError, match="ask table"):
            cap.discover(ctx, TOKEN)


def test_graph_nodes_carry_source_shapes(model):
    cap, ctx = _profiled(model)
    ctx.close()
    mm = [n for n in cap.nodes if n.op == "MUL_MAT" and n.srcs and n.srcs[0].name.endswith(".weight")]
    assert mm
    for n in mm:
        w, x = n.srcs[0], n.srcs[1]
        assert n.src0 == w.name and n.src1 == x.name
        assert w.nbytes > 0 and w.type and w.op == "NONE" and w.view_src == ""
        assert w.ne[0] == x.ne[0] and n.ne[0] == w.ne[1] and n.type == "f32" and n.nbytes > 0
        assert len(n.ne) == len(w.nb) == 4
    assert {w.srcs[0].type for w in mm} & {"q4_K", "q6_K", "q5_K", "q8_0", "f16", "f32"}
    views = [n for n in cap.nodes if n.op == "VIEW" and n.name.startswith("cache_k_l0")]
    assert views and all(v.view_src == "cache_k_l0" for v in views)
    assert all(len(n.srcs) <= 10 for n in cap.nodes)
    assert all(n.src0 == (n.srcs[0].name if n.srcs and n.srcs[0] else "") for n in cap.nodes)


def test_llama_cpp_says_why_a_load_failed(tmp_path):
    """ggml's log levels are WARN 3 and ERROR 4 (INFO is 2): the line that names the error reaches the message,
    not llama.cpp's closing "failed to load model" nor an INFO line."""
    import gguf
    import numpy as np

    path = tmp_path / "bad-arch.gguf"
    w = gguf.GGUFWriter(str(path), "nonesuch")  # an architecture llama.cpp does not know
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EngineError, match=r"\(llama_model_load: error loading model: unknown model architecture: "
                                          r"'nonesuch'\)"):
        engine.Model(path)
