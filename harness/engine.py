"""Engine adapter: every ctypes and llama-cpp-python call of the project lives here.

Layers, as in llama-cpp-python itself: raw bindings (``llama_cpp`` and, in ``harness.ggml_lib``,
the ggml library it ships), then thin wrappers (``Model``, ``Context``, ``GraphNode``), used by
capture and sweep. Importing this module changes nothing: ``init_backend()`` (called by
``Model``) bridges llama.cpp's log into ``logging``, initialises the backend and checks that the
``ggml_tensor`` layout below matches the library, once per process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
from gguf import GGMLQuantizationType as _QT

from harness import ggml_lib
from harness.errors import EngineError, UsageError
from harness.ggml_lib import TensorInfo, backend_devices  # noqa: F401 - part of this module's API

log = logging.getLogger(__name__)

# KV-cache types by their -ctk/-ctv names; the values are ggml type ids
CACHE_TYPES = {name: int(_QT[name.upper()]) for name in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")}
FLASH_ATTN = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}
EvalCallback = llama_cpp.ggml_backend_sched_eval_callback


# ---------------------------------------------------------------- graph nodes
class _GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` (ggml.h of the pinned llama-cpp-python); ``check_layout`` verifies it."""


_GGMLTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GGMLTensor) * ggml_lib.GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(_GGMLTensor)), ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8),
]


@dataclass(frozen=True)
class GraphNode:
    """One graph node: name, op (``ggml_op_desc``), its first two sources' names (what the stage
    rules read), its own type/shape/strides/nbytes/view source, and all its sources in slot order
    (``srcs[i]`` is ``src[i]``; trailing empty slots dropped, an empty slot in between is None)."""

    name: str
    op: str
    src0: str
    src1: str
    type: str = ""
    ne: tuple[int, int, int, int] = (0, 0, 0, 0)
    nb: tuple[int, int, int, int] = (0, 0, 0, 0)
    nbytes: int = 0
    view_src: str = ""
    srcs: tuple[TensorInfo | None, ...] = ()


def read_node(t: int) -> GraphNode:
    """Read a ggml_tensor* (as an int address) handed to the eval callback."""
    p = ctypes.cast(t, ctypes.POINTER(_GGMLTensor))
    me = ggml_lib.tensor_info(t, p.contents)
    srcs = ggml_lib.sources(p.contents.src)
    names = [s.name if s else "" for s in srcs] + ["", ""]
    return GraphNode(name=me.name, op=me.op, src0=names[0], src1=names[1], type=me.type, ne=me.ne, nb=me.nb,
                     nbytes=me.nbytes, view_src=me.view_src, srcs=tuple(srcs))


def check_layout() -> None:
    """Raise EngineError unless ``_GGMLTensor`` reads tensors as this ggml lays them out."""
    ggml_lib.check_tensor_layout(_GGMLTensor)


# ---------------------------------------------------------------- backend, logging bridge
_init_lock = threading.Lock()
_backend_ready = False


