"""Twin presets and quant layouts: the shapes and ggml types of real models, as data.

A preset lists every tensor a real GGUF of that model holds (name, ggml shape) and its
hyperparameter keys. A quant layout maps each tensor to the ggml type llama.cpp's own
recipe would give it (``src/llama-quant.cpp`` in the vendored llama.cpp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf

from harness.gguf_model import GEMMA3N_KV_FROM_START, ModelInfo, TensorRecord
from harness.stages import gguf_tensor

T = gguf.MODEL_TENSOR


def tn(t: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
    name = gguf.TENSOR_NAMES[t]
    return (name.format(bid=bid) if bid is not None else name) + ".weight"


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int = 0  # 0: no sliding-window attention
    swa_period: int = 5  # every 5th layer (4, 9, ...) is global, the rest slide
    n_embd_altup: int = 256  # gemma3n: hard-coded 256 in llama.cpp
    n_altup: int = 4
    laurel_rank: int = 64
    n_layer_sparsity: int = 10
    n_layer_kv_from_start: int = GEMMA3N_KV_FROM_START  # gemma3n: hard-coded in llama.cpp
    rope_freq_base: float = 1_000_000.0
    rope_freq_base_swa: float = 10_000.0
    final_logit_softcap: float = 30.0
    description: str = ""

    def is_swa(self, il: int) -> bool:
        return self.n_swa > 0 and (il % self.swa_period) != self.swa_period - 1

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, ggml shape with ne[0] first) for every tensor, in file order."""
        if self.arch == "gemma3n":
            return self._gemma3n_tensors()
        return self._llama_tensors()

    def _gemma3n_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        e, ff, hd, a, na = self.n_embd, self.n_ff, self.head_dim, self.n_embd_altup, self.n_altup
        q, kv = self.n_head * hd, self.n_head_kv * hd
        out = [
            (tn(T.TOKEN_EMBD), (e, self.n_vocab)),
            (tn(T.PER_LAYER_TOKEN_EMBD), (a * self.n_layer, self.n_vocab)),
            (tn(T.PER_LAYER_MODEL_PROJ), (e, a * self.n_layer)),
            (tn(T.PER_LAYER_PROJ_NORM), (a,)),
            (tn(T.ALTUP_PROJ), (e, e, na - 1)),
            (tn(T.ALTUP_UNEMBD_PROJ), (e, e, na - 1)),
            (tn(T.OUTPUT_NORM), (e,)),
        ]
        for i in range(self.n_layer):
            out += [
                (tn(T.ATTN_NORM, i), (e,)),
                (tn(T.ATTN_Q, i), (e, q)),
                (tn(T.ATTN_K, i), (e, kv)),
                (tn(T.ATTN_V, i), (e, kv)),
                (tn(T.ATTN_OUT, i), (q, e)),
                (tn(T.ATTN_Q_NORM, i), (hd,)),
                (tn(T.ATTN_K_NORM, i), (hd,)),
                (tn(T.ATTN_POST_NORM, i), (e,)),
                (tn(T.FFN_NORM, i), (e,)),
                (tn(T.FFN_GATE, i), (e, ff)),
                (tn(T.FFN_UP, i), (e, ff)),
                (tn(T.FFN_DOWN, i), (ff, e)),
                (tn(T.FFN_POST_NORM, i), (e,)),
                (tn(T.PER_LAYER_INP_GATE, i), (e, a)),
                (tn(T.PER_LAYER_PROJ, i), (a, e)),
                (tn(T.PER_LAYER_POST_NORM, i), (e,)),
                (tn(T.ALTUP_CORRECT_COEF, i), (na, na)),
                (tn(T.ALTUP_CORRECT_SCALE, i), (e,)),
                (tn(T.ALTUP_PREDICT_COEF, i), (na, na * na)),
                (tn(T.ALTUP_ROUTER, i), (e, na)),
                (tn(T.ALTUP_ROUTER_NORM, i), (e,)),
                (tn(T.LAUREL_L, i), (e, self.laurel_rank)),
                (tn(T.LAUREL_R, i), (self.laurel_rank, e)),
                (tn(T.LAUREL_POST_NORM, i), (e,)),
            ]
        return out

    def _llama_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        e, ff, hd = self.n_embd, self.n_ff, self.head_dim
        q, kv = self.n_head * hd, self.n_head_kv * hd
        out = [(tn(T.TOKEN_EMBD), (e, self.n_vocab)), (tn(T.OUTPUT_NORM), (e,)), (tn(T.OUTPUT), (e, self.n_vocab))]
        for i in range(self.n_layer):
            out += [
                (tn(T.ATTN_NORM, i), (e,)),
                (tn(T.ATTN_Q, i), (e, q)),
                (tn(T.ATTN_K, i), (e, kv)),
                (tn(T.ATTN_V, i), (e, kv)),
                (tn(T.ATTN_OUT, i), (q, e)),
                (tn(T.FFN_NORM, i), (e,)),
                (tn(T.FFN_GATE, i), (e, ff)),
                (tn(T.FFN_UP, i), (e, ff)),
                (tn(T.FFN_DOWN, i), (ff, e)),
            ]
        return out


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("gemma-3n-e4b", "gemma3n", n_layer=35, n_embd=2048, n_ff=16384, n_head=8, n_head_kv=2,
               head_dim=256, n_vocab=262400, n_ctx_train=32768, n_swa=512,
               description="Gemma 3n E4B text decoder (6.9 B parameters)"),
        Preset("gemma-3n-e2b", "gemma3n", n_layer=30, n_embd=2048, n_ff=8192, n_head=8, n_head_kv=2,
               head_dim=256, n_vocab=262400, n_ctx_train=32768, n_swa=512,
               description="Gemma 3n E2B text decoder"),
        Preset("tiny", "gemma3n", n_layer=25, n_embd=256, n_ff=512, n_head=2, n_head_kv=1,
               head_dim=128, n_vocab=1024, n_ctx_train=4096, n_swa=32,
               description="gemma3n architecture at small dims, for tests (25 layers: 20 own KV, 5 share it)"),
        Preset("tiny-llama", "llama", n_layer=2, n_embd=256, n_ff=512, n_head=2, n_head_kv=1,
               head_dim=128, n_vocab=1024, n_ctx_train=4096, rope_freq_base=10_000.0,
               description="llama architecture at small dims, for tests of non-Gemma graphs"),
    )
}

