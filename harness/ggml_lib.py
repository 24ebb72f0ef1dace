"""Raw ctypes bindings to the ggml library that llama-cpp-python ships, and the few llama.cpp
calls its Python bindings leave out (threadpools). Part of ``harness.engine``; use it from there.

Declarations only: functions are looked up on first use (as private prototypes, so the shared
library handles of ``llama_cpp`` are never modified) and nothing is called at import.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llama_cpp
import llama_cpp._ggml as _llama_ggml
import llama_cpp.llama_cpp as _llama_raw

from harness.errors import EngineError

log = logging.getLogger(__name__)

GGML_MAX_SRC = 10
GGML_MAX_N_THREADS = 512
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR = 3, 4  # enum ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT
_p, _sz, _i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64


class InitParams(ctypes.Structure):  # struct ggml_init_params (ggml.h)
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class ThreadpoolParams(ctypes.Structure):  # struct ggml_threadpool_params (ggml.h)
    _fields_ = [("cpumask", ctypes.c_bool * GGML_MAX_N_THREADS), ("n_threads", ctypes.c_int),
                ("prio", ctypes.c_int), ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool),
                ("paused", ctypes.c_bool)]


class _Feature(ctypes.Structure):  # struct ggml_backend_feature (ggml-backend.h)
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


class _Lib:
    """Functions of one shared library, bound from a signature table on first use."""

    def __init__(self, handle: Callable[[], ctypes.CDLL], sigs: dict[str, tuple[Any, list]]):
        self._handle, self._sigs = handle, sigs

    def __getattr__(self, name: str):
        if name not in self._sigs:
            raise AttributeError(name)
        restype, argtypes = self._sigs[name]
        fn = ctypes.CFUNCTYPE(restype, *argtypes)((name, self._handle()))
        setattr(self, name, fn)
        return fn


ggml = _Lib(lambda: _llama_ggml.libggml, {
    "ggml_op_desc": (ctypes.c_char_p, [_p]), "ggml_op_name": (ctypes.c_char_p, [ctypes.c_int]),
    "ggml_type_name": (ctypes.c_char_p, [ctypes.c_int]), "ggml_get_name": (ctypes.c_char_p, [_p]),
    "ggml_set_name": (_p, [_p, ctypes.c_char_p]), "ggml_nbytes": (_sz, [_p]), "ggml_nelements": (_i64, [_p]),
    "ggml_type_size": (_sz, [ctypes.c_int]), "ggml_tensor_overhead": (_sz, []), "ggml_init": (_p, [InitParams]),
    "ggml_free": (None, [_p]), "ggml_new_tensor_2d": (_p, [_p, ctypes.c_int, _i64, _i64]),
    "ggml_mul_mat": (_p, [_p, _p, _p]), "ggml_transpose": (_p, [_p, _p]),
    "ggml_threadpool_params_init": (None, [ctypes.POINTER(ThreadpoolParams), ctypes.c_int]),
    "ggml_threadpool_pause": (None, [_p]),
    "ggml_backend_reg_by_name": (_p, [ctypes.c_char_p]),
    "ggml_backend_reg_get_proc_address": (_p, [_p, ctypes.c_char_p]),
    "ggml_backend_dev_count": (_sz, []), "ggml_backend_dev_get": (_p, [_sz]),
    "ggml_backend_dev_name": (ctypes.c_char_p, [_p]), "ggml_backend_dev_description": (ctypes.c_char_p, [_p]),
    "ggml_backend_buffer_is_host": (ctypes.c_bool, [_p]),
})
llama = _Lib(lambda: _llama_raw._lib, {"llama_attach_threadpool": (None, [_p, _p, _p])})


# ---------------------------------------------------------------- tensors
@dataclass(frozen=True)
class TensorInfo:
    """One tensor as ggml sees it: shape ``ne`` and strides ``nb`` (4 dims), ``nbytes`` from
    ``ggml_nbytes`` (the span its data covers), and the tensor it views ('' when it owns its data)."""

    name: str
    op: str
    type: str
    ne: tuple[int, int, int, int]
    nb: tuple[int, int, int, int]
    nbytes: int
    view_src: str
    visible: int | None = None  # a KQ mask (attn_inp_kq_mask*): cells of its first row that are not -inf
    visible_runs: tuple[tuple[int, int], ...] = ()  # those cells as [start, end) runs


_NEG_INF = {"f16": (2, "H", 0xFC00), "f32": (4, "I", 0xFF800000)}  # the bit patterns of -inf


def mask_runs(name: str, type_name: str, ne0: int, data: int | None, buffer: int | None) -> tuple | None:
    """The cells of the first row of a KQ mask that are not -inf, as [start, end) runs: the cells the CPU
    flash-attention kernel visits (``ggml_compute_forward_flash_attn_ext_f16_one_chunk`` skips -inf; where
    they sit decides how its split-KV path shares them between threads). Inputs are set before the graph
    computes, so the mask is readable while the eval callback is asked, if it sits in host memory
    (``ggml_backend_buffer_is_host``; a GPU's copy is not read). None for other tensors."""
    if not name.startswith("attn_inp_kq_mask") or type_name not in _NEG_INF or not data or not buffer:
        return None
    if not ggml.ggml_backend_buffer_is_host(buffer):
        return None
    size, code, neg_inf = _NEG_INF[type_name]
    vals = struct.unpack(f"<{ne0}{code}", ctypes.string_at(data, ne0 * size)) + (neg_inf,)
    edges = [i for i in range(ne0 + 1) if (vals[i] != neg_inf) != (i > 0 and vals[i - 1] != neg_inf)]
    return tuple(zip(edges[::2], edges[1::2], strict=True))


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def tensor_info(addr: int, s: ctypes.Structure) -> TensorInfo:
    """A tensor read through engine's ``_GGMLTensor`` struct ``s`` at ``addr``."""
    g = ggml
    name, type_name = _text(s.name), _text(g.ggml_type_name(s.type))
    runs = mask_runs(name, type_name, int(s.ne[0]), s.data, s.buffer)
    return TensorInfo(name=name, op=_text(g.ggml_op_desc(addr)), type=type_name, ne=tuple(s.ne), nb=tuple(s.nb),
                      nbytes=int(g.ggml_nbytes(addr)), view_src=_text(s.view_src.contents.name) if s.view_src else "",
                      visible=None if runs is None else sum(e - b for b, e in runs), visible_runs=runs or ())


def sources(src) -> tuple[TensorInfo | None, ...]:
    """A node's ``src`` slots in order; trailing empty slots dropped, empty ones in between None."""
    out = [tensor_info(ctypes.addressof(s.contents), s.contents) if s else None for s in src]
    while out and out[-1] is None:
        out.pop()
    return tuple(out)


def fill_batch(b: llama_cpp.llama_batch, tokens: list[int], pos0: int) -> None:
    """One sequence (0) of consecutive positions from pos0; logits for the last token only."""
    n = len(tokens)
    for i, tok in enumerate(tokens):
        b.token[i] = tok
        b.pos[i] = pos0 + i
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = 0
        b.logits[i] = i == n - 1
    b.n_tokens = n


# ---------------------------------------------------------------- logging bridge (installed by engine.init_backend)
_llama_log = logging.getLogger("harness.llama_cpp")
_recent_errors: deque[str] = deque(maxlen=8)


@llama_cpp.llama_log_callback
def log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    msg = text.decode("utf-8", "replace").rstrip()
    if msg:
        _llama_log.debug("%s", msg)
        if level in (GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR):  # shown in EngineError's message (last_error)
            _recent_errors.append(msg)


def last_error() -> str:
    """The last warning or error llama.cpp logged, preferring one that names the error (not "failed to load")."""
    named = [m for m in _recent_errors if "error" in m.lower()]
    return (named or list(_recent_errors) or ["no message from llama.cpp"])[-1]


def _cpu_proc(name: str, proto):
    """A function of the CPU backend by name, as llama.cpp itself finds it (works with dynamic backends)."""
    reg = ggml.ggml_backend_reg_by_name(b"CPU")
    addr = ggml.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
    return proto(addr) if addr else None


def cpu_features() -> dict[str, str]:
    """The CPU backend's build features (``ggml_backend_get_features``), e.g. {'AVX2': '1', 'OPENMP': '1'}."""
    get = _cpu_proc("ggml_backend_get_features", ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), _p))
    if get is None:
        return {}
    feats, out = get(ggml.ggml_backend_reg_by_name(b"CPU")), {}
    for f in feats:
        if not f.name:
            break
        out[f.name.decode()] = (f.value or b"").decode()
    return out


