"""Bytes one decode step reads, from the ggml graph itself: per stage, per layer, per attention layer.

Input: the graph's nodes in order with their stages and layers (``from_nodes``); bytes as ``analysis.readmodel``:

- ``weight``: model tensors an op reads (a ``gguf.MODEL_TENSOR`` name). A matmul reads the whole matrix
  (activation sparsity skips nothing); ``GET_ROWS`` one row per index; ``MUL_MAT_ID`` the experts its ids
  select. A tensor read by two ops counts twice (the tied ``token_embd``: a row as lookup, all as LM head).
- ``kv``: KV-cache cells the attention ops read (a source that views ``cache_k_l*``/``cache_v_l*``), as the
  graph shapes them: the view spans ``n_kv`` cells (``llama_kv_cache::get_n_kv``). The non-flash path
  (``kq``/``kqv`` MUL_MATs) reads all of them, masked cells included. ``FLASH_ATTN_EXT`` on the CPU skips
  every cell its mask sets to -inf (``ggml_compute_forward_flash_attn_ext_f16_one_chunk``), so it reads the
  mask's visible cells when the node reader counted them (``Tensor.visible``), else the view
  (``fa_cells == "view"``, an upper bound). An f32 cache is cast to f16 whole first (``build_attn_mha``): it
  reads every cell of its view. The split-KV path (``split_kv_path``) cuts n_kv evenly between threads. A KV
  head's cells count once (grouped-query re-reads: ``kv_gqa_reread_bytes``); a layer reading another layer's
  cache (Gemma 3n layers >= 20 read 18's or 19's) counts it as its own (``kv_shared_bytes``).
- ``act``: every other source an op reads (activations, masks, indices); views and reshapes read nothing.
- ``kv_written``: bytes ``SET_ROWS``/``CPY`` store into the KV cache (the ``kv_store`` stage).

"Bytes per token" is ``weight`` + ``kv`` + ``kv_written`` (``per_token``, what the read model models), not ``act``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import gguf

from harness import stages

_ATTN_OPS = {"FLASH_ATTN_EXT", "MUL_MAT"}
SPLIT_KV_MIN = 512  # ggml-cpu: FLASH_ATTN_EXT splits the KV cells across threads from a view of this many cells


def split_kv_path(k_type: str, v_type: str, n_kv: int) -> bool:
    """ggml-cpu's ``use_split_kv_path`` for one f32 query row, from the K/V types the op is given (``KVRead``)."""
    return k_type == v_type and k_type in ("f16", "f32") and n_kv >= SPLIT_KV_MIN


@dataclass(frozen=True)
class Tensor:
    """One source of a node. ``visible``: for a KQ mask, the cells of its first row that are not -inf."""

    name: str
    op: str
    type: str  # ggml type name: f32, f16, q8_0, q4_K, ...
    ne: tuple[int, ...]
    nbytes: int
    nb: tuple[int, ...] = ()
    view_src: str = ""  # the tensor this one is a view of ("" when none)
    visible: int | None = None
    visible_runs: tuple[tuple[int, int], ...] = ()  # where those cells sit: [start, end) runs


@dataclass(frozen=True)
class Node:
    name: str
    op: str
    type: str
    ne: tuple[int, ...]
    nbytes: int
    srcs: tuple[Tensor, ...] = ()


def _tensor(o) -> Tensor:
    return Tensor(name=o.name, op=o.op, type=o.type, ne=tuple(int(x) for x in o.ne), nbytes=int(o.nbytes),
                  nb=tuple(getattr(o, "nb", ()) or ()), view_src=getattr(o, "view_src", "") or "",
                  visible=getattr(o, "visible", None), visible_runs=tuple(getattr(o, "visible_runs", ()) or ()))


def as_node(o) -> Node | None:
    """A Node from an object with name, op, type, ne, nbytes, srcs; None if it has names only."""
    try:
        if not o.type:
            return None
        return Node(name=o.name, op=o.op, type=o.type, ne=tuple(int(x) for x in o.ne), nbytes=int(o.nbytes),
                    srcs=tuple(_tensor(s) for s in o.srcs if s is not None))
    except AttributeError:
        return None


