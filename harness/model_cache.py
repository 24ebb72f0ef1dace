"""A per-user cache of parsed GGUF metadata (``gguf_model.ModelInfo``): a sweep of a model parsed before skips
gguf-py's parse, ~9 s on a file with a 262k-token vocabulary (bench/NOTES.md §25).

An entry is ``ModelInfo.to_dict()`` as JSON in ``$XDG_CACHE_HOME/decode-harness/models/`` (the eval hook's cache
folder), named by a digest of the file's resolved path, size, mtime, sampled content hash and the source of
``gguf_model.py``: a changed file, or a harness that parses differently, never reads an older entry. Entries are
written atomically. An entry that cannot be read or does not fit is ignored (the file is parsed); an entry that
cannot be written is logged and skipped. ``HARNESS_NO_MODEL_CACHE=1`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

from harness import gguf_model
from harness.fsutil import atomic_write, cache_dir

log = logging.getLogger(__name__)
OFF_ENV = "HARNESS_NO_MODEL_CACHE"


def entry_path(path: str | os.PathLike) -> Path:
    """Where the entry of ``path`` as it is now lives (the file must exist)."""
    p = Path(path).resolve()
    st = p.stat()
    key = "\n".join([str(p), str(st.st_size), str(st.st_mtime_ns), gguf_model.content_hash(p),
                     hashlib.sha256(Path(gguf_model.__file__).read_bytes()).hexdigest()])
    return cache_dir() / "models" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def read_model(path: str | os.PathLike) -> gguf_model.ModelInfo:
    """``gguf_model.read_model`` through the cache: the same ModelInfo (``path`` as given), parsed at most once
    per file version."""
    p = gguf_model.check_gguf_file(path)  # a missing or non-GGUF file is the parser's one-line error, as ever
    if os.environ.get(OFF_ENV):
        return gguf_model.read_model(p)
    entry = entry_path(p)
    try:
        info = gguf_model.ModelInfo.from_dict(json.loads(entry.read_text()))
        log.debug("model metadata from the cache: %s", entry)
        return replace(info, path=str(p))
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: parse
        pass
    info = gguf_model.read_model(p)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(entry, lambda tmp: Path(tmp).write_text(json.dumps(info.to_dict())), overwrite=True)
    except OSError as e:
        log.info("could not cache the model metadata (%s): %s", e.strerror or e, entry)
    return info
