"""Read a GGUF file into a typed, immutable record (architecture, hyperparameters, tensor table).

All GGUF parsing goes through gguf-py's ``GGUFReader``; nothing here hand-parses the format.
The record is plain data so that it can be stored in a run's metadata and rebuilt from it
(``ModelInfo.to_dict`` / ``ModelInfo.from_dict``) on a machine that lacks the model file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from harness.errors import InputError, UsageError

log = logging.getLogger(__name__)
SYNTHETIC_KEY = "harness.synthetic"
SYNTHETIC_PRESET_KEY = "harness.twin_preset"
GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
GEMMA3N_KV_FROM_START = 20  # llama.cpp src/models/gemma3n.cpp: hparams.n_layer_kv_from_start


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] first (the row length)
    ggml_type: str  # e.g. "Q4_K", "F32"
    n_elements: int
    n_bytes: int

    @property
    def layer(self) -> int | None:
        m = _LAYER_RE.match(self.name)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ModelInfo:
    path: str
    file_bytes: int
    arch: str
    name: str
    hparams: dict  # "<arch>.x" keys with the arch prefix stripped, plus a few general.* keys
    tensors: tuple[TensorRecord, ...] = field(repr=False)
    synthetic: bool = False
    twin_preset: str = ""

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def n_layer(self) -> int:
        return int(self.hparams.get("block_count", 0))

    @property
    def n_ctx_train(self) -> int:
        return int(self.hparams.get("context_length", 0))

    @property
    def n_swa(self) -> int:
        """The sliding window in cells (``attention.sliding_window``); 0: none."""
        return int(self.hparams.get("attention.sliding_window") or 0)

    def tensor(self, name: str) -> TensorRecord | None:
        return next((t for t in self.tensors if t.name == name), None)

    def type_summary(self) -> dict[str, int]:
        """Bytes per ggml type over the whole file."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.ggml_type] = out.get(t.ggml_type, 0) + t.n_bytes
        return dict(sorted(out.items()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tensors"] = [[t.name, list(t.shape), t.ggml_type, t.n_elements, t.n_bytes] for t in self.tensors]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelInfo:
        tensors = tuple(
            TensorRecord(name=n, shape=tuple(s), ggml_type=ty, n_elements=ne, n_bytes=nb)
            for n, s, ty, ne, nb in d["tensors"]
        )
        return cls(
            path=d["path"], file_bytes=d["file_bytes"], arch=d["arch"], name=d.get("name", ""),
            hparams=dict(d["hparams"]), tensors=tensors, synthetic=bool(d.get("synthetic", False)),
            twin_preset=d.get("twin_preset", ""),
        )


def cache_type_bytes(cache_type: str) -> float:
    """Bytes per element of a KV-cache type: f16 -> 2, q8_0 -> 34/32, q4_0 -> 18/32."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[cache_type.upper()]]
    except KeyError:
        raise UsageError(f"unknown KV cache type {cache_type!r}") from None
    return size / block


def kv_owners(info: ModelInfo) -> list[bool]:
    """Per layer: does it own a KV cache? (Gemma 3n: only layers below 20, which llama.cpp hard-codes; Gemma 4:
    below n_layer - ``attention.shared_kv_layers``; the rest reuse the last two owners' caches.)"""
    n_from = info.n_layer
    if info.arch == "gemma3n":
        n_from = min(GEMMA3N_KV_FROM_START, info.n_layer)
    elif info.arch == "gemma4":
        n_from = info.n_layer - int(info.hparams.get("attention.shared_kv_layers") or 0)
    return [il < n_from for il in range(info.n_layer)]


def kv_cache_layer(il: int, sliding: list[bool], owners: list[bool]) -> int:
    """The layer whose cache layer ``il`` reads: its own, or for a Gemma 3n shared-KV layer
    n_layer_kv_from_start - 2 if it slides, - 1 if global (``llama_model::create_memory``, reuse callback)."""
    return il if owners[il] else sum(owners) - (2 if sliding[il] else 1)


DEFAULT_SWA_PERIOD = {"gemma3n": 5, "gemma3": 6, "gemma2": 2}  # every Nth layer (il % N == N-1) is global


def swa_layers(info: ModelInfo) -> list[bool]:
    """Per layer: does it use sliding-window attention (``attention.sliding_window_pattern``)?"""
    hp, n_layer = info.hparams, info.n_layer
    if not info.n_swa:
        return [False] * n_layer
    pat = hp.get("attention.sliding_window_pattern")
    if isinstance(pat, list) and len(pat) == n_layer:
        return [bool(x) for x in pat]
    period = int(pat) if isinstance(pat, int) and pat > 0 else DEFAULT_SWA_PERIOD.get(info.arch)
    if period is None:
        log.warning("%s: sliding_window set but no pattern; treating every layer as sliding", info.arch)
        return [True] * n_layer
    return [il % period != period - 1 for il in range(n_layer)]


KV_PAD = 256  # llama.cpp pads cache sizes and the attended cell count to this many cells


def _pad(n: int, to: int = KV_PAD) -> int:
    return -(-n // to) * to


def kv_cache_cells(sliding: bool, *, n_ctx: int, n_swa: int, n_ubatch: int, n_batch: int | None = None) -> int:
    """Cells of a layer's KV cache for one sequence (``swa_full`` off, as the harness sets it).
    ``llama_context``: n_ctx is padded to 256 and the effective n_ubatch is min(n_ctx, n_batch, n_ubatch);
    the base cache holds n_ctx cells. ``llama_kv_cache_iswa`` constructor: the sliding cache holds
    GGML_PAD(min(n_ctx, n_swa + n_ubatch), 256) (Gemma 3n: 768 at n_ctx 659, 1,024 once n_ctx > 768)."""
    ctx = _pad(max(1, n_ctx))
    if not (sliding and n_swa):
        return ctx
    ub = min(n_ctx, n_batch if n_batch else n_ubatch, n_ubatch)
    return _pad(min(ctx, n_swa + ub))


def kv_cells(depth: int, sliding: bool, *, n_ctx: int, n_swa: int, n_ubatch: int, flash_attn: bool,
             n_batch: int | None = None, restored: bool = False) -> int:
    """KV cells one attention layer reads to decode the token at position ``depth`` (depth cells cached).

    - No flash attention: the ``kq``/``kqv`` matmuls read every cell of the cache view, masked or not,
      n_kv = min(cache cells, max(256, PAD(used + 1, 256))) (``llama_kv_cache::get_n_kv``: used_max_p1
      counts the token's own cell; cache cells: ``kv_cache_cells``), >= 256 always. ``used`` is depth,
      except in a sliding cache ``restored`` from a saved state: ``llama_kv_cache::state_write`` skips
      SWA-masked cells, so it holds min(depth, n_swa) cells (the harness's profiled context is one).
    - Flash attention: the CPU kernel skips cells the mask sets to -inf
      (``ggml_compute_forward_flash_attn_ext_f16_one_chunk``), reading depth + 1 in a global layer and
      min(depth + 1, n_swa) in a sliding one (``llama_hparams::is_masked_swa``: visible while p1 - p0 < n_swa).
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    window = sliding and n_swa
    if flash_attn:
        return min(depth + 1, n_swa) if window else depth + 1
    used = (min(depth, n_swa) if window and restored else depth) + 1
    size = kv_cache_cells(sliding, n_ctx=max(n_ctx, depth + 1), n_swa=n_swa, n_ubatch=n_ubatch, n_batch=n_batch)
    return min(size, max(KV_PAD, _pad(min(used, size))))


def check_gguf_file(path: str | os.PathLike) -> Path:
    """Cheap checks before the full parse: exists, is a file, non-empty, GGUF magic, known version."""
    try:
        return _check_gguf_file(Path(path))
    except OSError as e:
        raise InputError(f"cannot read model file ({e.strerror or e}): {path}") from None


def _check_gguf_file(p: Path) -> Path:
    if not p.exists():
        raise InputError(f"model file not found: {p}")
    if p.is_dir():
        raise InputError(f"model path is a directory, not a GGUF file: {p}")
    size = p.stat().st_size
    if size == 0:
        raise InputError(f"model file is empty: {p}")
    with open(p, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise InputError(f"not a GGUF file (truncated header, {size} bytes): {p}")
    if head[:4] != GGUF_MAGIC:
        raise InputError(f"not a GGUF file (bad magic {head[:4]!r}): {p}")
    version = int.from_bytes(head[4:8], "little")
    if version not in SUPPORTED_VERSIONS:
        raise InputError(f"unsupported GGUF version {version} (supported: 2, 3): {p}")
    with open(p, "rb") as f:
        f.seek(8)
        counts = f.read(16)
    if len(counts) < 16:
        raise InputError(f"truncated GGUF header ({size} bytes): {p}")
    n_tensors, n_kv = int.from_bytes(counts[:8], "little"), int.from_bytes(counts[8:], "little")
    # every tensor info takes >= 24 bytes and every KV pair >= 13: larger counts cannot fit the file
    if n_tensors > size // 24 or n_kv > size // 13:
        raise InputError(f"corrupt or truncated GGUF: the header declares {n_tensors} tensors and {n_kv} "
                         f"metadata keys, which cannot fit in {size} bytes: {p}")
    return p


def read_model(path: str | os.PathLike) -> ModelInfo:
    """Parse a GGUF into a ModelInfo, turning every malformation into a one-line InputError."""
    from gguf import GGUFReader

    p = check_gguf_file(path)
    try:
        reader = GGUFReader(p, "r")
    except (ValueError, IndexError, KeyError, OverflowError, MemoryError, TypeError, UnicodeDecodeError,
            OSError) as e:
        msg = (str(e).splitlines()[0] if str(e) else type(e).__name__)[:100]
        raise InputError(f"corrupt or truncated GGUF: parsing {p.stat().st_size} bytes failed ({msg}): {p}") from None

    file_bytes = p.stat().st_size
    kv = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("tokenizer."):
            continue
        try:
            kv[key] = fld.contents()  # gguf-py decodes scalars, strings and arrays
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise InputError(f"corrupt GGUF metadata value {key} ({type(e).__name__}): {p}") from None
    arch = kv.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InputError(f"GGUF has no general.architecture key: {p}")
    prefix = arch + "."
    hparams = {k[len(prefix):]: v for k, v in kv.items() if k.startswith(prefix)}
    for k in ("general.file_type", "general.quantization_version", "general.size_label"):
        if k in kv:
            hparams[k] = kv[k]
    tok = reader.fields.get("tokenizer.ggml.tokens")
    if tok is not None:
        hparams["vocab_size"] = len(tok.data)

    tensors = []
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > file_bytes:
            raise InputError(f"truncated GGUF: tensor {t.name} ends at byte {end} past file end {file_bytes}: {p}")
        tensors.append(TensorRecord(
            name=t.name, shape=tuple(int(x) for x in np.asarray(t.shape).tolist()),
            ggml_type=t.tensor_type.name, n_elements=int(t.n_elements), n_bytes=int(t.n_bytes),
        ))
    return ModelInfo(
        path=str(p), file_bytes=file_bytes, arch=arch, name=str(kv.get("general.name", "")),
        hparams=hparams, tensors=tuple(tensors), synthetic=bool(kv.get(SYNTHETIC_KEY, False)),
        twin_preset=str(kv.get(SYNTHETIC_PRESET_KEY, "")),
    )


def content_hash(path: str | os.PathLike, sample_bytes: int = 1 << 20) -> str:
    """A fast content hash: size + sha256 of the head, middle and tail 1 MiB.

    Hashing 4.7 GB fully costs ~10 s; sampled hashing is enough to tell two model files apart
    (header + tensor table + data samples) and costs milliseconds.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        h = hashlib.sha256(str(size).encode())
        with open(p, "rb") as f:
            for off in sorted({0, max(0, size // 2 - sample_bytes // 2), max(0, size - sample_bytes)}):
                f.seek(off)
                h.update(f.read(sample_bytes))
    except OSError as e:
        raise InputError(f"cannot read model file ({e.strerror or e}): {p}") from None
    return "sha256s:" + h.hexdigest()[:32]