def init_backend() -> None:
    """Bridge llama.cpp's log into ``logging``, initialise its backend and check the tensor
    layout. Idempotent and thread-safe; ``Model`` calls it, so every path that loads a model does."""
    global _backend_ready
    with _init_lock:
        if _backend_ready:
            return
        llama_cpp.llama_log_set(ggml_lib.log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        check_layout()
        _backend_ready = True


def system_info() -> str:
    init_backend()
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def engine_version() -> str:
    return llama_cpp.__version__


def openmp_enabled() -> bool:
    """Whether this llama.cpp's CPU backend was built with OpenMP (its threads then come from the
    OpenMP runtime; without it, a ggml threadpool, which ``Context`` keeps for its lifetime)."""
    init_backend()
    return ggml_lib.openmp_enabled()


# ---------------------------------------------------------------- thin wrappers
@dataclass(frozen=True)
class EngineConfig:
    threads: int
    n_ctx: int
    flash_attn: str = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    n_gpu_layers: int = 0
    n_batch: int = 512
    n_ubatch: int = 512
    threadpool: bool = True  # attach a persistent ggml threadpool (see Context)

    def validate(self) -> None:
        if self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")
        if self.flash_attn not in FLASH_ATTN:
            raise UsageError(f"unknown flash-attention value {self.flash_attn!r} (on, off, auto)")
        for which, v in (("k", self.cache_type_k), ("v", self.cache_type_v)):
            if v not in CACHE_TYPES:
                raise UsageError(f"unknown cache type {v!r} for -ctk/-ctv {which} "
                                 f"(choose from: {', '.join(CACHE_TYPES)})")
        if self.n_batch < 1 or self.n_ubatch < 1 or self.n_ubatch > self.n_batch:
            raise UsageError(f"batch and ubatch must be >= 1 and ubatch <= batch (llama.cpp caps ubatch at batch), "
                             f"got -b {self.n_batch} -ub {self.n_ubatch}")


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class Model(_Closing):
    """A llama.cpp model, freed on exit."""

    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 0):
        init_backend()
        self.path = Path(path)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_mmap = True
        self.ptr = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise EngineError(f"llama.cpp could not load the model ({ggml_lib.last_error()}): {self.path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    @property
    def desc(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.ptr, buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    @property
    def n_params(self) -> int:
        return int(llama_cpp.llama_model_n_params(self.ptr))

    @property
    def size_bytes(self) -> int:
        return int(llama_cpp.llama_model_size(self.ptr))

    @property
    def n_vocab(self) -> int:
        return int(llama_cpp.llama_vocab_n_tokens(self.vocab))

    @property
    def n_ctx_train(self) -> int:
        return int(llama_cpp.llama_model_n_ctx_train(self.ptr))

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, False)
        if n < 0:
            raise EngineError("tokenization overflow")
        return list(buf[:n])


class Context(_Closing):
    """A llama.cpp context with its own KV cache; decodes teacher-forced tokens on sequence 0.

    With ``cfg.threadpool`` it owns a ggml threadpool for its life (``threadpool_attached``): builds
    without OpenMP otherwise create and join worker threads on every graph split. The pool is paused
    after each decode, so its workers sleep instead of polling while another context runs.
    """

    def __init__(self, model: Model, cfg: EngineConfig, eval_callback: EvalCallback | None = None,
                 user_data: ctypes.c_void_p | None = None):
        cfg.validate()
        self.model, self.cfg, self.threadpool = model, cfg, None
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = cfg.n_ctx
        p.n_batch = cfg.n_batch
        p.n_ubatch = cfg.n_ubatch
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = cfg.threads
        p.flash_attn_type = FLASH_ATTN[cfg.flash_attn]
        p.type_k = CACHE_TYPES[cfg.cache_type_k]
        p.type_v = CACHE_TYPES[cfg.cache_type_v]
        p.swa_full = False  # as llama-bench and llama-cli set it
        p.no_perf = True
        self._callback = eval_callback  # keep the ctypes thunk alive as long as the context
        if eval_callback is not None:
            p.cb_eval = eval_callback
            p.cb_eval_user_data = user_data
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, p)
        if not self.ptr:
            raise EngineError(f"llama.cpp could not create a context with n_ctx={cfg.n_ctx} "
                              f"({ggml_lib.last_error()}): {model.path}")
        self.threadpool = ggml_lib.attach_new_threadpool(self.ptr, cfg.threads) if cfg.threadpool else None
        self.mem = llama_cpp.llama_get_memory(self.ptr)
        self.batch = llama_cpp.llama_batch_init(cfg.n_batch, 0, 1)
        self.n_past = 0

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ptr", None):
            llama_cpp.llama_free(self.ptr)
            self.ptr = None
        if getattr(self, "threadpool", None):
            ggml_lib.threadpool_free(self.threadpool)  # after the context that used it
            self.threadpool = None

    @property
    def threadpool_attached(self) -> bool:
        return bool(self.threadpool)

    def _decode(self, tokens: list[int], pos0: int) -> int:
        ggml_lib.fill_batch(self.batch, tokens, pos0)
        t0 = time.perf_counter_ns()
        rc = llama_cpp.llama_decode(self.ptr, self.batch)
        llama_cpp.llama_synchronize(self.ptr)
        wall = time.perf_counter_ns() - t0
        if self.threadpool:
            ggml_lib.threadpool_pause(self.threadpool)
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc} at position {pos0}")
        return wall

    def prefill(self, tokens: list[int]) -> float:
        """Append tokens to the cache in n_batch chunks. Returns seconds spent."""
        t0 = time.perf_counter()
        for i in range(0, len(tokens), self.cfg.n_batch):
            chunk = tokens[i:i + self.cfg.n_batch]
            self._decode(chunk, self.n_past)
            self.n_past += len(chunk)
        return time.perf_counter() - t0

    def step(self, token: int) -> int:
        """Decode one token at depth n_past, then roll it back so the depth stays put. Returns wall ns."""
        wall = self._decode([token], self.n_past)
        self.rollback(self.n_past)
        return wall

    def rollback(self, n_past: int) -> None:
        if not llama_cpp.llama_memory_seq_rm(self.mem, 0, n_past, -1):
            raise EngineError(f"could not roll the KV cache back to {n_past}")
        self.n_past = n_past

    def copy_state_from(self, other: Context) -> None:
        """Copy sequence 0's KV cache from another context of the same model."""
        size = llama_cpp.llama_state_seq_get_size(other.ptr, 0)
        buf = (ctypes.c_uint8 * size)()
        got = llama_cpp.llama_state_seq_get_data(other.ptr, buf, size, 0)
        llama_cpp.llama_memory_seq_rm(self.mem, 0, -1, -1)
        if not got or llama_cpp.llama_state_seq_set_data(self.ptr, buf, got, 0) != got:
            raise EngineError("could not copy the KV cache between contexts")
        self.n_past = other.n_past
