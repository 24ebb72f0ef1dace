"""The stages of a decode step and the rules that sort ggml graph nodes into them.

This is the one place they live (column names: ``harness.columns``), together with the one mapping
from a model tensor to its stage (``TENSOR_STAGES``, keyed on gguf-py's ``gguf.MODEL_TENSOR`` /
``gguf.TENSOR_NAMES``): the stage rules and the read model (``analysis.readmodel``) both use it, so
a weight is modelled in the stage where its time is measured. A stage is decided per node, in order:

1. **op rule**: ``FLASH_ATTN_EXT`` is attention over the KV cache; a ``SET_ROWS``/``CPY`` into a
   ``cache_k_l*``/``cache_v_l*`` tensor is a KV-cache store.
2. **weight rule**: a ``MUL_MAT``/``MUL_MAT_ID``/``GET_ROWS`` whose first source is a model weight,
   or any op with a model weight as its second source (a norm's ``MUL``, a bias ``ADD``; only when
   the caller passes src1), takes that tensor's stage (``tensor_stage``).
3. **name rule**: the node's own name, with its ``-N`` layer suffix and ``(view)``-style
   suffixes stripped, looked up in ``NAME_OP_STAGES`` (name and op), then ``NAME_STAGES`` (exact
   names, then prefixes).
0. **no-op nodes** (``VIEW``, ``RESHAPE``, ``PERMUTE``, ``TRANSPOSE``) compute nothing; they
   propagate (rule 4), so a view joins its consumer's stage instead of splitting a stage run.
4. **propagation**: an unnamed node (``node_N`` or empty), a generic one (bare ``norm``, the
   RMS_NORM that ``build_norm`` emits before the weight multiply) or a no-op node takes the
   stage of the next node that rules 1-3 decide.
5. Anything left is ``other``; no node is ever dropped.

Norm weights belong to the stage whose node multiplies them: ``attn_q_norm``/``attn_k_norm`` to
``attn_proj`` (``Qcur_normed``/``Kcur_normed``); Gemma 3n's AltUp router norm, LAuReL post-norm,
per-layer post-norm, ``per_layer_proj_norm`` and ``altup_correct_scale`` to ``gemma3n_extra``.
"""

from __future__ import annotations

import re

import gguf

# ---------------------------------------------------------------- stages
FFN, ATTN_KV, KV_STORE, ATTN_PROJ = "ffn", "attn_kv", "kv_store", "attn_proj"
LM_HEAD, GEMMA3N_EXTRA, NORM, OTHER, HOST = "lm_head", "gemma3n_extra", "norm", "other", "host"
STAGES = (FFN, ATTN_KV, KV_STORE, ATTN_PROJ, LM_HEAD, GEMMA3N_EXTRA, NORM, OTHER, HOST)

# ---------------------------------------------------------------- tensor -> stage (gguf-py names)
T = gguf.MODEL_TENSOR
_EXPLICIT: dict[gguf.MODEL_TENSOR, str] = {
    T.TOKEN_EMBD: OTHER,  # a GET_ROWS lookup (``embd``); as a MUL_MAT it is the tied LM head (tensor_stage)
    T.POS_EMBD: OTHER, T.TOKEN_TYPES: OTHER,
    T.OUTPUT: LM_HEAD, T.OUTPUT_NORM: NORM,
    T.ATTN_Q_NORM: ATTN_PROJ, T.ATTN_K_NORM: ATTN_PROJ,  # multiplied in Qcur_normed / Kcur_normed
    T.ROPE_FREQS: ATTN_PROJ, T.ROPE_FACTORS_LONG: ATTN_PROJ, T.ROPE_FACTORS_SHORT: ATTN_PROJ,
    T.ATTN_SINKS: ATTN_KV,
    # Gemma 3n: AltUp, LAuReL and per-layer inputs, their norms and scales included
    **{t: GEMMA3N_EXTRA for t in (
        T.PER_LAYER_TOKEN_EMBD, T.PER_LAYER_MODEL_PROJ, T.PER_LAYER_PROJ_NORM, T.PER_LAYER_INP_GATE,
        T.PER_LAYER_PROJ, T.PER_LAYER_POST_NORM, T.ALTUP_PROJ, T.ALTUP_UNEMBD_PROJ, T.ALTUP_CORRECT_COEF,
        T.ALTUP_CORRECT_SCALE, T.ALTUP_PREDICT_COEF, T.ALTUP_ROUTER, T.ALTUP_ROUTER_NORM, T.LAUREL_L,
        T.LAUREL_R, T.LAUREL_POST_NORM)},
}
# tensors read one row per token (GET_ROWS), not whole
LOOKUP_TENSORS = frozenset({T.TOKEN_EMBD, T.PER_LAYER_TOKEN_EMBD, T.POS_EMBD, T.TOKEN_TYPES})


