"""Bytes a decoder reads from memory per decoded token: weights by stage plus KV-cache reads.

Definitions (the same as ``harness.graph_bytes``, which measures them on the real graph):
- A weight is read whole, once per op that reads it, in that op's stage (``harness.stages.tensor_stage``),
  except a lookup table (``token_embd``, ``per_layer_token_embd``): one row; tied embeddings are also read
  whole as the LM head. Activation sparsity skips nothing. A MoE expert tensor: the share
  expert_used_count / expert_count that ``MUL_MAT_ID`` selects for one token. Gemma 3n layers from
  ``n_layer_kv_from_start`` (20; Gemma 4: n_layer - shared_kv_layers) on own no cache: they skip attn_k, attn_v
  and attn_k_norm. Sliding layers' head sizes: ``key_length_swa``/``value_length_swa`` where given.
- KV: every attention layer reads K and V of ``harness.gguf_model.kv_cells`` cells; each KV head's cells
  once (``kv_gqa_reread_bytes``: the other query heads' re-reads). A Gemma 3n layer >= 20 reads layer 18's
  (sliding) or 19's (global) cache as its own read (``kv_shared_read_bytes``: that share).

Variants (``ReadModel.variant``; ``analysis.table`` picks one by the run's flash attention, ``run_variant``):

- ``exact``: flash attention on. The CPU kernel reads only the cells its mask leaves visible:
  L+1 in a global layer, min(L+1, W) in a sliding one (W = ``attention.sliding_window``); an f32 K or
  V cache is first cast to f16 whole (``build_attn_mha``), so that part reads every cell of the view.
- ``exact_padded``: flash attention off. The ``kq``/``kqv`` matmuls read the whole cache view of
  n_kv >= 256 cells (``kv_cells``; cache sizes from the run's n_ctx, n_batch and n_ubatch).
- ``seed``: the seed notebook's accounting (``analysis.baseline``): INT4 FFN weights, F16 KV over L cells.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from harness import model_cache, stages
from harness.errors import InputError, UsageError
from harness.gguf_model import (  # noqa: F401 - re-exported as part of this module's API
    GEMMA3N_KV_FROM_START,
    ModelInfo,
    TensorRecord,
    cache_type_bytes,
    kv_cache_layer,
    kv_cells,
    kv_owners,
    read_model,
    swa_layers,
)
from harness.record import RunRecord

READ_STAGES = tuple(s for s in stages.STAGES if s != stages.HOST)
VARIANTS = ("exact", "exact_padded", "seed")
FA_VARIANT = {True: "exact", False: "exact_padded"}  # resolved flash attention -> variant


@dataclass(frozen=True)
class KVLayer:
    layer: int
    sliding: bool
    owns_kv: bool  # False: reuses an earlier layer's cache (Gemma 3n shared-KV layers)
    cell_bytes: float  # K + V bytes of one cached token in this layer (all its KV heads)
    k_cell_bytes: float = 0.0  # its K part (needed only for an f32 cache under flash attention)
    cache_layer: int = -1  # the layer whose cache it reads (-1: its own)
    gqa: int = 1  # query heads per KV head


@dataclass(frozen=True)
class ReadModel:
    variant: str
    footprint_bytes: int  # all tensor bytes of the model file (seed: its weight estimate)
    weight_bytes: dict[str, float] = field(hash=False)  # stage -> weight bytes read per token
    kv_layers: tuple[KVLayer, ...] = ()
    window_cells: int = 0  # sliding window W; 0 = no sliding layers
    current_cell: int = 1  # 1: the token's own cell is read too (L+1); the seed uses L
    arch: str = ""
    model_name: str = ""
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    n_ctx: int = 0  # the context's size (0: just large enough for the token decoded)
    n_batch: int = 512
    n_ubatch: int = 512
    restored: bool = False  # the KV state was copied in (sliding caches keep the window only; kv_cells)

    @property
    def flash_attn(self) -> bool:
        return self.variant != "exact_padded"

    def kv_cells_read(self, layer: KVLayer, depth: int, flash_attn: bool | None = None) -> int:
        """Cells of K and V one attention layer reads at depth L (``harness.gguf_model.kv_cells``); with
        ``flash_attn=False`` whatever the variant: the n_kv cells of the view the graph shapes, every path's."""
        if self.variant == "seed" and flash_attn is None:
            return depth + self.current_cell
        return kv_cells(depth, layer.sliding, n_ctx=self.n_ctx or depth + 1, n_swa=self.window_cells,
                        n_ubatch=self.n_ubatch, n_batch=self.n_batch, restored=self.restored,
                        flash_attn=self.flash_attn if flash_attn is None else flash_attn)

    def kv_layer_read_bytes(self, lay: KVLayer, depth: int) -> float:
        """K + V bytes one attention layer reads at depth L; an f32 K or V under flash attention: its whole view."""
        cells = self.kv_cells_read(lay, depth)
        f32 = (self.cache_type_k.lower() == "f32", self.cache_type_v.lower() == "f32")
        if self.variant != "exact" or not any(f32):
            return lay.cell_bytes * cells
        view = self.kv_cells_read(lay, depth, flash_attn=False)
        k, v = lay.k_cell_bytes, lay.cell_bytes - lay.k_cell_bytes
        return k * (view if f32[0] else cells) + v * (view if f32[1] else cells)

    def kv_read_bytes(self, depth: int) -> float:
        return sum(self.kv_layer_read_bytes(lay, depth) for lay in self.kv_layers)

    def kv_shared_read_bytes(self, depth: int) -> float:
        """The part of ``kv_read_bytes`` that layers without a cache of their own read."""
        return sum(self.kv_layer_read_bytes(lay, depth) for lay in self.kv_layers if not lay.owns_kv)

    def kv_gqa_reread_bytes(self, depth: int) -> float:
        """Re-reads of K and V by the other query heads of each group (f32 under FA: an upper bound), not read."""
        return sum(self.kv_layer_read_bytes(lay, depth) * (lay.gqa - 1) for lay in self.kv_layers)

    def kv_cache_bytes(self, depth: int) -> float:
        """Bytes the cache holds at depth L (cells a sliding layer still needs: at most W)."""
        return sum(lay.cell_bytes * (min(depth, self.window_cells) if lay.sliding and self.window_cells else depth)
                   for lay in self.kv_layers if lay.owns_kv)

    def kv_store_bytes(self) -> float:
        if self.variant == "seed":
            return 0.0
        return sum(lay.cell_bytes for lay in self.kv_layers if lay.owns_kv)

    def bytes_per_token(self, depth: int) -> dict[str, float]:
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        out = {s: float(self.weight_bytes.get(s, 0.0)) for s in READ_STAGES}
        out[stages.ATTN_KV] += self.kv_read_bytes(depth)
        out[stages.KV_STORE] = self.kv_store_bytes()
        return out

    def total_bytes_per_token(self, depth: int) -> float:
        return sum(self.bytes_per_token(depth).values())

    @property
    def n_kv_owners(self) -> int:
        return sum(lay.owns_kv for lay in self.kv_layers)


