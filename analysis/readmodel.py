"""Bytes a decoder reads from memory per decoded token: weights by stage plus KV-cache reads.

Variants (``ReadModel.variant``):

- ``exact``: the model's real tensor table at each tensor's ggml type. Per token at depth L
  (L cells already cached) it reads every weight matrix once (activation sparsity does not
  skip reads), one row of each embedding table, and K and V of ``min(L+1, W)`` cells in a
  sliding-window layer (W = ``attention.sliding_window``) or ``L+1`` cells in a global one.
  Gemma 3n layers from ``n_layer_kv_from_start`` (20) on own no cache: they skip attn_k,
  attn_v and attn_k_norm and re-read the cache of layer 18 (sliding) or 19 (global).
  This is what llama.cpp's CPU flash-attention kernel reads: it skips masked cells.
- ``exact_padded``: as ``exact``, but the KV read covers the cell count padded up to a
  multiple of 256 (sliding layers capped at the padded window), as the non-flash-attention
  path multiplies over the whole padded cache view, masked cells included. An upper bound.
- ``seed``: the seed notebook's simplified accounting (``analysis.baseline``): INT4 FFN weights
  and an F16 KV cache over L cells in all 35 layers; nothing else.

Stage keys are ``harness.stages`` stages plus ``embed`` (the two embedding-row lookups).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

from harness import stages
from harness.errors import InputError, UsageError
from harness.gguf_model import (  # noqa: F401 - re-exported as part of this module's API
    GEMMA3N_KV_FROM_START,
    ModelInfo,
    TensorRecord,
    cache_type_bytes,
    kv_owners,
    read_model,
)
from harness.record import RunRecord

log = logging.getLogger(__name__)

EMBED = "embed"
READ_STAGES = (stages.FFN, stages.ATTN_KV, stages.KV_STORE, stages.ATTN_PROJ, stages.LM_HEAD,
               stages.GEMMA3N_EXTRA, stages.NORM, EMBED, stages.OTHER)
VARIANTS = ("exact", "exact_padded", "seed")
KV_PAD_CELLS = 256  # llama.cpp pads the KV view to this many cells without flash attention
DEFAULT_SWA_PERIOD = {"gemma3n": 5, "gemma3": 6, "gemma2": 2}  # every Nth layer (il % N == N-1) is global
_EMBED_TABLES = ("token_embd.weight", "per_layer_token_embd.weight")
_EXTRA_FRAGMENTS = ("altup", "laurel", "per_layer_model_proj", ".inp_gate.", ".proj.")


@dataclass(frozen=True)
class KVLayer:
    layer: int
    sliding: bool
    owns_kv: bool  # False: reuses an earlier layer's cache (Gemma 3n shared-KV layers)
    cell_bytes: float  # K + V bytes of one cached token in this layer


@dataclass(frozen=True)
class ReadModel:
    variant: str
    footprint_bytes: int  # all tensor bytes of the model file (seed: its weight estimate)
    weight_bytes: dict[str, float] = field(hash=False)  # stage -> weight bytes read per token
    kv_layers: tuple[KVLayer, ...] = ()
    window_cells: int = 0  # sliding window W; 0 = no sliding layers
    pad_cells: int = 1  # KV read rounded up to a multiple of this
    current_cell: int = 1  # 1: the token's own cell is read too (L+1); the seed uses L
    arch: str = ""
    model_name: str = ""
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"

    def kv_cells_read(self, layer: KVLayer, depth: int) -> int:
        """Cells of K and V one attention layer reads at depth L."""
        n = depth + self.current_cell
        if self.pad_cells > 1:
            n = _pad(n, self.pad_cells)
            if layer.sliding and self.window_cells:
                n = min(n, _pad(self.window_cells, self.pad_cells))
        elif layer.sliding and self.window_cells:
            n = min(n, self.window_cells)
        return n

    def kv_read_bytes(self, depth: int) -> float:
        return sum(lay.cell_bytes * self.kv_cells_read(lay, depth) for lay in self.kv_layers)

    def kv_cache_bytes(self, depth: int) -> float:
        """Bytes the cache holds at depth L (cells a sliding layer still needs: at most W)."""
        total = 0.0
        for lay in self.kv_layers:
            if lay.owns_kv:
                total += lay.cell_bytes * (min(depth, self.window_cells) if lay.sliding and self.window_cells
                                           else depth)
        return total

    def kv_store_bytes(self) -> float:
        if self.variant == "seed":
            return 0.0
        return sum(lay.cell_bytes for lay in self.kv_layers if lay.owns_kv)

    def bytes_per_token(self, depth: int) -> dict[str, float]:
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        out = {s: float(self.weight_bytes.get(s, 0.0)) for s in READ_STAGES}
        out[stages.ATTN_KV] = self.kv_read_bytes(depth)
        out[stages.KV_STORE] = self.kv_store_bytes()
        return out

    def total_bytes_per_token(self, depth: int) -> float:
        return sum(self.bytes_per_token(depth).values())

    @property
    def n_kv_owners(self) -> int:
        return sum(lay.owns_kv for lay in self.kv_layers)


def _pad(n: int, to: int) -> int:
    return int(math.ceil(n / to) * to)


def row_bytes(t: TensorRecord) -> float:
    """Bytes of one row (one token's entry) of a lookup table."""
    n_rows = math.prod(t.shape[1:]) if len(t.shape) > 1 else 1
    return t.n_bytes / max(1, n_rows)


def weight_stage(name: str) -> str:
    """Read-model stage of a weight tensor (``embed`` for the lookup tables)."""
    if name.endswith("_norm.weight") or "altup_correct_scale" in name:
        return stages.NORM
    if name in _EMBED_TABLES:
        return EMBED
    if ".ffn_" in name:
        return stages.FFN
    if any(f".{p}." in name for p in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv")):
        return stages.ATTN_PROJ
    if name.startswith("output.") or name == "output.weight":
        return stages.LM_HEAD
    if any(f in name for f in _EXTRA_FRAGMENTS):
        return stages.GEMMA3N_EXTRA
    return stages.OTHER


def _per_layer(hp: dict, key: str, il: int, default: int = 0) -> int:
    v = hp.get(key, default)
    return int(v[il]) if isinstance(v, list) else int(v)


def _swa_pattern(info: ModelInfo) -> list[bool]:
    hp, n_layer = info.hparams, info.n_layer
    if not hp.get("attention.sliding_window"):
        return [False] * n_layer
    pat = hp.get("attention.sliding_window_pattern")
    if isinstance(pat, list) and len(pat) == n_layer:
        return [bool(x) for x in pat]
    period = int(pat) if isinstance(pat, int) and pat > 0 else DEFAULT_SWA_PERIOD.get(info.arch)
    if period is None:
        log.warning("%s: sliding_window set but no pattern; treating every layer as sliding", info.arch)
        return [True] * n_layer
    return [il % period != period - 1 for il in range(n_layer)]


def _skipped(t: TensorRecord, owners: list[bool]) -> bool:
    """Tensors a shared-KV layer never touches: its K/V projections and K norm."""
    il = t.layer
    if il is None or il >= len(owners) or owners[il]:
        return False
    return any(f".{p}." in t.name for p in ("attn_k", "attn_v", "attn_k_norm"))


def from_model_info(info: ModelInfo, variant: str = "exact", cache_type_k: str = "f16",
                    cache_type_v: str = "f16") -> ReadModel:
    if variant == "seed":
        return seed_model()
    if variant not in VARIANTS:
        raise UsageError(f"unknown read-model variant {variant!r} (choose from: {', '.join(VARIANTS)})")
    if info.n_layer <= 0:
        raise InputError(f"model {info.name or info.path} has no block_count")
    hp = info.hparams
    owners = kv_owners(info)
    weights = {s: 0.0 for s in READ_STAGES}
    has_output = info.tensor("output.weight") is not None
    for t in info.tensors:
        if _skipped(t, owners):
            continue
        stage = weight_stage(t.name)
        if stage == EMBED:
            weights[EMBED] += row_bytes(t)
            if t.name == "token_embd.weight" and not has_output:
                weights[stages.LM_HEAD] += t.n_bytes  # tied: the whole table is the output matrix
        else:
            weights[stage] += t.n_bytes
    bk, bv = cache_type_bytes(cache_type_k), cache_type_bytes(cache_type_v)
    sliding = _swa_pattern(info)
    layers = []
    for il in range(info.n_layer):
        n_kv = _per_layer(hp, "attention.head_count_kv", il, _per_layer(hp, "attention.head_count", il))
        n_head = max(1, _per_layer(hp, "attention.head_count", il, 1))
        dk = _per_layer(hp, "attention.key_length", il, info.hparams.get("embedding_length", 0) // n_head)
        dv = _per_layer(hp, "attention.value_length", il, dk)
        if n_kv == 0:  # recurrent / attention-free layer
            continue
        layers.append(KVLayer(layer=il, sliding=sliding[il], owns_kv=owners[il], cell_bytes=n_kv * (dk * bk + dv * bv)))
    return ReadModel(
        variant=variant, footprint_bytes=info.tensor_bytes, weight_bytes=weights, kv_layers=tuple(layers),
        window_cells=int(hp.get("attention.sliding_window") or 0) if any(sliding) else 0,
        pad_cells=KV_PAD_CELLS if variant == "exact_padded" else 1, current_cell=1, arch=info.arch,
        model_name=info.name, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
    )


def from_gguf(path: str | os.PathLike, variant: str = "exact", cache_type_k: str = "f16",
              cache_type_v: str = "f16") -> ReadModel:
    if variant == "seed":
        return seed_model()
    return from_model_info(read_model(path), variant, cache_type_k, cache_type_v)


def has_tensor_table(rec: RunRecord) -> bool:
    g = rec.model.gguf
    return isinstance(g, dict) and bool(g.get("tensors"))


def from_run(rec: RunRecord, variant: str = "exact") -> ReadModel:
    """The read model of a run's model: its tensor table and KV cache types from the record."""
    if variant == "seed":
        return seed_model()
    if not has_tensor_table(rec):
        raise InputError("run metadata carries no model tensor table; pass the model file (--model GGUF) "
                         "or use --model-variant seed")
    try:
        info = ModelInfo.from_dict(rec.model.gguf)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"run metadata has a malformed model tensor table ({e})") from None
    return from_model_info(info, variant, rec.params.cache_type_k, rec.params.cache_type_v)


def preset_model_info(preset: str, quant: str = "q4_k_m") -> ModelInfo:
    """The ModelInfo a ``harness.twin`` file of this preset would have, without writing the file."""
    from harness.presets import PRESETS, layout, type_nbytes

    p = PRESETS[preset]
    tensors = tuple(TensorRecord(name=n, shape=s, ggml_type=ty, n_elements=math.prod(s), n_bytes=type_nbytes(ty, s))
                    for n, s, ty in layout(p, quant))
    hp = {"context_length": p.n_ctx_train, "embedding_length": p.n_embd, "block_count": p.n_layer,
          "attention.head_count": p.n_head, "attention.head_count_kv": p.n_head_kv,
          "attention.key_length": p.head_dim, "attention.value_length": p.head_dim, "vocab_size": p.n_vocab}
    if p.arch == "gemma3n":
        hp.update({"feed_forward_length": [p.n_ff] * p.n_layer, "attention.sliding_window": p.n_swa,
                   "embedding_length_per_layer_input": p.n_embd_altup, "altup.num_inputs": p.n_altup,
                   "attention.shared_kv_layers": p.n_layer - p.n_layer_kv_from_start,
                   "attention.sliding_window_pattern": [p.is_swa(i) for i in range(p.n_layer)]})
    else:
        hp["feed_forward_length"] = p.n_ff
    return ModelInfo(path=f"<preset {preset} {quant}>", file_bytes=0, arch=p.arch, name=f"{preset} ({quant})",
                     hparams=hp, tensors=tensors, synthetic=True, twin_preset=preset)


def seed_model() -> ReadModel:
    from analysis import baseline

    return baseline.seed_read_model()
