"""The Parquet run store: one run is one Parquet file, written atomically and never overwritten.

- The table is the per-op/segment table (columns in ``harness.columns.OP_COLUMNS``); pandas,
  DuckDB and polars read it as-is.
- Run metadata (a JSON object) sits in the Parquet key-value metadata under ``harness.run``.
  It includes the per-token wall times of both passes (``tokens``), loaded by ``load_tokens``.
- Writes go to a hidden temp file in the target folder, are fsynced, then hard-linked to the
  final name (which fails rather than overwrite an existing run) and the temp is removed.

Format history (bump ``SCHEMA_VERSION`` and add an ``upgrade_from_N`` on change):
- version 1: first format.
- version 2: per-context sync calibration (``sync_us``, ``noop_sync_us``, ``stage_ms_calibrated``,
  ``stage_pct_calibrated``), ``params.callback`` (native or python) and ``params.threads_source``.
  ``upgrade_from_1`` fills them: calibrated = raw, sync costs unknown (None), callback python.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from harness import columns
from harness.errors import InputError, OutputError, UsageError
from harness.fsutil import pid_alive

log = logging.getLogger(__name__)
SCHEMA_VERSION = 2  # format history and upgrades: below
META_KEY = b"harness.run"
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Run:
    path: str
    meta: dict
    ops: pd.DataFrame

    @property
    def tokens(self) -> pd.DataFrame:
        return load_tokens(self.meta)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")[:60] or "x"


def run_filename(label: str, model_stem: str, when: datetime | None = None) -> str:
    when = when or datetime.now(timezone.utc)
    return f"{when:%Y%m%dT%H%M%SZ}_{_slug(label)}_{_slug(model_stem)}.parquet"


LAYOUTS = ("flat", "hive")


def run_path(out_dir: str | os.PathLike, label: str, model_stem: str, layout: str = "flat",
             when: datetime | None = None) -> Path:
    """Where a new run goes. ``flat``: ``<out>/<time>_<label>_<model>.parquet``; ``hive``:
    ``<out>/device=<label>/model=<model>/<time>.parquet`` (Hive-style partitions: DuckDB, Spark and
    pyarrow datasets read ``device`` and ``model`` as columns). Write it with
    ``write_run(ops, meta, path.parent, path.name)``; readers search folders recursively, so both
    layouts (and a mix) are read alike."""
    when = when or datetime.now(timezone.utc)
    if layout == "flat":
        return Path(out_dir) / run_filename(label, model_stem, when)
    if layout == "hive":
        part = Path(out_dir) / f"device={_slug(label)}" / f"model={_slug(model_stem)}"
        return part / f"{when:%Y%m%dT%H%M%SZ}.parquet"
    raise UsageError(f"unknown run layout {layout!r} (choose from: {', '.join(LAYOUTS)})")


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create the output folder if needed and prove it is writable, before any heavy work."""
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise UsageError(f"output path is not a folder: {d}")
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f"{TMP_PREFIX}{os.getpid()}-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"output folder is not writable ({e.strerror}): {d}") from None
    return d


_TIMED = ("_ms", "_us", "_s", "_bytes", "_gbps", "_pct")


def _check_meta(meta, where: str = "", timed: bool = False) -> None:
    """No negative or NaN durations, sizes or rates anywhere (keys ending in a unit, or values of a
    dict whose key does, like ``stage_ms``); units must be declared."""
    if not where and "units" not in meta:
        raise ValueError("run metadata lacks its units table")
    items = meta.items() if isinstance(meta, dict) else enumerate(meta) if isinstance(meta, list) else ()
    for k, v in items:
        key = f"{where}.{k}" if where else str(k)
        is_timed = timed or str(k).endswith(_TIMED)
        if isinstance(v, (dict, list)):
            _check_meta(v, key, is_timed and isinstance(v, dict))
        elif is_timed and isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isnan(v) or v < 0):
            raise ValueError(f"invalid metadata value {key}={v}")