def openmp_enabled() -> bool:
    feats = cpu_features()
    if feats:
        return feats.get("OPENMP") == "1"
    return re.search(r"\bOPENMP = 1\b", llama_cpp.llama_print_system_info().decode(errors="replace")) is not None


def backend_devices() -> list[str]:
    """Names and descriptions of the ggml backend devices llama.cpp sees (e.g. 'CPU: AMD EPYC')."""
    try:
        devs = [ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count())]
        return [f"{ggml.ggml_backend_dev_name(d).decode()}: {ggml.ggml_backend_dev_description(d).decode()}"
                for d in devs]
    except AttributeError:  # a ggml without the device registry
        return []


# ---------------------------------------------------------------- threadpools
def threadpool_new(n_threads: int) -> int | None:
    """A persistent ggml CPU threadpool (created paused), or None if this build cannot make one."""
    try:
        new = _cpu_proc("ggml_threadpool_new", ctypes.CFUNCTYPE(_p, ctypes.POINTER(ThreadpoolParams)))
        params = ThreadpoolParams()
        ggml.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
    except AttributeError as e:
        log.info("no ggml threadpool API (%s): llama.cpp makes its own threads per graph", e)
        return None
    params.paused = True  # as llama-cli starts its pools: no polling before the first graph
    tp = new(ctypes.byref(params)) if new else None
    if not tp:
        log.info("could not create a ggml threadpool of %d threads: llama.cpp makes its own per graph", n_threads)
        return None
    return tp