def _stage_by_name(fmt: str) -> str:
    base = fmt.split("{bid}.")[-1]
    if "norm" in base:
        return NORM
    if base.startswith("ffn"):
        return FFN
    if base.startswith("attn_"):
        return ATTN_PROJ
    return OTHER


TENSOR_STAGES: dict[gguf.MODEL_TENSOR, str] = {
    t: _EXPLICIT.get(t) or _stage_by_name(gguf.TENSOR_NAMES[t]) for t in gguf.TENSOR_NAMES}
_BY_NAME: dict[str, gguf.MODEL_TENSOR] = {}
for _t, _fmt in gguf.TENSOR_NAMES.items():
    _BY_NAME.setdefault(_fmt.replace("{bid}", "#"), _t)  # first enum wins where gguf-py reuses a name
_BLK_NUM_RE = re.compile(r"^((?:[a-z]+\.)?blk)\.\d+\.")
_TENSOR_SUFFIX_RE = re.compile(r"\.(weight|bias|scale)$")


def gguf_tensor(name: str) -> gguf.MODEL_TENSOR | None:
    """The gguf-py tensor kind of a model tensor name (``blk.3.ffn_up.weight`` -> FFN_UP); None if unknown."""
    base = _TENSOR_SUFFIX_RE.sub("", name)
    if base == name:
        return None  # a model tensor carries .weight / .bias / .scale; activations and inputs do not
    return _BY_NAME.get(_BLK_NUM_RE.sub(r"\1.#.", base))


def tensor_stage(name: str, op: str = "MUL_MAT") -> str | None:
    """Stage of the op that reads model tensor ``name``; None when the name is no known gguf tensor.
    ``token_embd`` is ``other`` as a lookup (GET_ROWS) and ``lm_head`` when multiplied (tied output)."""
    t = gguf_tensor(name)
    if t is None:
        return None
    if t is T.TOKEN_EMBD and op != "GET_ROWS":
        return LM_HEAD
    return TENSOR_STAGES[t]


# ---------------------------------------------------------------- rules
_WEIGHT_OPS = {"MUL_MAT", "MUL_MAT_ID", "GET_ROWS"}
_STORE_OPS = {"SET_ROWS", "CPY"}
_CACHE_RE = re.compile(r"^cache_[kv]_l(\d+)")
_SUFFIX_RE = re.compile(r"(\s*\([a-z ]+\))+$")
_LAYER_RE = re.compile(r"-(\d+)$")
_UNNAMED_RE = re.compile(r"^(node_\d+|leaf_\d+)?$")
GENERIC_NAMES = {"norm"}
NOOP_OPS = {"VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE", "NONE"}

# (base name, op) -> stage, before NAME_STAGES: Gemma 3n's l_out is AltUp's CONCAT of the corrected
# predictions, and its (permuted) (cont) copy is the next layer's altup_predict input; elsewhere
# l_out is the residual ADD (other)
NAME_OP_STAGES: dict[tuple[str, str], str] = {("l_out", "CONCAT"): GEMMA3N_EXTRA, ("l_out", "CONT"): GEMMA3N_EXTRA}

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


def strip_suffixes(name: str) -> str:
    """'Qcur-3' from 'Qcur-3 (view) (permuted)': the name without ggml's view/copy suffixes."""
    return _SUFFIX_RE.sub("", name).strip()


