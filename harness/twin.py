"""Shape-faithful synthetic twins: GGUFs with a real model's architecture, shapes, quant types
and metadata, filled with random weights.

    python -m harness.twin --preset gemma-3n-e4b --quant q4_k_m -o models/gemma-3n-e4b-q4.gguf

Quantized tensors are written as valid blocks directly: random payload bytes with small finite
fp16 scales, so no float weights are ever materialised or requantized. Payload bytes come from
a 16 MiB random pool read at a fresh random offset per chunk, which keeps generation at disk
speed. Decode kernels do the same work whatever the values are; the text produced is noise.
The file carries ``harness.synthetic = true``, and every run made on it says so. An existing file at the
output path is replaced only when it is a twin itself (a real model is never overwritten).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import gguf
import numpy as np

from harness.cli import ArgParser, run_cli
from harness.errors import InputError, OutputError, UsageError
from harness.fsutil import atomic_write, clean_stale_temps
from harness.gguf_model import SYNTHETIC_KEY, SYNTHETIC_PRESET_KEY
from harness.model_cache import read_model
from harness.presets import FILE_TYPE, PRESETS, QUANTS, Preset, byte_shape, layout, type_nbytes

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path("models/gemma-3n-e4b-q4.gguf")
DEFAULT_PRESET = "gemma-3n-e4b"
DEFAULT_QUANT = "q4_k_m"
N_SPECIAL = 4  # <pad> <eos> <bos> <unk>
_POOL_BYTES = 16 << 20
_CHUNK = 64 << 20
# byte offset of each block's fp16 scale(s) inside a block, per quant type
_SCALE_OFFSETS = {"Q4_K": (0, 2), "Q6_K": (208,), "Q4_0": (0,), "Q8_0": (0,), "Q5_0": (0,)}


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_toks = [f"<0x{b:02X}>" for b in range(256)]
    n_normal = n_vocab - len(special) - len(byte_toks)
    if n_normal < 1:
        raise UsageError(f"vocab of {n_vocab} is too small for a synthetic tokenizer")
    tokens = special + byte_toks + [f"\u2581t{i}" for i in range(n_normal)]
    scores = [0.0] * (len(special) + len(byte_toks)) + [-float(i) for i in range(n_normal)]
    types = ([gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * n_normal)
    return tokens, scores, [int(t) for t in types]


def first_normal_token() -> int:
    """Ids from here up are ordinary (non-special, non-byte) tokens in a twin's vocab."""
    return N_SPECIAL + 256


