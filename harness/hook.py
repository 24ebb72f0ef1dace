"""The eval callback that capture hands to llama.cpp: a native (C) hook, or a Python one.

Both classes have one interface, so ``harness.capture`` never asks which one it holds:

- ``callback``, ``user_data``: what ``engine.Context`` passes as ``cb_eval`` / ``cb_eval_user_data``;
- ``set_ask(ask)``: the ask table for timed steps (``ask[i]``: stop and time after node i; nodes
  past the table are asked, so a grown graph shows up as extra marks);
- ``reset(discovering)``: start a step; while discovering, every node's address is handed to
  ``on_node(address: int)`` (the constructor's argument) in graph order and no node is asked;
- ``n_seen`` (asks this step), ``t_first`` (clock at the first ask, ns) and ``marks()``
  (``[(node_index, t_ns), ...]`` of the observed nodes, in order) read the step back.

The native hook is ``harness/native/eval_hook.c``, compiled once with the system C compiler into
the per-user cache (``$XDG_CACHE_HOME/decode-harness``, the source digest in the file name).
Without a compiler, or with ``HARNESS_PYTHON_CALLBACK=1``, ``make_hook`` falls back to the Python
hook, which does the same bookkeeping at a higher cost per node.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from harness.engine import EvalCallback
from harness.fsutil import cache_dir

log = logging.getLogger(__name__)

NodeFn = Callable[[int], None]
_NODE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class PythonHook:
    """The eval callback as a ctypes Python function."""

    backend = "python"

    def __init__(self, on_node: NodeFn):
        self._on_node = on_node
        self._ask: list[bool] = []
        self._discovering = False
        self._i = 0
        self._t_first = 0
        self._marks: list[tuple[int, int]] = []
        self.callback = EvalCallback(self._cb)
        self.user_data = None

    # Runs on llama.cpp's thread in the middle of graph compute: keep it tiny and never let an
    # exception escape (ctypes would print it and return False, which aborts the compute).
    def _cb(self, t, ask, _user_data):
        if ask:
            i = self._i
            self._i = i + 1
            if i == 0:
                self._t_first = time.perf_counter_ns()
            if self._discovering:
                try:
                    self._on_node(t)
                except Exception:  # noqa: BLE001 - must not raise into C
                    log.exception("discovery could not read node %d", i)
                return False
            return self._ask[i] if i < len(self._ask) else True
        self._marks.append((self._i - 1, time.perf_counter_ns()))
        return True

    def set_ask(self, ask: list[bool]) -> None:
        self._ask = list(ask)

    def reset(self, discovering: bool = False) -> None:
        self._i = 0
        self._marks = []
        self._discovering = discovering

    @property
    def n_seen(self) -> int:
        return self._i

    @property
    def t_first(self) -> int:
        return self._t_first

    def marks(self) -> list[tuple[int, int]]:
        return list(self._marks)


class _HookState(ctypes.Structure):
    """Mirror of ``struct hook`` in native/eval_hook.c."""

    _fields_ = [("ask", ctypes.POINTER(ctypes.c_uint8)), ("n_ask", ctypes.c_int64), ("i", ctypes.c_int64),
                ("t_first", ctypes.c_int64), ("mark_node", ctypes.POINTER(ctypes.c_int64)),
                ("mark_t", ctypes.POINTER(ctypes.c_int64)), ("n_marks", ctypes.c_int64),
                ("cap_marks", ctypes.c_int64), ("discovering", ctypes.c_int32), ("on_node", _NODE_FN)]


def _build(src: Path, lib: Path) -> bool:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        log.info("no C compiler found: using the Python eval callback (higher capture overhead)")
        return False
    tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")  # per process: concurrent builds never mix
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)], check=True,
                       capture_output=True, timeout=60)
        os.replace(tmp, lib)
    except (OSError, subprocess.SubprocessError) as e:
        detail = e.stderr.decode(errors="replace").strip() if isinstance(e, subprocess.CalledProcessError) else e
        log.info("could not build the native eval hook (%s): using the Python callback", detail)
        tmp.unlink(missing_ok=True)
        return False
    return True


def load_native_library() -> ctypes.CDLL | None:
    """The compiled native hook (built on first use), or None when it cannot be had."""
    if os.environ.get("HARNESS_PYTHON_CALLBACK"):
        log.info("HARNESS_PYTHON_CALLBACK is set: using the Python eval callback")
        return None
    with resources.as_file(resources.files("harness") / "native" / "eval_hook.c") as src:
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
        lib = cache_dir() / f"eval_hook_{digest}.so"
        if not lib.exists() and not _build(src, lib):
            return None
    try:
        dll = ctypes.CDLL(str(lib))
    except OSError as e:
        log.info("could not load the native eval hook (%s): using the Python callback", e)
        return None
    dll.harness_hook_size.restype = ctypes.c_int64
    if dll.harness_hook_size() != ctypes.sizeof(_HookState):
        log.warning("native eval hook state is %d bytes, expected %d: using the Python callback",
                    dll.harness_hook_size(), ctypes.sizeof(_HookState))
        return None
    return dll


class NativeHook:
    """The C eval callback plus its state; Python runs only for discovery."""

    backend = "native"
    _lib: ctypes.CDLL | None = None
    _tried = False

    @classmethod
    def available(cls) -> bool:
        if not cls._tried:
            cls._lib, cls._tried = load_native_library(), True
        return cls._lib is not None

    def __init__(self, on_node: NodeFn):
        if not self.available():
            raise RuntimeError("native eval hook unavailable")
        self._on_node = on_node
        self._node_fn = _NODE_FN(self._discover)  # keep the thunk alive with the hook
        self._ask = (ctypes.c_uint8 * 1)()
        self.state = _HookState(ask=self._ask, n_ask=0, on_node=self._node_fn)
        self._reserve(1 << 12)
        self.callback = ctypes.cast(self._lib.harness_eval_hook, EvalCallback)
        self.user_data = ctypes.cast(ctypes.pointer(self.state), ctypes.c_void_p)

    def _discover(self, t) -> None:
        try:
            self._on_node(t)
        except Exception:  # noqa: BLE001 - must not raise into C
            log.exception("discovery could not read node %d", self.state.i - 1)

    def _reserve(self, n: int) -> None:
        self._nodes = (ctypes.c_int64 * n)()
        self._times = (ctypes.c_int64 * n)()
        self.state.mark_node, self.state.mark_t, self.state.cap_marks = self._nodes, self._times, n

    def set_ask(self, ask: list[bool]) -> None:
        self._ask = (ctypes.c_uint8 * max(1, len(ask)))(*[1 if a else 0 for a in ask])
        self.state.ask = self._ask
        self.state.n_ask = len(ask)
        if self.state.cap_marks < len(ask) + 64:  # room for every node plus a grown graph's extras
            self._reserve(len(ask) + 64)

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


Hook = PythonHook | NativeHook


def make_hook(on_node: NodeFn, native: bool | None = None) -> Hook:
    """The native hook when ``native`` is true, or None and it can be built; else the Python one."""
    use_native = NativeHook.available() if native is None else native
    return NativeHook(on_node) if use_native else PythonHook(on_node)