QUANTS = ("q4_k_m", "q4_0", "q8_0")
FILE_TYPE = {"q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_BASE = {"q4_k_m": "Q4_K", "q4_0": "Q4_0", "q8_0": "Q8_0"}
# llama.cpp's fallback when a row length is not a multiple of the type's block size
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0", "Q4_0": "Q8_0", "Q8_0": "F16", "Q5_0": "Q8_0"}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's ``use_more_bits``: first/last eighth and every third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# tensor kinds (gguf.MODEL_TENSOR, as harness.stages.gguf_tensor names them) the Q4_K_M recipe treats apart:
# llama-quant.cpp never quantizes names holding "altup", "laurel" or "per_layer_model_proj"
_UNQUANTIZED = frozenset({T.ALTUP_PROJ, T.ALTUP_UNEMBD_PROJ, T.ALTUP_CORRECT_COEF, T.ALTUP_CORRECT_SCALE,
                          T.ALTUP_PREDICT_COEF, T.ALTUP_ROUTER, T.ALTUP_ROUTER_NORM, T.LAUREL_L, T.LAUREL_R,
                          T.LAUREL_POST_NORM, T.PER_LAYER_MODEL_PROJ})
_F32 = frozenset({T.ALTUP_CORRECT_COEF, T.ALTUP_PREDICT_COEF})  # convert_hf_to_gguf writes these F32 (base.py)
_MORE_BITS = frozenset({T.ATTN_V, T.FFN_DOWN})  # Q6_K in use_more_bits layers
_TIED_OUTPUT = frozenset({T.TOKEN_EMBD, T.PER_LAYER_TOKEN_EMBD})  # Q6_K as the output when tied


def quant_type(name: str, shape: tuple[int, ...], quant: str, n_layer: int, tied: bool) -> str:
    """The ggml type a tensor gets under a layout; mirrors llama.cpp's Q4_K_M recipe.

    ``q4_0`` and ``q8_0`` are pure layouts (like ``llama-quantize --pure``): every quantizable
    matrix gets the base type, the token embedding included.
    """
    kind = gguf_tensor(name)
    if len(shape) < 2 or name.endswith("_norm.weight") or kind in _F32:
        return "F32"
    if kind in _UNQUANTIZED:
        return "F16"
    ty = _BASE[quant]
    if quant == "q4_k_m":
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        is_output = kind is T.OUTPUT or (tied and kind in _TIED_OUTPUT)
        if is_output or (kind in _MORE_BITS and use_more_bits(layer, n_layer)):
            ty = "Q6_K"
    while ty in _FALLBACK and shape[0] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ty]][0] != 0:
        ty = _FALLBACK[ty]
    return ty


def layout(preset: Preset, quant: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, ggml type) for every tensor of a preset under a quant layout."""
    tensors = preset.tensors()
    tied = not any(n == "output.weight" for n, _ in tensors)
    return [(n, s, quant_type(n, s, quant, preset.n_layer, tied)) for n, s in tensors]


def byte_shape(ggml_type: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored shape in numpy (row-major) order with rows in bytes (gguf-py's own arithmetic)."""
    return gguf.quant_shape_to_byte_shape(tuple(reversed(shape)), gguf.GGMLQuantizationType[ggml_type])


def type_nbytes(ggml_type: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of this ggml type and shape (ne[0] first)."""
    n = 1
    for d in byte_shape(ggml_type, shape):
        n *= d
    return n


def model_info(preset: str, quant: str = "q4_k_m") -> ModelInfo:
    """The ModelInfo a ``harness.twin`` file of this preset would have, without writing the file."""
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
