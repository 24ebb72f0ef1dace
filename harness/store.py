"""The Parquet run store: one run is one Parquet file, written atomically and never overwritten.

- The table is the per-op/segment table (columns in ``harness.columns.OP_COLUMNS``); pandas,
  DuckDB and polars read it as-is.
- Run metadata sits in the Parquet key-value metadata under ``harness.run``: the JSON of a
  ``harness.record.RunRecord``, validated on write and on read (a missing or mistyped field is an
  InputError naming the field and the file). It includes the per-token wall times of every pass
  (``tokens``), loaded as a table by ``Run.tokens``.
- Writes are atomic and never overwrite a run (``harness.fsutil.atomic_write``): a hidden temp
  file, fsynced, hard-linked to the final name (a taken name gets a ``-N`` suffix). ``check_out_dir``
  proves before the measurement that the folder takes files and hard links.
- The op table is checked on read (``check_op_table``): each column's type as written (``_KINDS``), no
  empty key values, times finite and >= 0 (an InputError naming the column and the file).

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

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from harness import columns, upgrades
from harness.errors import InputError, OutputError, UsageError
from harness.fsutil import TMP_PREFIX, atomic_write, clean_stale_temps, temp_name  # noqa: F401 - part of this API
from harness.record import SCHEMA_VERSION, RunRecord
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

    @property
    def calibration_stages(self) -> pd.DataFrame:
        """The calibration tokens' time per stage (columns.CALIB_STAGE_COLUMNS); empty for runs without them."""
        return pd.DataFrame([list(r) for r in self.record.calibration_stages],
                            columns=list(columns.CALIB_STAGE_COLUMNS))


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


def check_out_dir(out_dir: str | os.PathLike, hard_links: bool = True) -> Path:
    """Create the output folder if needed and prove it is writable, before any heavy work; with ``hard_links``
    also that it takes hard links (``write_run`` puts a run in place by one, so that it never replaces another)."""
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise UsageError(f"output path is not a folder: {d}")
    probe, link = d / temp_name("probe"), d / temp_name("probe-link")
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as e:
        raise OutputError(f"output folder is not writable ({e.strerror or e}): {d}") from None
    try:
        if hard_links:
            os.link(probe, link)
    except OSError as e:
        raise OutputError(f"output folder does not take hard links ({e.strerror or e}); runs are put in place by "
                          f"one so that a run never replaces another: {d}") from None
    finally:
        for f in (link, probe):
            try:
                f.unlink(missing_ok=True)
            except OSError as e:
                log.warning("could not remove the probe file %s (%s)", f, e.strerror or e)
    return d


