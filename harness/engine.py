"""Engine adapter: every ctypes and llama-cpp-python call of the project lives here.

Layers, as in llama-cpp-python itself: raw bindings (``llama_cpp`` and the ggml library it
ships), then thin wrappers (``Model``, ``Context``, ``GraphNode``), used by capture and sweep.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import llama_cpp._ggml as _llama_ggml

from harness.errors import EngineError, UsageError

log = logging.getLogger(__name__)
_llama_log = logging.getLogger("harness.llama_cpp")

CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7}
FLASH_ATTN = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}
EvalCallback = llama_cpp.ggml_backend_sched_eval_callback

# ---------------------------------------------------------------- raw ggml bindings
_ggml = _llama_ggml.libggml  # the ggml library that llama-cpp-python ships
_ggml.ggml_op_desc.argtypes = [ctypes.c_void_p]
_ggml.ggml_op_desc.restype = ctypes.c_char_p


class _GGMLTensor(ctypes.Structure):
    """The head of ``struct ggml_tensor`` (ggml.h), as far as the name: enough to read sources."""


_GGMLTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GGMLTensor) * 10),
    ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
]


@dataclass(frozen=True)
class GraphNode:
    """What capture needs to know of one graph node: its name, op and the names of its sources."""

    name: str
    op: str
    src0: str
    src1: str


def read_node(t: int) -> GraphNode:
    """Read a ggml_tensor* (as an int address) handed to the eval callback."""
    p = ctypes.cast(t, ctypes.POINTER(_GGMLTensor)).contents
    srcs = []
    for i in (0, 1):
        s = p.src[i]
        srcs.append(s.contents.name.decode("utf-8", "replace") if s else "")
    return GraphNode(name=p.name.decode("utf-8", "replace"), op=_ggml.ggml_op_desc(t).decode(),
                     src0=srcs[0], src1=srcs[1])


# ---------------------------------------------------------------- logging bridge
_recent_errors: deque[str] = deque(maxlen=8)


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    msg = text.decode("utf-8", "replace").rstrip()
    if not msg:
        return
    if level in (2, 3):  # WARN, ERROR
        _recent_errors.append(msg)
    _llama_log.debug("%s", msg)


llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()


def _last_error() -> str:
    return _recent_errors[-1] if _recent_errors else "no message from llama.cpp"


def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def engine_version() -> str:
    return llama_cpp.__version__


def backend_devices() -> list[str]:
    """Names and descriptions of the ggml backend devices llama.cpp sees (e.g. 'CPU: AMD EPYC')."""
    lib = _ggml
    try:
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
            fn.argtypes = [ctypes.c_void_p]
            fn.restype = ctypes.c_char_p
        devs = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
        return [f"{lib.ggml_backend_dev_name(d).decode()}: {lib.ggml_backend_dev_description(d).decode()}"
                for d in devs]
    except AttributeError:  # a ggml without the device registry
        return []


# ---------------------------------------------------------------- native eval hook
# A C version of the eval callback: the ask phase is a table lookup and the observe phase a
# clock read into a preallocated array, so no Python runs per graph node while timing. It is
# compiled once with the system C compiler into a per-user cache; without a compiler the
# capture falls back to the Python callback (and the run records which one it used).
_HOOK_SRC = r"""
#include <stdbool.h>
#include <stdint.h>
#include <time.h>
typedef bool (*eval_cb)(void *, bool, void *);
struct hook {
    const uint8_t *ask; int64_t n_ask; int64_t i; int64_t t_first;
    int64_t *mark_node; int64_t *mark_t; int64_t n_marks; int64_t cap_marks;
    int32_t discovering; eval_cb py_cb;
};
static inline int64_t now_ns(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
bool harness_eval_hook(void *t, bool ask, void *ud) {
    struct hook *h = (struct hook *) ud;
    if (h->discovering) { if (ask && h->i++ == 0) h->t_first = now_ns(); return h->py_cb(t, ask, 0); }
    if (ask) {
        int64_t i = h->i++;
        if (i == 0) h->t_first = now_ns();
        return i < h->n_ask ? h->ask[i] != 0 : true;
    }
    if (h->n_marks < h->cap_marks) {
        h->mark_node[h->n_marks] = h->i - 1; h->mark_t[h->n_marks] = now_ns(); h->n_marks++;
    }
    return true;
}
"""


class _Hook(ctypes.Structure):
    _fields_ = [("ask", ctypes.POINTER(ctypes.c_uint8)), ("n_ask", ctypes.c_int64), ("i", ctypes.c_int64),
                ("t_first", ctypes.c_int64), ("mark_node", ctypes.POINTER(ctypes.c_int64)),
                ("mark_t", ctypes.POINTER(ctypes.c_int64)), ("n_marks", ctypes.c_int64),
                ("cap_marks", ctypes.c_int64), ("discovering", ctypes.c_int32), ("py_cb", EvalCallback)]


def _load_hook_library():
    if os.environ.get("HARNESS_PYTHON_CALLBACK"):
        return None
    digest = hashlib.sha256(_HOOK_SRC.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "decode-harness"
    lib = cache / f"eval_hook_{digest}.so"
    if not lib.exists():
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
        if not cc:
            log.info("no C compiler found: using the Python eval callback (higher capture overhead)")
            return None
        try:
            cache.mkdir(parents=True, exist_ok=True)
            src = cache / f"eval_hook_{digest}.{os.getpid()}.c"  # per process: concurrent builds never mix
            src.write_text(_HOOK_SRC)
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)], check=True,
                           capture_output=True, timeout=60)
            os.replace(tmp, lib)
            src.unlink()
        except (OSError, subprocess.SubprocessError) as e:
            log.info("could not build the native eval hook (%s): using the Python callback", e)
            return None
    try:
        return ctypes.CDLL(str(lib))
    except OSError as e:
        log.info("could not load the native eval hook (%s): using the Python callback", e)
        return None


class NativeHook:
    """The C eval callback plus its state; ``discover_cb`` is called for every node while discovering."""

    _lib = None
    _tried = False

    @classmethod
    def available(cls) -> bool:
        if not cls._tried:
            cls._lib, cls._tried = _load_hook_library(), True
        return cls._lib is not None

    def __init__(self, discover_cb: EvalCallback, max_marks: int = 1 << 16):
        if not self.available():
            raise RuntimeError("native eval hook unavailable")
        self._py_cb = discover_cb
        self._nodes = (ctypes.c_int64 * max_marks)()
        self._times = (ctypes.c_int64 * max_marks)()
        self._ask = (ctypes.c_uint8 * 1)()
        self.state = _Hook(ask=self._ask, n_ask=0, mark_node=self._nodes, mark_t=self._times, cap_marks=max_marks,
                           py_cb=discover_cb)
        self.callback = ctypes.cast(self._lib.harness_eval_hook, EvalCallback)
        self.user_data = ctypes.cast(ctypes.pointer(self.state), ctypes.c_void_p)

    def set_ask(self, ask: list[bool]) -> None:
        self._ask = (ctypes.c_uint8 * max(1, len(ask)))(*[1 if a else 0 for a in ask])
        self.state.ask = self._ask
        self.state.n_ask = len(ask)

    def reset(self, discovering: bool = False) -> None:
        self.state.i = 0
        self.state.n_marks = 0
        self.state.discovering = 1 if discovering else 0

    @property
    def n_seen(self) -> int:
        return int(self.state.i)

    @property
    def t_first(self) -> int:
        return int(self.state.t_first)

    def marks(self) -> list[tuple[int, int]]:
        n = int(self.state.n_marks)
        return list(zip(self._nodes[:n], self._times[:n], strict=True))


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

    def validate(self) -> None:
        if self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")
        if self.flash_attn not in FLASH_ATTN:
            raise UsageError(f"unknown flash-attention value {self.flash_attn!r} (on, off, auto)")
        for which, v in (("k", self.cache_type_k), ("v", self.cache_type_v)):
            if v not in CACHE_TYPES:
                raise UsageError(f"unknown cache type {v!r} for -ctk/-ctv {which} "
                                 f"(choose from: {', '.join(CACHE_TYPES)})")
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise UsageError("batch and ubatch must be >= 1")


class Model:
    """A llama.cpp model, freed on exit."""

    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 0):
        self.path = Path(path)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_mmap = True
        self.ptr = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise EngineError(f"llama.cpp could not load the model ({_last_error()}): {self.path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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


class Context:
    """A llama.cpp context with its own KV cache; decodes teacher-forced tokens on sequence 0."""

    def __init__(self, model: Model, cfg: EngineConfig, eval_callback: EvalCallback | None = None,
                 user_data: ctypes.c_void_p | None = None):
        cfg.validate()
        self.model, self.cfg = model, cfg
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = cfg.n_ctx
        p.n_batch = cfg.n_batch
        p.n_ubatch = cfg.n_ubatch
        p.n_seq_max = 1
        p.n_threads = cfg.threads
        p.n_threads_batch = cfg.threads
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
                              f"({_last_error()}): {model.path}")
        self.mem = llama_cpp.llama_get_memory(self.ptr)
        self.batch = llama_cpp.llama_batch_init(cfg.n_batch, 0, 1)
        self.n_past = 0

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ptr", None):
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def _decode(self, tokens: list[int], pos0: int) -> int:
        b = self.batch
        n = len(tokens)
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = i == n - 1
        b.n_tokens = n
        t0 = time.perf_counter_ns()
        rc = llama_cpp.llama_decode(self.ptr, b)
        llama_cpp.llama_synchronize(self.ptr)
        wall = time.perf_counter_ns() - t0
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