def row_bytes(t: TensorRecord) -> float:
    """Bytes of one row (one token's entry) of a lookup table."""
    n_rows = math.prod(t.shape[1:]) if len(t.shape) > 1 else 1
    return t.n_bytes / max(1, n_rows)


def weight_stage(name: str, op: str = "MUL_MAT") -> str:
    """Stage in which a weight tensor is read: ``harness.stages.tensor_stage`` (``other`` if unknown)."""
    return stages.tensor_stage(name, op) or stages.OTHER


def _per_layer(hp: dict, key: str, il: int, default: int = 0) -> int:
    v = hp.get(key, default)
    return int(v[il]) if isinstance(v, list) else int(v)


_SHARED_SKIPS = (stages.T.ATTN_K, stages.T.ATTN_V, stages.T.ATTN_K_NORM)
# read by two ops per token: gemma3n.cpp computes the AltUp router (its norm included) in altup_predict
# and again in altup_correct (altup_compute_router_modalities); MoE experts: MUL_MAT_ID reads the selected ones
_READS = {stages.T.ALTUP_ROUTER: 2, stages.T.ALTUP_ROUTER_NORM: 2}
_EXPERTS = (stages.T.FFN_GATE_EXP, stages.T.FFN_UP_EXP, stages.T.FFN_DOWN_EXP, stages.T.FFN_GATE_UP_EXP)


def _skipped(t: TensorRecord, owners: list[bool]) -> bool:
    """Tensors a shared-KV layer never touches: its K/V projections and K norm."""
    il = t.layer
    if il is None or il >= len(owners) or owners[il]:
        return False
    return stages.gguf_tensor(t.name) in _SHARED_SKIPS


def weight_bytes_by_stage(info: ModelInfo) -> dict[str, float]:
    """Stage -> bytes of weights read per token (see the module docstring)."""
    owners = kv_owners(info)
    weights = {s: 0.0 for s in READ_STAGES}
    tied = info.tensor("output.weight") is None
    n_exp = info.hparams.get("expert_count") or 0  # one token reads expert_used_count of them
    used = min(1.0, (info.hparams.get("expert_used_count") or n_exp) / n_exp) if n_exp else 1.0
    for t in info.tensors:
        if _skipped(t, owners):
            continue
        if stages.gguf_tensor(t.name) in stages.LOOKUP_TENSORS:
            weights[weight_stage(t.name, "GET_ROWS")] += row_bytes(t)
            if stages.gguf_tensor(t.name) is stages.T.TOKEN_EMBD and tied:
                weights[stages.LM_HEAD] += t.n_bytes  # tied: the whole table is the output matrix
        else:
            tt = stages.gguf_tensor(t.name)
            weights[weight_stage(t.name)] += t.n_bytes * _READS.get(tt, 1) * (used if tt in _EXPERTS else 1)
    return weights


