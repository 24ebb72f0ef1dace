"""The DuckDB fleet engine: the footers and the op tables of thousands of runs, one query each.

- ``read_footers``: ``parquet_kv_metadata`` reads every file's key-value metadata (footers only,
  in parallel); ``json_merge_patch`` drops the bulky parts inside DuckDB (the model's tensor table
  and the per-token wall times: ~85 % of a run's JSON), so Python parses ~7 kB per run, not ~46 kB.
  A file the fast path cannot vouch for (no ``harness.run`` key, invalid JSON, another schema
  version: it needs an upgrade or a refusal) comes back as None and is read one by one.
- ``round_sums``: one ``read_parquet`` over every op table, summed per run, context, round and stage
  inside DuckDB (the input of ``slope``'s bootstrap over rounds).

When DuckDB cannot read the fleet at all (a corrupt file, op tables with other columns) both answer
None for everything with a warning, and the caller reads file by file: same results, slower.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import duckdb
import pandas as pd

from analysis import slope
from harness import columns
from harness.record import SCHEMA_VERSION
from harness.store import META_KEY

log = logging.getLogger(__name__)
DROP = json.dumps({"tokens": None, "model": {"gguf": None}})  # merge patch: null removes the key
FOOTERS = f"""
SELECT file_name, try(json_merge_patch(decode(value), '{DROP}'))
FROM parquet_kv_metadata($files) WHERE key = $key
"""
_KEYS = ", ".join(f'"{c}"' for c in slope.NEEDED_COLUMNS if c not in (columns.TIME_US,))
_RUNS = f"(SELECT unnest($files) AS filename, generate_subscripts($files, 1) - 1 AS {slope.RUN})"
ROUND_SUMS = f"""
SELECT {slope.RUN}, {_KEYS}, sum("{columns.TIME_US}") / 1000.0 AS ms
FROM read_parquet($files, filename = true, hive_partitioning = false) JOIN {_RUNS} USING (filename) GROUP BY ALL
"""


_DB: duckdb.DuckDBPyConnection | None = None


def _database() -> duckdb.DuckDBPyConnection:
    """One in-memory database per process: its Parquet metadata cache lets the op-table query reuse the
    footers it parsed before (runs are written once, never changed in place)."""
    global _DB
    if _DB is None:
        _DB = duckdb.connect()
        _DB.execute("SET GLOBAL parquet_metadata_cache = true")
    return _DB


def _query(sql: str, files: Sequence[str | os.PathLike], rows: bool = False, **params):
    """A DataFrame (or, with ``rows``, a list of tuples: no pandas strings for big text), or None."""
    try:
        with _database().cursor() as con:
            con.execute("SET enable_progress_bar = false")
            res = con.execute(sql, {"files": [str(f) for f in files], **params})
            return res.fetchall() if rows else res.df()
    except duckdb.Error as e:
        log.warning("DuckDB could not read the fleet (%s); reading file by file", str(e).splitlines()[0][:160])
        return None


def read_footers(files: Sequence[str | os.PathLike]) -> list[dict | None]:
    """Per file: its run metadata without ``model.gguf`` and ``tokens``, or None (see the module doc)."""
    found = _query(FOOTERS, files, rows=True, key=META_KEY)
    if found is None:
        return [None] * len(files)
    by_file = dict(found)
    out: list[dict | None] = []
    for f in files:
        text = by_file.get(str(f))
        meta = json.loads(text) if isinstance(text, str) else None
        ok = isinstance(meta, dict) and meta.get("schema_version") == SCHEMA_VERSION
        out.append(meta if ok else None)
    return out


def round_sums(paths: Sequence[str | os.PathLike]) -> pd.DataFrame | None:
    """``fleet.round_sums`` of every op table under ``paths`` in one query; None when DuckDB cannot read
    them all (the caller then reads file by file)."""
    long = _query(ROUND_SUMS, paths)
    if long is None:
        return None
    long[slope.RUN] = long[slope.RUN].astype("int64")
    return long[[slope.RUN, *slope.NEEDED_COLUMNS[:-1], "ms"]]
