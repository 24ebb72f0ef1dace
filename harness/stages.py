"""The stages of a decode step and the rules that sort ggml graph nodes into them.

This is the one place they live (column names: ``harness.columns``). A stage is decided per node, in this order:

1. **op rule**: ``FLASH_ATTN_EXT`` is attention over the KV cache; a ``SET_ROWS``/``CPY`` into a
   ``cache_k_l*``/``cache_v_l*`` tensor is a KV-cache store.
2. **weight rule**: a ``MUL_MAT``/``MUL_MAT_ID``/``GET_ROWS`` whose first source is a model
   weight (``*.weight``) takes the stage of that weight (``blk.N.ffn_up.weight`` -> ffn, ...).
3. **name rule**: the node's own name, with its ``-N`` layer suffix and ``(view)``-style
   suffixes stripped, looked up in ``NAME_STAGES`` (exact names, then prefixes).
0. **no-op nodes** (``VIEW``, ``RESHAPE``, ``PERMUTE``, ``TRANSPOSE``) compute nothing; they
   propagate (rule 4), so a view joins its consumer's stage instead of splitting a stage run.
4. **propagation**: an unnamed node (``node_N`` or empty), a generic one (bare ``norm``, the
   RMS_NORM that ``build_norm`` emits before the named weight multiply) or a no-op node takes the
   stage of the next node that rules 1-3 decide.
5. Anything left is ``other``; no node is ever dropped.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------- stages
FFN, ATTN_KV, KV_STORE, ATTN_PROJ = "ffn", "attn_kv", "kv_store", "attn_proj"
LM_HEAD, GEMMA3N_EXTRA, NORM, OTHER, HOST = "lm_head", "gemma3n_extra", "norm", "other", "host"
STAGES = (FFN, ATTN_KV, KV_STORE, ATTN_PROJ, LM_HEAD, GEMMA3N_EXTRA, NORM, OTHER, HOST)

# ---------------------------------------------------------------- rules
_WEIGHT_OPS = {"MUL_MAT", "MUL_MAT_ID", "GET_ROWS"}
_STORE_OPS = {"SET_ROWS", "CPY"}
_CACHE_RE = re.compile(r"^cache_[kv]_l(\d+)")
_SUFFIX_RE = re.compile(r"(\s*\([a-z ]+\))+$")
_LAYER_RE = re.compile(r"-(\d+)$")
_UNNAMED_RE = re.compile(r"^(node_\d+|leaf_\d+)?$")
GENERIC_NAMES = {"norm"}
NOOP_OPS = {"VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE", "NONE"}

# weight-name fragments -> stage (first match wins; names like "blk.3.ffn_down.weight")
WEIGHT_STAGES: tuple[tuple[str, str], ...] = (
    ("ffn_", FFN),
    ("attn_q", ATTN_PROJ), ("attn_k", ATTN_PROJ), ("attn_v", ATTN_PROJ), ("attn_output", ATTN_PROJ),
    ("attn_qkv", ATTN_PROJ), ("attn_out", ATTN_PROJ),
    ("output.weight", LM_HEAD),
    ("per_layer_token_embd", GEMMA3N_EXTRA), ("per_layer_model_proj", GEMMA3N_EXTRA),
    ("altup", GEMMA3N_EXTRA), ("laurel", GEMMA3N_EXTRA), (".inp_gate.", GEMMA3N_EXTRA), (".proj.", GEMMA3N_EXTRA),
    ("token_embd", OTHER),  # a GET_ROWS lookup; as a MUL_MAT it is the tied LM head (see classify_weight)
)

# node base names -> stage; exact match first, then longest prefix
NAME_STAGES: dict[str, str] = {
    # feed-forward (llama.cpp build_ffn and Gemma 3n)
    "ffn_out": FFN, "ffn_up": FFN, "ffn_gate": FFN, "ffn_down": FFN, "ffn_act": FFN, "ffn_gelu": FFN,
    "ffn_silu": FFN, "ffn_relu": FFN, "ffn_swiglu": FFN, "ffn_geglu": FFN, "ffn_gate_par": FFN, "ffn_moe": FFN,
    "ffn_up_gate": FFN, "ffn_gate_up": FFN,
    # attention over the KV cache
    "kq": ATTN_KV, "kq_soft_max": ATTN_KV, "kq_soft_max_ext": ATTN_KV, "kqv": ATTN_KV, "kqv_out": ATTN_KV,
    "fattn": ATTN_KV, "__fattn__": ATTN_KV,
    # Q/K/V and output projections, their norms and rope
    "Qcur": ATTN_PROJ, "Kcur": ATTN_PROJ, "Vcur": ATTN_PROJ, "attn_out": ATTN_PROJ, "wqkv": ATTN_PROJ,
    "Qcur_normed": ATTN_PROJ, "Kcur_normed": ATTN_PROJ, "Vcur_normed": ATTN_PROJ, "Qcur_pos": ATTN_PROJ,
    "Kcur_pos": ATTN_PROJ,
    # LM head and logit softcap
    "result_output": LM_HEAD, "result_output_softcapped": LM_HEAD,
    # Gemma 3n: AltUp, LAuReL, per-layer inputs
    "inp_per_layer_selected": GEMMA3N_EXTRA, "inp_per_layer": GEMMA3N_EXTRA, "per_layer_proj": GEMMA3N_EXTRA,
    "inp_stacked": GEMMA3N_EXTRA, "modalities": GEMMA3N_EXTRA, "all_coefs": GEMMA3N_EXTRA,
    "predictions": GEMMA3N_EXTRA, "active_prediction": GEMMA3N_EXTRA, "innovation": GEMMA3N_EXTRA,
    "corrected": GEMMA3N_EXTRA, "laurel_out": GEMMA3N_EXTRA, "attn_laurel": GEMMA3N_EXTRA,
    "first_prediction_gated": GEMMA3N_EXTRA, "first_prediction_scaled": GEMMA3N_EXTRA,
    "first_prediction_out": GEMMA3N_EXTRA, "altup_unembd": GEMMA3N_EXTRA, "unembd_merged": GEMMA3N_EXTRA,
    "attn_ffw_laurel_gated": GEMMA3N_EXTRA, "inp_per_layer_multimodal": GEMMA3N_EXTRA,
    # norms (the weight multiplies; the bare RMS_NORM "norm" propagates, see GENERIC_NAMES)
    "attn_norm": NORM, "ffn_norm": NORM, "attn_post_norm": NORM, "ffn_post_norm": NORM, "result_norm": NORM,
    "post_attn_norm": NORM, "ffn_post_norm_1": NORM,
    # residual adds, embeddings and bookkeeping
    "embd": OTHER, "inp_embd": OTHER, "inp_scaled": OTHER, "ffn_inp": OTHER, "attn_gated": OTHER, "l_out": OTHER,
    "inp_out_ids": OTHER,
}


def base_name(name: str) -> tuple[str, int]:
    """('Qcur', 3) from 'Qcur-3 (view) (permuted)'; layer -1 when there is no suffix."""
    n = _SUFFIX_RE.sub("", name).strip()
    m = _LAYER_RE.search(n)
    if m:
        return n[: m.start()], int(m.group(1))
    return n, -1


def classify_weight(weight: str, op: str) -> str | None:
    if not weight.endswith(".weight"):
        return None
    if weight.startswith("token_embd") and op != "GET_ROWS":
        return LM_HEAD  # tied embeddings used as the output matrix
    for frag, stage in WEIGHT_STAGES:
        if frag in weight:
            return stage
    return None


def classify_own(name: str, op: str, src0: str) -> str | None:
    """Stage from rules 1-3, or None when the node must take its stage from the next one."""
    if op in NOOP_OPS:
        return None  # computes nothing: plumbing for its consumer (saves a sync at stage edges)
    if op == "FLASH_ATTN_EXT":
        return ATTN_KV
    if _CACHE_RE.match(name):
        return KV_STORE if op in _STORE_OPS else ATTN_KV
    if op in _WEIGHT_OPS:
        stage = classify_weight(src0, op)
        if stage is not None:
            return stage
    base, _ = base_name(name)
    if _UNNAMED_RE.match(base) or base in GENERIC_NAMES:
        return None
    if base in NAME_STAGES:
        return NAME_STAGES[base]
    best = max((k for k in NAME_STAGES if base.startswith(k)), key=len, default=None)
    return NAME_STAGES[best] if best else OTHER


def classify_graph(nodes: list[tuple[str, str, str]]) -> list[str]:
    """Stages for a whole graph, given (name, op, src0) per node in execution order."""
    own = [classify_own(n, op, s0) for n, op, s0 in nodes]
    out: list[str] = [OTHER] * len(nodes)
    nxt = OTHER
    for i in range(len(nodes) - 1, -1, -1):
        if own[i] is not None:
            nxt = own[i]
        out[i] = nxt
    return out


_BLK_RE = re.compile(r"^blk\.(\d+)\.")


def layer_of(name: str) -> int:
    return base_name(name)[1]


def classify_layers(nodes: list[tuple[str, str, str]]) -> list[int]:
    """Layer per node: the name's ``-N`` suffix, else the ``blk.N.`` of a weight source, else (for
    unnamed and generic nodes) the layer of the next node that has one; -1 when none applies."""
    out = [-1] * len(nodes)
    nxt = -1
    for i in range(len(nodes) - 1, -1, -1):
        name, op, src0 = nodes[i]
        cache = _CACHE_RE.match(name)
        layer = layer_of(name) if not cache else -1
        if cache and op in _STORE_OPS:
            layer = int(cache.group(1))  # the store into cache_k_l<N>
        if layer < 0:
            m = _BLK_RE.match(src0)
            layer = int(m.group(1)) if m else -1
        base = base_name(name)[0]
        # unnamed, generic and cache-view nodes (a shared-KV layer reads another layer's cache)
        if layer < 0 and (cache or _UNNAMED_RE.match(base) or base in GENERIC_NAMES):
            layer = nxt
        if layer >= 0:
            nxt = layer
        out[i] = layer
    return out