def from_model_info(info: ModelInfo, variant: str = "exact", cache_type_k: str = "f16",
                    cache_type_v: str = "f16", *, n_ctx: int = 0, n_batch: int = 512,
                    n_ubatch: int = 512, restored: bool = False) -> ReadModel:
    """The read model of a model; ``n_ctx``/``n_batch``/``n_ubatch`` (the context's) size the caches
    that ``exact_padded`` reads whole (n_ctx 0: just large enough for each depth); ``restored``: the
    KV state was copied in rather than prefilled (``harness.gguf_model.kv_cells``)."""
    if variant == "seed":
        return seed_model()
    if variant not in VARIANTS:
        raise UsageError(f"unknown read-model variant {variant!r} (choose from: {', '.join(VARIANTS)})")
    if info.n_layer <= 0:
        raise InputError(f"model {info.name or info.path} has no block_count")
    hp = info.hparams
    owners = kv_owners(info)
    bk, bv = cache_type_bytes(cache_type_k), cache_type_bytes(cache_type_v)
    sliding = swa_layers(info)
    layers = []
    for il in range(info.n_layer):
        n_kv = _per_layer(hp, "attention.head_count_kv", il, _per_layer(hp, "attention.head_count", il))
        n_head = max(1, _per_layer(hp, "attention.head_count", il, 1))
        dk = _per_layer(hp, "attention.key_length", il, info.hparams.get("embedding_length", 0) // n_head)
        dv = _per_layer(hp, "attention.value_length", il, dk)
        if sliding[il]:  # llama_model::load_hparams: n_embd_head_{k,v}_swa, the full-layer sizes unless given
            dk = _per_layer(hp, "attention.key_length_swa", il, dk)
            dv = _per_layer(hp, "attention.value_length_swa", il, dv)
        if n_kv == 0:  # recurrent / attention-free layer
            continue
        layers.append(KVLayer(layer=il, sliding=sliding[il], owns_kv=owners[il], cell_bytes=n_kv * (dk * bk + dv * bv),
                              k_cell_bytes=n_kv * dk * bk, cache_layer=kv_cache_layer(il, sliding, owners),
                              gqa=max(1, n_head // n_kv)))
    return ReadModel(
        variant=variant, footprint_bytes=info.tensor_bytes, weight_bytes=weight_bytes_by_stage(info),
        kv_layers=tuple(layers), window_cells=info.n_swa if any(sliding) else 0,
        current_cell=1, arch=info.arch, model_name=info.name, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
        n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, restored=restored,
    )


def from_gguf(path: str | os.PathLike, variant: str = "exact", cache_type_k: str = "f16",
              cache_type_v: str = "f16", **context) -> ReadModel:
    if variant == "seed":
        return seed_model()
    return from_model_info(model_cache.read_model(path), variant, cache_type_k, cache_type_v, **context)


def run_flash_attn(rec: RunRecord) -> bool | None:
    """Flash attention as llama.cpp resolved it in a run: from the graph (a FLASH_ATTN_EXT node, recorded
    in ``params.flash_attn_resolved`` and in graph bytes), else from an explicit ``-fa on|off``; None when
    neither tells (``auto`` in older runs)."""
    if rec.params.flash_attn_resolved is not None:
        return rec.params.flash_attn_resolved
    for c in rec.contexts:
        if c.graph_bytes and "fa_on" in c.graph_bytes:
            return bool(c.graph_bytes["fa_on"])
    return {"on": True, "off": False}.get(rec.params.flash_attn)


def run_variant(rec: RunRecord) -> str:
    """``exact`` when the run decoded with flash attention (or says nothing: llama.cpp's CPU backend
    resolves ``auto`` to on), ``exact_padded`` without it."""
    fa = run_flash_attn(rec)
    return FA_VARIANT[True if fa is None else fa]


def context_params(rec: RunRecord) -> dict:
    """The run's n_ctx / n_batch / n_ubatch (they size the caches the non-flash path reads), and
    ``restored``: every context of a round-robin run holds a KV state restored from a saved one
    (``llama_state_seq_set_data``), which keeps only the sliding window's cells."""
    p = rec.params
    out: dict = {k: int(getattr(p, k)) for k in ("n_ctx", "n_batch", "n_ubatch") if getattr(p, k)}
    out["restored"] = True
    return out


def has_tensor_table(rec: RunRecord) -> bool:
    g = rec.model.gguf
    return isinstance(g, dict) and bool(g.get("tensors"))


def from_run(rec: RunRecord, variant: str = "auto") -> ReadModel:
    """The read model of a run's model: its tensor table, KV cache types and context sizes from the
    record; ``auto`` picks the variant from the run's resolved flash attention (``run_variant``)."""
    if variant == "auto":
        variant = run_variant(rec)
    if variant == "seed":
        return seed_model()
    if not has_tensor_table(rec):
        raise InputError("run metadata carries no model tensor table; pass the model file (--model GGUF) "
                         "or use --model-variant seed")
    try:
        info = ModelInfo.from_dict(rec.model.gguf)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"run metadata has a malformed model tensor table ({e})") from None
    return from_model_info(info, variant, rec.params.cache_type_k, rec.params.cache_type_v, **context_params(rec))


def seed_model() -> ReadModel:
    from analysis import baseline

    return baseline.seed_read_model()
