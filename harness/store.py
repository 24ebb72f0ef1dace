"""The Parquet run store: one run is one Parquet file, written atomically and never overwritten.

- The table is the per-op/segment table (columns in ``harness.columns.OP_COLUMNS``); pandas,
  DuckDB and polars read it as-is.
- Run metadata sits in the Parquet key-value metadata under ``harness.run``: the JSON of a
  ``harness.record.RunRecord``, validated on write and on read (a missing or mistyped field is an
  InputError naming the field and the file). It includes the per-token wall times of every pass
  (``tokens``), loaded as a table by ``Run.tokens``.
- Writes are atomic and never overwrite a run (``harness.fsutil.atomic_write``): a hidden temp
  file, fsynced, hard-linked to the final name (a taken name gets a ``-N`` suffix).

Older formats are upgraded on read (``harness.upgrades``), the op table alongside.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from harness import columns, upgrades
from harness.errors import InputError, OutputError, UsageError
from harness.fsutil import TMP_PREFIX, atomic_write, clean_stale_temps  # noqa: F401 - part of this API
from harness.record import RunRecord
from harness.typed import RecordError

log = logging.getLogger(__name__)
META_KEY = b"harness.run"


@dataclass(frozen=True)
class Run:
    path: str
    record: RunRecord
    ops: pd.DataFrame

    @property
    def tokens(self) -> pd.DataFrame:
        return load_tokens(self.record)


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
    ``write_run(ops, record, path.parent, path.name)``; readers search folders recursively, so both
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


def write_run(ops: pd.DataFrame, record: RunRecord, out_dir: str | os.PathLike, filename: str) -> Path:
    """Write a run atomically; returns its path. Never overwrites: a taken name gets a suffix."""
    d = check_out_dir(out_dir)
    missing = [c for c in columns.OP_COLUMNS if c not in ops.columns]
    if missing:
        raise ValueError(f"op table lacks columns {missing}")
    if (ops[columns.TIME_US] < 0).any() or ops[columns.TIME_US].isna().any():
        raise ValueError("negative or NaN op times")
    meta = record.to_dict()
    RunRecord.from_dict(meta)  # what is written must read back: same validation as on read
    table = pa.Table.from_pandas(ops[list(columns.OP_COLUMNS)], preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})

    def write(tmp: Path) -> None:
        pq.write_table(table, tmp, compression="zstd")

    try:
        return atomic_write(d / filename, write, overwrite=False)
    except OSError as e:
        raise OutputError(f"could not write the run ({e.strerror or e}): {d}") from None


def read_record(path: str | os.PathLike) -> RunRecord:
    """The validated run record of a run file (footer only). InputError, one line, for any defect."""
    return _read_record(Path(path))[0]


def _read_record(p: Path) -> tuple[RunRecord, int, int]:
    """(record, schema version it was written with, timed tokens per repeat for version < 3 op tables)."""
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
    params = meta.get("params") if isinstance(meta, dict) else None
    n_tok = params.get("tokens") if isinstance(params, dict) else None
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    return record_from_meta(meta, p), version, n_tok if isinstance(n_tok, int) and n_tok > 0 else 1


def record_from_meta(meta, path: str | os.PathLike) -> RunRecord:
    """Upgrade and validate run metadata; InputError naming the field and the file."""
    try:
        return upgrades.from_meta(meta)[0]
    except RecordError as e:
        raise InputError(f"bad run metadata, {e}: {path}") from None


def read_run(path: str | os.PathLike, only: list[str] | None = None) -> Run:
    """Record and op table (``only``: just these columns). Older op tables are upgraded."""
    p = Path(path)
    record, version, n_tok = _read_record(p)
    try:
        ops = pd.read_parquet(path, columns=_stored_columns(only, version))
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise InputError(f"unreadable run table ({str(e).splitlines()[0][:120]}): {path}") from None
    if version < 3 and {"repeat", "step"} <= set(ops.columns):
        ops = ops.assign(**{columns.ROUND: ops["repeat"] * n_tok + ops["step"]}).drop(columns=["repeat", "step"])
    missing = [c for c in (only or columns.OP_COLUMNS) if c not in ops.columns]
    if missing:
        raise InputError(f"run lacks columns {', '.join(missing)}: {path}")
    return Run(path=str(path), record=record, ops=ops[list(only or columns.OP_COLUMNS)])


def _stored_columns(only: list[str] | None, version: int) -> list[str] | None:
    if only is None or version >= 3 or columns.ROUND not in only:
        return only
    return [c for c in only if c != columns.ROUND] + ["repeat", "step"]


def load_tokens(record: RunRecord) -> pd.DataFrame:
    """Per-token wall times of every pass, from a run's record, as a table (columns.TOKEN_COLUMNS)."""
    return pd.DataFrame([list(r) for r in record.tokens], columns=list(columns.TOKEN_COLUMNS))
