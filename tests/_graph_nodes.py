"""Test-only: read every graph node with its type, shape, bytes and sources (what graph_bytes needs).

Until ``engine.read_node`` carries these fields, tests install ``read_full_node`` in place of
``harness.capture.read_node`` so that ``Capture.nodes`` hold full descriptors. It uses the struct
layout of ``engine._GGMLTensor`` and ggml's own ``ggml_type_name`` / ``ggml_nbytes``.

It also counts, for an attention mask source (``attn_inp_kq_mask``), how many cells of its first
row are not -inf: the cells the CPU flash-attention kernel visits. Inputs are set before the graph
computes, so the mask's data is readable while the callback is being asked.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from harness import engine
from harness.graph_bytes import Tensor

_lib = engine._ggml
_lib.ggml_type_name.argtypes = [ctypes.c_int]
_lib.ggml_type_name.restype = ctypes.c_char_p
_lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
_lib.ggml_nbytes.restype = ctypes.c_size_t
_P = ctypes.POINTER(engine._GGMLTensor)
_NEG_INF = {"f16": 0xFC00, "f32": 0xFF800000}


@dataclass(frozen=True)
class FullNode:
    """A node as capture (name, op, src0, src1) and graph_bytes (type, ne, nbytes, srcs) see it."""

    name: str
    op: str
    src0: str
    src1: str
    type: str
    ne: tuple[int, ...]
    nb: tuple[int, ...]
    nbytes: int
    srcs: tuple[Tensor, ...]


def _visible(t, type_name: str) -> int | None:
    """Cells of row 0 of a KQ mask that are not -inf; None for anything else."""
    if not t.name.decode("utf-8", "replace").startswith("attn_inp_kq_mask") or type_name not in _NEG_INF:
        return None
    if not t.data:
        return None
    n, size = int(t.ne[0]), (2 if type_name == "f16" else 4)
    raw = ctypes.string_at(t.data, n * size)
    vals = struct.unpack(f"<{n}{'H' if size == 2 else 'I'}", raw)
    return sum(v != _NEG_INF[type_name] for v in vals)


def _tensor(p) -> Tensor:
    t = p.contents
    addr = ctypes.cast(p, ctypes.c_void_p).value
    ty = _lib.ggml_type_name(t.type).decode()
    view = ctypes.cast(t.view_src, _P) if t.view_src else None
    return Tensor(name=t.name.decode("utf-8", "replace"), op=_lib.ggml_op_desc(addr).decode(), type=ty,
                  ne=tuple(int(x) for x in t.ne), nb=tuple(int(x) for x in t.nb), nbytes=int(_lib.ggml_nbytes(addr)),
                  view_src=view.contents.name.decode("utf-8", "replace") if view else "",
                  visible=_visible(t, ty))


def read_full_node(t: int) -> FullNode:
    p = ctypes.cast(t, _P)
    me = _tensor(p)
    srcs = tuple(_tensor(p.contents.src[i]) for i in range(10) if p.contents.src[i])
    names = [s.name for s in srcs] + ["", ""]
    return FullNode(name=me.name, op=me.op, src0=names[0], src1=names[1], type=me.type, ne=me.ne, nb=me.nb,
                    nbytes=me.nbytes, srcs=srcs)


def install() -> None:
    """Make Capture.discover read full nodes (for a test process or a sweep subprocess)."""
    from harness import capture

    capture.read_node = read_full_node
