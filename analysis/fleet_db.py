"""The DuckDB fleet engine: the footers and the op tables of thousands of runs, one query each.

- ``read_footers``: ``parquet_kv_metadata`` reads every file's key-value metadata (footers only,
  in parallel); ``json_merge_patch`` drops inside DuckDB what compare never reads (the model's
  tensor table, the per-token wall times, the calibration tokens' per-stage rows and per-round noise, each
  context's intervals (the mode differences' too), sensors and per-layer graph-bytes lists: ~90 % of a default
  E4B run's JSON), so Python parses and validates ~13 kB a run.
  A file the fast path cannot vouch for (no ``harness.run`` key, invalid JSON, another schema
  version: it needs an upgrade or a refusal) comes back as None and is read one by one.
- ``round_sums``: one ``read_parquet`` over every op table, summed per run, context, round and stage
  inside DuckDB (the input of ``slope``'s bootstrap over rounds). An op table of an older format
  (``repeat``/``step``, no ``round``: ``parquet_schema`` tells from the footers) is left to the caller,
  which reads it upgraded (``harness.store.read_run``).

When DuckDB cannot read the fleet at all (a corrupt file, op tables with other columns) both answer
None for everything with a warning, and the caller reads file by file: same results, slower.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import duckdb
import numpy as np
import pandas as pd

from analysis import slope
from harness import columns
from harness.record import SCHEMA_VERSION
from harness.store import META_KEY

log = logging.getLogger(__name__)
# merge patches: null removes the key
DROP = json.dumps({"tokens": None, "rounds": None, "calibration_stages": None, "model": {"gguf": None}})
CONTEXT_DROP = json.dumps({**dict.fromkeys(["stage_ms_ci", "stage_ms_calibrated_ci", "plain_ms_ci", "overhead_ratio_ci",
                                            "sync_us_ci", "mode_diff_pp_ci", "sensors_before", "sensors_after"]),
                           "graph_bytes": dict.fromkeys(["kv_reads", "layer_weight", "layer_kv", "act"])})
FOOTERS = f"""
WITH m AS (SELECT file_name, try(json_merge_patch(decode(value), '{DROP}')) AS j
           FROM parquet_kv_metadata($files) WHERE key = $key)
SELECT file_name, CASE WHEN json_type(j, '$.contexts') = 'ARRAY' THEN json_merge_patch(j, json_object('contexts',
    list_transform(json_extract(j, '$.contexts[*]'), lambda c: json_merge_patch(c, '{CONTEXT_DROP}')))) ELSE j END
FROM m
"""
# file_index (a virtual column: which file of $files a row came from) keeps file names out of the 60 M-row
# group-by; a context is one depth, so it rides along as any_value. ok: every time finite and >= 0.
ROUND_SUMS = f"""
SELECT file_index AS {slope.RUN}, any_value("{columns.CONTEXT}") AS "{columns.CONTEXT}", "{columns.DEPTH}",
       "{columns.ROUND}", "{columns.STAGE}", sum("{columns.TIME_US}") / 1000.0 AS ms,
       bool_and(coalesce(isfinite("{columns.TIME_US}"::DOUBLE) AND "{columns.TIME_US}" >= 0, false)) AS ok
FROM read_parquet($files, hive_partitioning = false) GROUP BY file_index, "{columns.DEPTH}", "{columns.ROUND}",
       "{columns.STAGE}"
"""

WITH_ROUND = f"SELECT DISTINCT file_name FROM parquet_schema($files) WHERE name = '{columns.ROUND}'"


_DB: duckdb.DuckDBPyConnection | None = None
_CURRENT: set[str] = set()  # files whose footer read_footers found in this harness's schema: their op table has rounds


def _database() -> duckdb.DuckDBPyConnection:
    """One in-memory database per process: its Parquet metadata cache lets the op-table query reuse the
    footers it parsed before (runs are written once, never changed in place)."""
    global _DB
    if _DB is None:
        _DB = duckdb.connect()
        _DB.execute("SET GLOBAL parquet_metadata_cache = true")
    return _DB


def _query(sql: str, files: Sequence[str | os.PathLike], rows: bool = False, **params):
    """A DataFrame (through Arrow), or with ``rows`` a list of tuples (no pandas strings for big text); None
    when DuckDB fails."""
    try:
        with _database().cursor() as con:
            con.execute("SET enable_progress_bar = false")
            res = con.sql(sql, params={"files": [str(f) for f in files], **params})
            return res.fetchall() if rows else res.to_arrow_table().to_pandas()
    except duckdb.Error as e:
        log.warning("DuckDB could not read the fleet (%s); reading file by file", str(e).splitlines()[0][:160])
        return None


def read_footers(files: Sequence[str | os.PathLike]) -> list[dict | None]:
    """Per file: its run metadata without the parts named in the module doc, or None."""
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
        if ok:
            _CURRENT.add(str(f))
    return out


def round_sums(paths: Sequence[str | os.PathLike]) -> tuple[pd.DataFrame | None, list[int]]:
    """(``fleet.round_sums`` of the op tables under ``paths`` that have a round column, in one query; the indices
    of the other paths, and of those with empty keys or bad times, for the caller to read one by one, checked).
    (None, every index) when DuckDB cannot read them."""
    unknown = [p for p in paths if str(p) not in _CURRENT]  # usually none: their footers were read already
    have = _query(WITH_ROUND, unknown, rows=True) if unknown else []
    have = _CURRENT.union(name for (name,) in have or ())
    cur = [i for i, p in enumerate(paths) if str(p) in have]
    long = _query(ROUND_SUMS, [paths[i] for i in cur]) if cur else None
    if long is None:
        return None, list(range(len(paths)))
    long[slope.RUN] = np.asarray(cur, dtype="int64")[long[slope.RUN].to_numpy(dtype="int64")]
    odd = set(long.loc[~long.pop("ok").astype(bool) | long.isna().any(axis=1), slope.RUN])
    rest = [i for i, p in enumerate(paths) if str(p) not in have or i in odd]
    return long[~long[slope.RUN].isin(odd)][[slope.RUN, *slope.NEEDED_COLUMNS[:-1], "ms"]], rest
