"""A per-user cache of parsed GGUF metadata (``gguf_model.ModelInfo``): a sweep of a model parsed before skips
gguf-py's parse, ~9 s on a file with a 262k-token vocabulary (bench/NOTES.md §25).

An entry is ``ModelInfo.to_dict()`` as JSON in ``$XDG_CACHE_HOME/decode-harness/models/`` (the eval hook's cache
folder), named by a digest of the file's identity now (resolved path, device, inode, size, mtime and ctime: a
copy that keeps the mtime still gets a new ctime), its sampled content hash, and what parses it (the source of
``gguf_model.py`` and the gguf-py version): a changed file, or a harness or gguf-py that parses differently, never
reads an older entry. Entries are written atomically, and only when the file did not change during the parse;
entries are small (~55 kB on E4B) and never expire. An entry that cannot be read or does not fit is ignored
(the file is parsed); one that cannot be written is logged and skipped. ``HARNESS_NO_MODEL_CACHE=1`` turns the
cache off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from importlib import metadata
from pathlib import Path

from harness import gguf_model
from harness.fsutil import atomic_write, cache_dir, clean_stale_temps

log = logging.getLogger(__name__)
OFF_ENV = "HARNESS_NO_MODEL_CACHE"


def _parser_digest() -> str:
    try:
        gguf_version = metadata.version("gguf")
    except metadata.PackageNotFoundError:
        gguf_version = "?"
    return hashlib.sha256(Path(gguf_model.__file__).read_bytes() + gguf_version.encode()).hexdigest()


def entry_path(path: str | os.PathLike) -> Path:
    """Where the entry of ``path`` as it is now lives (the file must exist)."""
    p = Path(path).resolve()
    st = p.stat()
    key = "\n".join(map(str, [p, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                              gguf_model.content_hash(p), _parser_digest()]))
    return cache_dir() / "models" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def read_model(path: str | os.PathLike) -> gguf_model.ModelInfo:
    """``gguf_model.read_model`` through the cache: the same ModelInfo (``path`` as given), parsed at most once
    per file version."""
    p = gguf_model.check_gguf_file(path)  # a missing or non-GGUF file is the parser's one-line error, as ever
    if os.environ.get(OFF_ENV, "") not in ("", "0"):
        return gguf_model.read_model(p)
    try:
        entry = entry_path(p)
    except (OSError, RuntimeError) as e:  # RuntimeError: no home folder to put a cache in
        log.info("no model cache (%s): parsing %s", e, p)
        return gguf_model.read_model(p)
    try:
        info = gguf_model.ModelInfo.from_dict(json.loads(entry.read_text()))
        log.debug("model metadata from the cache: %s", entry)
        return replace(info, path=str(p))
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: parse
        pass
    info = gguf_model.read_model(p)
    try:
        if entry_path(p) != entry:  # the file changed while it was parsed: which version did we read?
            return info
        entry.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(entry.parent)
        atomic_write(entry, lambda tmp: Path(tmp).write_text(json.dumps(info.to_dict())), overwrite=True)
    except (OSError, TypeError) as e:
        log.info("could not cache the model metadata (%s): %s", getattr(e, "strerror", None) or e, entry)
    return info