def _add_hparams(w: gguf.GGUFWriter, p: Preset, quant: str) -> None:
    w.add_name(f"{p.name} synthetic twin ({quant})")
    w.add_description(f"Synthetic shape-faithful twin of {p.description}; random weights, not a real model.")
    w.add_file_type(int(FILE_TYPE[quant]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(p.n_ctx_train)
    w.add_embedding_length(p.n_embd)
    w.add_block_count(p.n_layer)
    w.add_head_count(p.n_head)
    w.add_head_count_kv(p.n_head_kv)
    w.add_key_length(p.head_dim)
    w.add_value_length(p.head_dim)
    w.add_rope_freq_base(p.rope_freq_base)
    w.add_layer_norm_rms_eps(1e-6)
    if p.arch == "gemma3n":
        w.add_feed_forward_length([p.n_ff] * p.n_layer)
        w.add_sliding_window(p.n_swa)
        w.add_rope_freq_base_swa(p.rope_freq_base_swa)
        w.add_final_logit_softcapping(p.final_logit_softcap)
        w.add_altup_active_idx(0)
        w.add_altup_num_inputs(p.n_altup)
        w.add_embedding_length_per_layer_input(p.n_embd_altup)
        w.add_shared_kv_layers(p.n_layer - p.n_layer_kv_from_start)
        std_mul = 1.6448533535003662  # normal icdf(0.95), as the converter writes it
        w.add_activation_sparsity_scale([std_mul if i < p.n_layer_sparsity else 0.0 for i in range(p.n_layer)])
        w.add_sliding_window_pattern([p.is_swa(i) for i in range(p.n_layer)])
    else:
        w.add_feed_forward_length(p.n_ff)
        w.add_rope_dimension_count(p.head_dim)
        w.add_vocab_size(p.n_vocab)
    tokens, scores, types = _vocab(p.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_bool(SYNTHETIC_KEY, True)
    w.add_string(SYNTHETIC_PRESET_KEY, p.name)


class _Filler:
    """Makes tensor payloads: random valid quant blocks, or small random floats."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.integers(0, 256, size=_POOL_BYTES, dtype=np.uint8)

    def data(self, name: str, shape: tuple[int, ...], ggml_type: str) -> np.ndarray:
        n = type_nbytes(ggml_type, shape)
        if ggml_type == "F32":
            is_norm = name.endswith("norm.weight") or name.endswith("correct_scale.weight")
            return (np.ones(n // 4, np.float32) if is_norm
                    else self.rng.standard_normal(n // 4, dtype=np.float32) * np.float32(0.02))
        if ggml_type == "F16":
            return (self.rng.standard_normal(n // 2, dtype=np.float32) * np.float32(0.02)).astype(np.float16)
        out = np.empty(n, np.uint8)
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            pos = start
            while pos < stop:
                off = int(self.rng.integers(0, _POOL_BYTES // 2))
                take = min(stop - pos, _POOL_BYTES - off)
                out[pos:pos + take] = self.pool[off:off + take]
                pos += take
        block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]][1]
        blocks = out.reshape(-1, block_bytes)
        scale = np.frombuffer(np.float16(2.0 ** -10).tobytes(), np.uint8)
        for o in _SCALE_OFFSETS[ggml_type]:
            blocks[:, o:o + 2] = scale
        return out


def is_twin(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a GGUF with ``harness.synthetic = true`` (a twin), as ``gguf_model.read_model`` reads
    it; False for anything unreadable or malformed."""
    try:
        return read_model(path).synthetic
    except InputError:
        return False


def twin_bytes(preset: str, quant: str) -> int:
    """A twin's file size, near enough for a message: tensor data at 32-byte alignment, tensor infos, the vocab."""
    p, tensors = PRESETS[preset], layout(PRESETS[preset], quant)
    data = sum(-(-type_nbytes(ty, s) // 32) * 32 + 24 + len(n) + 8 * len(s) for n, s, ty in tensors)
    return data + sum(16 + len(t.encode()) for t in _vocab(p.n_vocab)[0])  # length, token, score, type


def write_twin(preset: str, quant: str, out: str | os.PathLike, seed: int = 0) -> Path:
    """Write a twin GGUF atomically (temp file, then rename). Returns the final path. Everything is checked
    before anything is created; an existing file at ``out`` is replaced only when it is a twin itself."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r} (choose from: {', '.join(PRESETS)})")
    if quant not in QUANTS:
        raise UsageError(f"unknown quant {quant!r} (choose from: {', '.join(QUANTS)})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed must be an integer >= 0, got {seed!r}")
    p = PRESETS[preset]
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"output path is a directory: {out}")
    if out.exists():
        if not is_twin(out):
            raise UsageError(f"{out} exists and is not a synthetic twin (no {SYNTHETIC_KEY} = true): "
                             "remove it or choose another output path")
        log.info("replacing the twin %s", out)
    made = [x for x in (out.parent, *out.parent.parents) if not x.exists()][::-1]  # removed again on failure
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create output folder {out.parent}: {e.strerror or e}") from None
        if not os.access(out.parent, os.W_OK):
            raise OutputError(f"output folder is not writable: {out.parent}")
        _write(p, quant, out, seed)
    except BaseException:
        for x in reversed(made):
            with contextlib.suppress(OSError):
                x.rmdir()
        raise
    return out


def _write(p: Preset, quant: str, out: Path, seed: int) -> None:
    tensors = layout(p, quant)
    clean_stale_temps(out.parent)
    t0 = time.perf_counter()

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), p.arch)
        try:
            _add_hparams(w, p, quant)
            raw = {"F32": None, "F16": None}
            for name, shape, ty in tensors:
                qtype = gguf.GGMLQuantizationType[ty]
                dtype = {"F32": np.float32, "F16": np.float16}.get(ty, np.uint8)
                # add_tensor_info takes numpy (row-major) order, ne reversed; quant types in bytes per row
                np_shape = tuple(reversed(shape)) if ty in raw else byte_shape(ty, shape)
                w.add_tensor_info(name, np_shape, np.dtype(dtype), type_nbytes(ty, shape),
                                  raw_dtype=None if ty in raw else qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            filler = _Filler(seed)
            total = sum(type_nbytes(ty, s) for _, s, ty in tensors)
            done, last_report = 0, 0.0
            for name, shape, ty in tensors:
                w.write_tensor_data(filler.data(name, shape, ty))
                done += type_nbytes(ty, shape)
                if time.perf_counter() - last_report > 5:
                    last_report = time.perf_counter()
                    log.info("  wrote %.2f / %.2f GB", done / 1e9, total / 1e9)
        finally:
            w.close()

    try:
        atomic_write(out, write, overwrite=True)  # a twin replaces an older twin of the same name
    except OSError as e:
        raise OutputError(f"cannot write twin to {out}: {e.strerror or e}") from None
    log.info("twin %s (%s) -> %s: %.2f GB in %.1f s", p.name, quant, out, out.stat().st_size / 1e9,
             time.perf_counter() - t0)


def ensure_default_model(path: Path = DEFAULT_MODEL) -> Path:
    """Make the default E4B Q4_K_M twin if it is missing."""
    if not path.exists():
        log.info("default model %s is missing: generating the %s %s twin (%.2f GB, about 15 s at disk speed)",
                 path, DEFAULT_PRESET, DEFAULT_QUANT, twin_bytes(DEFAULT_PRESET, DEFAULT_QUANT) / 1e9)
        write_twin(DEFAULT_PRESET, DEFAULT_QUANT, path)
    return path


def default_out(preset: str, quant: str) -> Path:
    """Where ``harness.twin`` writes without -o: the sweep's default model for the default preset and quant (so
    that ``harness-twin`` then ``harness-sweep`` makes it once), else models/<preset>-<quant>.gguf."""
    default = (preset, quant) == (DEFAULT_PRESET, DEFAULT_QUANT)
    return DEFAULT_MODEL if default else Path(f"models/{preset}-{quant}.gguf")


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="python -m harness.twin", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of: {', '.join(PRESETS)}")
    ap.add_argument("--quant", default=DEFAULT_QUANT, help=f"one of: {', '.join(QUANTS)}")
    ap.add_argument("-o", "--out", default=None,
                    help=f"output GGUF path (default: {DEFAULT_MODEL}, the sweep's default model, for the default "
                         "preset and quant; models/<preset>-<quant>.gguf for others); an existing file is replaced "
                         "only if it is a twin")
    ap.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    ap.add_argument("--list", action="store_true", help="list presets and exit")
    a = ap.parse_args(argv)
    if a.list:
        sys.stdout.write("".join(f"{p.name:<14} {p.arch:<8} {p.description}\n" for p in PRESETS.values()))
        return 0
    write_twin(a.preset, a.quant, default_out(a.preset, a.quant) if a.out is None else a.out, seed=a.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("harness.twin", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