def cache_layer(name: str) -> int | None:
    """N of a KV-cache tensor ``cache_k_lN``/``cache_v_lN`` (or a view, cast or copy named after one); else None."""
    m = _CACHE_RE.match(name)
    return int(m.group(1)) if m else None


def base_name(name: str) -> tuple[str, int]:
    """('Qcur', 3) from 'Qcur-3 (view) (permuted)'; layer -1 when there is no suffix."""
    n = strip_suffixes(name)
    m = _LAYER_RE.search(n)
    if m:
        return n[: m.start()], int(m.group(1))
    return n, -1


def classify_weight(weight: str, op: str) -> str | None:
    """Stage of an op reading ``weight`` (a view of one counts as the weight); see ``tensor_stage``."""
    return tensor_stage(strip_suffixes(weight), op)


def is_cache_cast(name: str, op: str) -> bool:
    """An f32 cache view cast to f16 for flash attention (``build_attn_mha``: ``ggml_cast`` names it "<view> (copy)";
    a store into the cache is a SET_ROWS, or a ``ggml_cpy`` named "<dst> (copy of <src>)"): attention reads it."""
    return op == "CPY" and name.endswith(" (copy)") and bool(_CACHE_RE.match(name))


def _is_cache_store(name: str, op: str) -> bool:
    """A write into the KV cache (given a node named after a cache tensor): not a view, not a cast."""
    return op in _STORE_OPS and not is_cache_cast(name, op)


def classify_own(name: str, op: str, src0: str, src1: str = "") -> str | None:
    """Stage from rules 1-3, or None when the node must take its stage from the next one."""
    if op in NOOP_OPS:
        return None  # computes nothing: plumbing for its consumer (saves a sync at stage edges)
    if op == "FLASH_ATTN_EXT":
        return ATTN_KV
    if _CACHE_RE.match(name):
        return KV_STORE if _is_cache_store(name, op) else ATTN_KV
    stage = classify_weight(src0, op) if op in _WEIGHT_OPS else None
    if stage is None and src1:
        stage = classify_weight(src1, op)
    if stage is not None:
        return stage
    base, _ = base_name(name)
    if _UNNAMED_RE.match(base) or base in GENERIC_NAMES:
        return None
    if (base, op) in NAME_OP_STAGES:
        return NAME_OP_STAGES[(base, op)]
    if base in NAME_STAGES:
        return NAME_STAGES[base]
    best = max((k for k in NAME_STAGES if base.startswith(k)), key=len, default=None)
    return NAME_STAGES[best] if best else OTHER


def classify_graph(nodes: list[tuple[str, ...]]) -> list[str]:
    """Stages for a whole graph, given (name, op, src0) or (name, op, src0, src1) per node in execution order."""
    own = [classify_own(*n[:4]) for n in nodes]
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


def _own_layer(name: str, op: str, src0: str) -> int | None:
    """A node's own layer, or None when it takes the layer of the next node that has one."""
    cache = cache_layer(name)
    if cache is not None:
        return cache if _is_cache_store(name, op) else None  # a view or a cast: the reading layer decides
    if op in _WEIGHT_OPS and gguf_tensor(strip_suffixes(src0)) is not None:
        m = _BLK_RE.match(src0)
        return int(m.group(1)) if m else -1  # a global weight (altup_unembd_proj, per_layer_*) is no layer's
    base, layer = base_name(name)
    if layer >= 0:
        return layer
    if _UNNAMED_RE.match(base) or base in GENERIC_NAMES:
        return None
    return -1  # named without a layer (inp_per_layer, unembd_merged, result_norm)


def classify_layers(nodes: list[tuple[str, ...]]) -> list[int]:
    """Layer per node: a KV store's cache layer, the ``blk.N.`` of a weight a node multiplies (-1 for a
    global weight), the name's ``-N`` suffix, -1 for a node named without one; unnamed, generic and
    cache-view nodes take the layer of the next node decided (a shared-KV layer reading
    ``cache_k_l18`` counts in its own layer); -1 when none follows."""
    out = [-1] * len(nodes)
    nxt = -1
    for i in range(len(nodes) - 1, -1, -1):
        own = _own_layer(*nodes[i][:3])
        if own is not None:
            nxt = own
        out[i] = nxt
    return out