def threadpool_free(tp: int) -> None:
    free = _cpu_proc("ggml_threadpool_free", ctypes.CFUNCTYPE(None, _p))
    if free:
        free(tp)


def threadpool_pause(tp: int) -> None:
    """Park the pool's workers on a condition variable (without OpenMP they poll for work a while
    after each graph); the next graph wakes them. A no-op in OpenMP builds."""
    with contextlib.suppress(AttributeError):
        ggml.ggml_threadpool_pause(tp)


def attach_new_threadpool(ctx: int, n_threads: int) -> int | None:
    """Attach a new threadpool to a llama context (for single-token and batch decodes alike)."""
    tp = threadpool_new(n_threads)
    if tp:
        llama.llama_attach_threadpool(ctx, tp, tp)
    return tp


# ---------------------------------------------------------------- struct layout self-check
def check_tensor_layout(cls: type[ctypes.Structure]) -> None:
    """Read tensors that ggml itself builds through ``cls`` and compare with ggml's accessors.

    Raises EngineError naming the first field that disagrees: reading graph nodes through a
    wrong layout would give garbage (or crash), so a run refuses to start instead.
    """
    ctx = ggml.ggml_init(InitParams(16 * ggml.ggml_tensor_overhead(), None, True))
    if not ctx:
        raise EngineError("ggml_init failed: cannot check the ggml_tensor layout")
    try:
        a = ggml.ggml_new_tensor_2d(ctx, GGML_TYPE_F16, 64, 3)
        b = ggml.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 64, 5)
        ggml.ggml_set_name(a, b"harness_layout_a")
        ggml.ggml_set_name(b, b"harness_layout_b")
        c = ggml.ggml_mul_mat(ctx, a, b)
        d = ggml.ggml_transpose(ctx, b)
        f16, f32 = ggml.ggml_type_size(GGML_TYPE_F16), ggml.ggml_type_size(GGML_TYPE_F32)
        expected = ((a, GGML_TYPE_F16, (64, 3, 1, 1), (f16, 64 * f16)),
                    (b, GGML_TYPE_F32, (64, 5, 1, 1), (f32, 64 * f32)),
                    (c, GGML_TYPE_F32, (3, 5, 1, 1), (f32, 3 * f32)),
                    (d, GGML_TYPE_F32, (5, 64, 1, 1), (64 * f32, f32)))  # a transposed view of b
        for t, ty, ne, nb01 in expected:
            s = ctypes.cast(t, ctypes.POINTER(cls)).contents
            _expect("type", s.type, ty)
            _expect("ne", tuple(s.ne), ne)
            _expect("nb", (s.nb[0], s.nb[1]), nb01)
            _expect("name", s.name, ggml.ggml_get_name(t))
            _expect("nelements", s.ne[0] * s.ne[1] * s.ne[2] * s.ne[3], ggml.ggml_nelements(t))
            _expect("op", s.op, _op_index(ggml.ggml_op_desc(t)))
            _expect("nbytes", max(s.nb[0] * s.ne[0], s.nb[1] * s.ne[1]), ggml.ggml_nbytes(t))
        sc = ctypes.cast(c, ctypes.POINTER(cls)).contents
        _expect("src", [ctypes.cast(sc.src[i], ctypes.c_void_p).value for i in range(3)], [a, b, None])
        sd = ctypes.cast(d, ctypes.POINTER(cls)).contents
        _expect("view_src", ctypes.cast(sd.view_src, ctypes.c_void_p).value, b)
    finally:
        ggml.ggml_free(ctx)


def _op_index(desc: bytes) -> int:
    """The enum value of an op by its name, scanning up from GGML_OP_NONE = 0 (never past it)."""
    for i in range(1024):
        if ggml.ggml_op_name(i) == desc:
            return i
    raise EngineError(f"ggml has no op named {desc.decode()!r}")


def _expect(field: str, got, want) -> None:
    if got != want:
        raise EngineError(f"llama-cpp-python {llama_cpp.__version__}: the ggml_tensor layout differs from the "
                          f"one harness.engine reads ({field}: read {got!r}, ggml says {want!r}); "
                          "use the llama-cpp-python version pinned in pyproject.toml")