def write_run(ops: pd.DataFrame, meta: dict, out_dir: str | os.PathLike, filename: str) -> Path:
    """Write a run atomically; returns its path. Never overwrites: a taken name gets a suffix."""
    d = check_out_dir(out_dir)
    missing = [c for c in columns.OP_COLUMNS if c not in ops.columns]
    if missing:
        raise ValueError(f"op table lacks columns {missing}")
    if (ops[columns.TIME_US] < 0).any() or ops[columns.TIME_US].isna().any():
        raise ValueError("negative or NaN op times")
    _check_meta(meta)
    meta = {**meta, "schema_version": SCHEMA_VERSION}
    table = pa.Table.from_pandas(ops[list(columns.OP_COLUMNS)], preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    tmp = d / f"{TMP_PREFIX}{os.getpid()}-{filename}.partial"  # hidden, and not *.parquet to globbers
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        stem, n = filename[: -len(".parquet")], 0
        while True:
            final = d / (filename if n == 0 else f"{stem}-{n}.parquet")
            try:
                os.link(tmp, final)
                break
            except FileExistsError:
                n += 1
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise OutputError(f"could not write the run ({e.strerror or e}): {d}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def upgrade_from_1(meta: dict) -> dict:
    for c in meta.get("contexts", []):
        c.setdefault("sync_us", None)
        c.setdefault("noop_sync_us", None)
        c.setdefault("stage_ms_calibrated", dict(c.get("stage_ms", {})))
        c.setdefault("stage_pct_calibrated", dict(c.get("stage_pct", {})))
    params = meta.setdefault("params", {})
    params.setdefault("callback", "python")
    params.setdefault("threads_source", "unknown")
    meta["schema_version"] = 2
    return meta


UPGRADES = {1: upgrade_from_1}


def _upgrade(meta: dict, path: str = "") -> dict:
    v = meta.get("schema_version")
    if not isinstance(v, int) or v < 1:
        raise InputError(f"run metadata has no valid schema version: {path}")
    if v > SCHEMA_VERSION:
        raise InputError(f"run has schema version {v}, newer than this harness supports "
                         f"({SCHEMA_VERSION}); upgrade the harness: {path}")
    while meta["schema_version"] < SCHEMA_VERSION:
        meta = UPGRADES[meta["schema_version"]](meta)
    return meta


def read_meta(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise InputError(f"run file not found: {p}")
    if p.is_dir():
        raise InputError(f"expected a run file, got a folder: {p}")
    try:
        md = pq.read_schema(p).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"not a Parquet run ({str(e).splitlines()[0][:120]}): {p}") from None
    if META_KEY not in md:
        raise InputError(f"Parquet file is not a harness run (no {META_KEY.decode()} metadata): {p}")
    try:
        meta = json.loads(md[META_KEY])
    except ValueError:
        raise InputError(f"run metadata is not valid JSON: {p}") from None
    return _upgrade(meta, str(p))


def read_run(path: str | os.PathLike, only: list[str] | None = None) -> Run:
    meta = read_meta(path)
    try:
        ops = pd.read_parquet(path, columns=only)
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise InputError(f"unreadable run table ({str(e).splitlines()[0][:120]}): {path}") from None
    missing = [c for c in (only or columns.OP_COLUMNS) if c not in ops.columns]
    if missing:
        raise InputError(f"run lacks columns {', '.join(missing)}: {path}")
    return Run(path=str(path), meta=meta, ops=ops)


def load_tokens(meta: dict) -> pd.DataFrame:
    """Per-token wall times of both passes, from a run's metadata, as a table."""
    rows = meta.get("tokens", [])
    return pd.DataFrame(rows, columns=list(columns.TOKEN_COLUMNS))


def clean_stale_temps(out_dir: str | os.PathLike) -> int:
    """Remove temp files left by killed writers (whose process is gone). Returns how many."""
    d = Path(out_dir)
    n = 0
    if not d.is_dir():
        return 0
    for f in d.glob(f"{TMP_PREFIX}*"):
        m = re.match(rf"{re.escape(TMP_PREFIX)}(\d+)-", f.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            log.warning("removing stale temp file from a killed writer: %s", f)
            f.unlink(missing_ok=True)
            n += 1
    return n

