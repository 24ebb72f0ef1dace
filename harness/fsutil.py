"""Atomic file writes and the clean-up of what killed writers leave behind (the run store and twins).

A file is written to a hidden temp file in the target folder (``.tmp-<pid>-<random>-<name>.partial``: unique
per call, so concurrent writes in one process never share or delete each other's temp file),
fsynced, then put in place: with ``overwrite`` by rename (a twin replaces an older twin), without
by a hard link that fails rather than replace, the name taking a ``-N`` suffix when it is taken
(a run never replaces another run). A crash leaves the old state or the new, never half a file.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
TMP_PREFIX = ".tmp-"
_TMP_RE = re.compile(rf"^{re.escape(TMP_PREFIX)}(\d+)-")


def cache_dir() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/decode-harness`` (``~/.cache`` without it)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "decode-harness"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (used to tell stale temp files from live writers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_name(name: str) -> str:
    """A hidden temp file name for ``name``, unique to this call: ``.tmp-<pid>-<random>-<name>``
    (``clean_stale_temps`` reads the pid back)."""
    return f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{name}"


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(target: Path, write_to: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Call ``write_to(temp_path)``, fsync, then put the file at ``target``; returns the final path (with a
    ``-N`` suffix when ``overwrite`` is false and the name is taken). The temp file never outlives the call."""
    tmp = target.with_name(temp_name(f"{target.name}.partial"))  # hidden, not *.parquet/*.gguf
    try:
        write_to(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = target
        if overwrite:
            os.replace(tmp, final)
        else:
            n = 0
            while True:
                final = target if n == 0 else target.with_name(f"{target.stem}-{n}{target.suffix}")
                try:
                    os.link(tmp, final)
                    break
                except FileExistsError:
                    n += 1
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def clean_stale_temps(folder: str | os.PathLike) -> int:
    """Remove temp files of writers whose process is gone. Returns how many."""
    d = Path(folder)
    if not d.is_dir():
        return 0
    n = 0
    for f in d.glob(f"{TMP_PREFIX}*"):
        m = _TMP_RE.match(f.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            log.warning("removing a half-written file left by a killed writer: %s", f)
            f.unlink(missing_ok=True)
            n += 1
    return n