def write_run(ops: pd.DataFrame, record: RunRecord, out_dir: str | os.PathLike, filename: str) -> Path:
    """Write a run atomically; returns its path. Never overwrites: a taken name gets a suffix."""
    if record.schema_version != SCHEMA_VERSION:
        raise ValueError(f"cannot write a run of schema version {record.schema_version!r}: this harness writes "
                         f"version {SCHEMA_VERSION}")
    missing = [c for c in columns.OP_COLUMNS if c not in ops.columns]
    if missing:
        raise ValueError(f"op table lacks columns {missing}")
    if not _good_times(ops[columns.TIME_US].to_numpy(dtype=np.float64, na_value=np.nan)):
        raise ValueError("negative, NaN or infinite op times")
    meta = record.to_dict()
    RunRecord.from_dict(meta)  # what is written must read back: same validation as on read
    table = pa.Table.from_pandas(ops[list(columns.OP_COLUMNS)], preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    d = check_out_dir(out_dir)

    def write(tmp: Path) -> None:
        pq.write_table(table, tmp, compression="zstd")

    try:
        return atomic_write(d / filename, write, overwrite=False)
    except OSError as e:
        raise OutputError(f"could not write the run ({e.strerror or e}): {d}") from None


def read_record(path: str | os.PathLike) -> RunRecord:
    """The validated run record of a run file (footer only). InputError, one line, for any defect."""
    return _read_record(Path(path))[0]


def _read_record(p: Path) -> tuple[RunRecord, int, int, pa.Schema]:
    """(record, schema version it was written with, timed tokens per repeat for version < 3 op tables, the
    table's Arrow schema)."""
    if not p.exists():
        raise InputError(f"run file not found: {p}")
    if p.is_dir():
        raise InputError(f"expected a run file, got a folder: {p}")
    try:
        schema = pq.read_schema(p)
        md = schema.metadata or {}
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
    return record_from_meta(meta, p), version, n_tok if isinstance(n_tok, int) and n_tok > 0 else 1, schema


def record_from_meta(meta, path: str | os.PathLike) -> RunRecord:
    """Upgrade and validate run metadata; InputError naming the field and the file."""
    try:
        return upgrades.from_meta(meta)[0]
    except RecordError as e:
        raise InputError(f"bad run metadata, {e}: {path}") from None


def read_run(path: str | os.PathLike, only: list[str] | None = None) -> Run:
    """Record and op table (``only``: just these columns). Older op tables are upgraded."""
    p = Path(path)
    record, version, n_tok, schema = _read_record(p)
    stored = _stored_columns(only, version)
    _check_types(schema, stored or schema.names, p)  # from the footer, before any data is read
    try:
        table = pq.read_table(path, columns=stored)
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise InputError(f"unreadable run table ({str(e).splitlines()[0][:120]}): {path}") from None
    check_op_table(table, p)
    ops = table.to_pandas()
    if version < 3 and {"repeat", "step"} <= set(ops.columns):
        ops = ops.assign(**{columns.ROUND: ops["repeat"] * n_tok + ops["step"]}).drop(columns=["repeat", "step"])
    missing = [c for c in (only or columns.OP_COLUMNS) if c not in ops.columns]
    if missing:
        raise InputError(f"run lacks columns {', '.join(missing)}: {path}")
    return Run(path=str(path), record=record, ops=ops[list(only or columns.OP_COLUMNS)])


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


_TEXT, _INT, _NUM = ("text", _is_text), ("integer", pa.types.is_integer), ("number", _is_number)
_KINDS = {columns.CONTEXT: _TEXT, columns.DEPTH: _INT, columns.ROUND: _INT, columns.NODE_FIRST: _INT,
          columns.NODE: _INT, columns.NAME: _TEXT, columns.LAYER: _INT, columns.OP: _TEXT, columns.STAGE: _TEXT,
          columns.TIME_US: _NUM, "repeat": _INT, "step": _INT}  # (repeat, step: version < 3 tables)
KEY_COLUMNS = (columns.CONTEXT, columns.DEPTH, columns.ROUND, columns.STAGE, "repeat", "step")  # round's, < 3


def _check_types(schema: pa.Schema, names: list[str], p: str | os.PathLike) -> None:
    """Each op-table column among ``names`` has the type the writer gives it."""
    for name in names:
        if name in _KINDS and name in schema.names:
            kind, ok = _KINDS[name]
            t = schema.field(name).type
            if not ok(t):
                raise InputError(f"run table column {name} holds {t}, expected {kind}: {p}")


def _good_times(t: np.ndarray) -> bool:
    t = t.astype(np.float64, copy=False)
    return bool((np.isfinite(t) & (t >= 0)).all())


def check_op_table(table: pa.Table, p: str | os.PathLike) -> None:
    """An op table (or the columns of one that were read) as the writer writes it: each column's type
    (``_KINDS``), no empty key value (context, depth, round, stage), op times finite and >= 0. InputError naming
    the column and the file."""
    _check_types(table.schema, table.column_names, p)
    for name in KEY_COLUMNS:
        if name in table.column_names and table.column(name).null_count:
            raise InputError(f"run table column {name} has empty (null) values: {p}")
    if columns.TIME_US in table.column_names and not _good_times(table.column(columns.TIME_US).to_numpy()):
        raise InputError(f"run table column {columns.TIME_US} has negative, NaN or infinite times: {p}")


def _stored_columns(only: list[str] | None, version: int) -> list[str] | None:
    if only is None or version >= 3 or columns.ROUND not in only:
        return only
    return [c for c in only if c != columns.ROUND] + ["repeat", "step"]


def load_tokens(record: RunRecord) -> pd.DataFrame:
    """Per-token wall times of every pass, from a run's record, as a table (columns.TOKEN_COLUMNS)."""
    return pd.DataFrame([list(r) for r in record.tokens], columns=list(columns.TOKEN_COLUMNS))