def type_bytes(ggml_type: str, ne: tuple[int, ...]) -> int:
    """Bytes of ``ne`` elements laid out densely (rows of ne[0]) at a ggml type: ggml_row_size x rows."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type.upper()]]
    return int(ne[0]) // block * size * math.prod(int(d) for d in ne[1:]) if ne else 0


def _bytes(t: Tensor) -> int:
    """Bytes a source holds: its elements at its type (a strided view counts its elements, not its span)."""
    try:
        return type_bytes(t.type, t.ne)
    except KeyError:
        return t.nbytes


@dataclass(frozen=True)
class KVRead:
    """One attention op's read of the KV cache."""

    layer: int  # the layer that attends
    cache_layer: int  # the layer whose cache it reads (differs for a shared-KV layer)
    op: str  # FLASH_ATTN_EXT or MUL_MAT (kq + kqv)
    n_kv: int  # cells the graph's K view spans
    cells: int  # cells read: n_kv without flash attention; with it the mask's visible cells when known
    visible: int | None  # cells the mask leaves visible (None: not read)
    n_head: int
    n_head_kv: int
    k_bytes: int
    v_bytes: int
    split_kv: bool = False  # FA split-KV path: thread i of n visits the visible cells in [i*c, (i+1)*c), c=ceil(n_kv/n)
    visible_runs: tuple[tuple[int, int], ...] = ()  # where the visible cells sit: [start, end) runs

    @property
    def bytes(self) -> int:
        return self.k_bytes + self.v_bytes

    @property
    def gqa_reread_bytes(self) -> int:  # an upper bound where an f32 view was cast (heads re-read the f16 copy)
        return self.bytes * (self.n_head // max(1, self.n_head_kv) - 1)


def _by_stage() -> dict[str, int]:
    return {s: 0 for s in stages.STAGES if s != stages.HOST}


@dataclass(frozen=True)
class GraphBytes:
    fa_on: bool  # a FLASH_ATTN_EXT node is in the graph: flash attention as llama.cpp resolved it
    n_nodes: int
    fa_cells: str  # "visible" (mask counted), "view" (mask unread: view cells, an upper bound) or "" (no FA)
    weight: dict[str, int] = field(default_factory=_by_stage)  # stage -> weight bytes read
    kv: dict[str, int] = field(default_factory=_by_stage)  # stage -> KV-cache bytes read
    act: dict[str, int] = field(default_factory=_by_stage)  # stage -> other bytes read
    kv_written: dict[str, int] = field(default_factory=_by_stage)  # stage -> bytes stored into the cache
    layer_weight: dict[int, int] = field(default_factory=dict)  # layer (-1: none) -> weight bytes
    layer_kv: dict[int, int] = field(default_factory=dict)  # layer -> KV bytes read
    kv_reads: tuple[KVRead, ...] = ()

    def read(self) -> dict[str, int]:
        """Stage -> weight + KV bytes read per token."""
        return {s: self.weight.get(s, 0) + self.kv.get(s, 0) for s in self.weight}

    def per_token(self) -> dict[str, int]:
        """Stage -> weight + KV read + KV written per token: what ``ReadModel.bytes_per_token`` models."""
        return {s: v + self.kv_written.get(s, 0) for s, v in self.read().items()}

    @property
    def total_read(self) -> int:
        return sum(self.read().values())

    @property
    def kv_read_bytes(self) -> int:
        return sum(self.kv.values())

    @property
    def kv_shared_bytes(self) -> int:
        return sum(r.bytes for r in self.kv_reads if r.cache_layer != r.layer)

    @property
    def kv_gqa_reread_bytes(self) -> int:
        return sum(r.gqa_reread_bytes for r in self.kv_reads)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_weight"] = {str(k): v for k, v in self.layer_weight.items()}
        d["layer_kv"] = {str(k): v for k, v in self.layer_kv.items()}
        d["kv_reads"] = [asdict(r) for r in self.kv_reads]
        d["kv_read_bytes"], d["kv_shared_bytes"] = self.kv_read_bytes, self.kv_shared_bytes
        d["kv_gqa_reread_bytes"], d["total_read_bytes"] = self.kv_gqa_reread_bytes, self.total_read
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GraphBytes:
        return cls(fa_on=bool(d["fa_on"]), n_nodes=int(d["n_nodes"]), fa_cells=d.get("fa_cells", ""),
                   weight=dict(d["weight"]), kv=dict(d["kv"]), act=dict(d["act"]), kv_written=dict(d["kv_written"]),
                   layer_weight={int(k): v for k, v in d["layer_weight"].items()},
                   layer_kv={int(k): v for k, v in d["layer_kv"].items()},
                   kv_reads=tuple(KVRead(**{**r, "visible_runs": tuple(map(tuple, r.get("visible_runs", ())))})
                                  for r in d["kv_reads"]))


def _cache_layer(t: Tensor) -> int | None:
    layer = stages.cache_layer(t.view_src)
    return stages.cache_layer(t.name) if layer is None else layer


def _weight_bytes(node: Node, i: int, t: Tensor) -> int | None:
    """Bytes of model tensor ``t`` that ``node`` reads as its source ``i``; None if t is no model tensor."""
    base = t.view_src if stages.gguf_tensor(t.view_src) is not None else stages.strip_suffixes(t.name)
    if stages.gguf_tensor(base) is None:
        return None
    full = _bytes(t) if t.view_src else t.nbytes
    if i == 0 and node.op == "GET_ROWS" and len(node.srcs) > 1:
        idx = node.srcs[1].ne
        n_idx = math.prod(idx[:3])
        return type_bytes(t.type, (t.ne[0], n_idx)) if t.ne else full
    if i == 0 and node.op == "MUL_MAT_ID" and len(node.srcs) > 2 and len(t.ne) > 2 and t.ne[2] > 0:
        ids = node.srcs[2].ne
        used = min(t.ne[2], ids[0] * (ids[1] if len(ids) > 1 else 1))
        return full // t.ne[2] * used
    return full


def _is_k(t: Tensor) -> bool:
    return (t.view_src or t.name).startswith("cache_k")


def _attention(node: Node, layer: int, kv_srcs: list[tuple[int, int, Tensor]],
               cast: dict[str, Tensor]) -> tuple[KVRead, dict[int, int]]:
    """The KV read of one attention op; also returns per-source bytes (FA scaled to the visible cells).

    Shapes (``build_attn_mha``): K and non-transposed V views are [head_dim, n_kv, n_head_kv]; the
    transposed V view of the non-flash path is [n_kv, head_dim, n_head_kv]."""
    fa = node.op == "FLASH_ATTN_EXT"
    q = node.srcs[0] if fa else node.srcs[1]
    first = kv_srcs[0][2]
    n_kv = int(first.ne[1] if fa or _is_k(first) else first.ne[0])
    mask = node.srcs[3] if fa and len(node.srcs) > 3 else None
    visible = mask.visible if mask is not None else None
    split = (fa and q.type == "f32" and q.ne[1] == 1 and (len(q.ne) < 4 or q.ne[3] == 1)
             and split_kv_path(node.srcs[1].type, node.srcs[2].type, n_kv))
    cells = visible if fa and visible is not None else n_kv
    out = {i: _bytes(cast[t.name]) if t.name in cast else _bytes(t) * cells // max(1, n_kv) for i, _, t in kv_srcs}
    kb = sum(out[i] for i, _, t in kv_srcs if _is_k(t))
    n_head_kv = int(first.ne[2]) if len(first.ne) > 2 else 1
    read = KVRead(layer=layer, cache_layer=kv_srcs[0][1], op=node.op, n_kv=n_kv, cells=cells, visible=visible,
                  n_head=int(q.ne[2]) if len(q.ne) > 2 else n_head_kv, n_head_kv=n_head_kv, k_bytes=kb,
                  v_bytes=sum(out.values()) - kb, split_kv=split, visible_runs=mask.visible_runs if mask else ())
    return read, out


def _merge_mul_mat_reads(reads: list[KVRead]) -> list[KVRead]:
    """Without flash attention a layer reads K in ``kq`` and V in ``kqv``: one record per layer and cache."""
    out: dict[tuple[int, int, str], KVRead] = {}
    for r in reads:
        key = (r.layer, r.cache_layer, r.op)
        if key in out and r.op == "MUL_MAT":
            o = out[key]
            out[key] = replace(o, n_kv=max(o.n_kv, r.n_kv), cells=max(o.cells, r.cells), n_head=max(o.n_head, r.n_head),
                               n_head_kv=max(o.n_head_kv, r.n_head_kv), k_bytes=o.k_bytes + r.k_bytes,
                               v_bytes=o.v_bytes + r.v_bytes, visible=r.visible if o.visible is None else o.visible)
        else:
            out[key] = r
    return list(out.values())


def from_nodes(nodes: list[Node], stage_of: list[str], layer_of: list[int]) -> GraphBytes:
    """Aggregate the bytes every node reads (see the module docstring) by stage, layer and attention op."""
    if not (len(nodes) == len(stage_of) == len(layer_of)):
        raise ValueError("nodes, stages and layers differ in length")
    weight, kv, act, written = _by_stage(), _by_stage(), _by_stage(), _by_stage()
    layer_w: dict[int, int] = {}
    layer_kv: dict[int, int] = {}
    reads: list[KVRead] = []
    fa_on = any(n.op == "FLASH_ATTN_EXT" for n in nodes)
    fa_visible = True
    cast = {n.name: n.srcs[0] for n in nodes if stages.is_cache_cast(n.name, n.op) and n.srcs}  # f32 -> f16 whole
    for node, stage, layer in zip(nodes, stage_of, layer_of, strict=True):
        stage = stage if stage in weight else stages.OTHER
        if node.op in stages.NOOP_OPS or node.name in cast:
            continue
        srcs = list(enumerate(node.srcs))
        if node.op in ("SET_ROWS", "CPY") and node.srcs:  # SET_ROWS(values, idx, dst) / CPY(values, dst)
            dst = node.srcs[2] if node.op == "SET_ROWS" and len(node.srcs) > 2 else node.srcs[-1]
            if _cache_layer(dst) is not None:
                rows = math.prod(node.srcs[0].ne[1:])  # every row of the values, whatever their rank
                written[stage] += type_bytes(node.type, (node.ne[0], rows)) if node.op == "SET_ROWS" else _bytes(dst)
            srcs = [(i, t) for i, t in srcs if t is not dst]
        kv_srcs = [(i, c, t) for i, t in srcs if (c := _cache_layer(t)) is not None] if node.op in _ATTN_OPS else []
        kv_bytes: dict[int, int] = {}
        if kv_srcs:
            read, kv_bytes = _attention(node, layer, kv_srcs, cast)
            reads.append(read)
            fa_visible &= node.op != "FLASH_ATTN_EXT" or read.visible is not None
        for i, t in srcs:
            if i in kv_bytes:
                kv[stage] += kv_bytes[i]
                layer_kv[layer] = layer_kv.get(layer, 0) + kv_bytes[i]
                continue
            wb = _weight_bytes(node, i, t)
            if wb is not None:
                weight[stage] += wb
                layer_w[layer] = layer_w.get(layer, 0) + wb
            else:
                act[stage] += _bytes(t)
    return GraphBytes(fa_on=fa_on, n_nodes=len(nodes), fa_cells=("visible" if fa_visible else "view") if fa_on else "",
                      weight=weight, kv=kv, act=act, kv_written=written, layer_weight=layer_w, layer_kv=layer_kv,
                      kv_reads=tuple(_merge_mul_mat_reads(reads)))


def from_capture(nodes: list, stage_of: list[str], layer_of: list[int]) -> GraphBytes | None:
    """``from_nodes`` on a capture's node records; None when they carry names only (no types or shapes)."""
    got = [as_node(n) for n in nodes]
    if not got or any(n is None for n in got):
        return None
    return from_nodes(got, stage_of, layer_of)  # type: ignore[arg-type]
