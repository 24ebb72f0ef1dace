"""A fleet of runs: find run files, read their metadata (footer only) and group them by device, model and settings.

A *group* is the unit that ``analysis.compare`` reports: runs with the same device label, the
same model (content hash, else name + dominant quant type), the same work-changing settings
(``SETTINGS``), the same completeness and the same reference flag. Runs within a group are
pooled; runs in different groups are never pooled.

Runs are found recursively, so the flat layout (``runs/<time>_<label>_<model>.parquet``) and the
Hive layout (``runs/device=<label>/model=<stem>/<time>.parquet``) read alike. Two engines read
them and give the same results: ``pandas`` (pyarrow, one file at a time on a thread pool) and
``duckdb`` (one query over every footer, one over every op table: ``analysis.fleet_db``); ``auto``
picks DuckDB from ``DUCKDB_MIN_RUNS`` runs on.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import stat
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis import slope
from harness import columns
from harness.errors import InputError, UsageError
from harness.record import ContextSummary, RunRecord
from harness.store import TMP_PREFIX, read_record, record_from_meta

log = logging.getLogger(__name__)
SETTINGS = ("threads", "flash_attn", "cache_type_k", "cache_type_v", "n_gpu_layers")
ENGINES = ("auto", "pandas", "duckdb")
DUCKDB_MIN_RUNS = 200  # auto: from here on DuckDB is faster (bench/fleet_bench.py)


@dataclass(frozen=True)
class RunInfo:
    path: str
    label: str
    model_key: str
    model_name: str
    settings: tuple[tuple[str, object], ...]
    complete: bool
    reference: bool
    bandwidth_gbps: float | None
    contexts: tuple[ContextSummary, ...]
    flags: tuple[str, ...] = ()  # kinds of the measurement flags the run raised (drift, noise, ...)
    read_model: object | None = field(default=None, repr=False, compare=False)  # analysis.readmodel.ReadModel

    @property
    def group_key(self) -> tuple:
        return (self.label, self.model_key, self.settings, self.complete, self.reference)


@dataclass(frozen=True)
class Group:
    label: str
    model_key: str
    model_name: str
    settings: tuple[tuple[str, object], ...]
    complete: bool
    reference: bool
    runs: tuple[RunInfo, ...]

    @property
    def setting(self) -> dict[str, object]:
        return dict(self.settings)


def find_runs(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """(explicit files, files found in folders), each sorted and de-duplicated. Raises when nothing is found."""
    explicit, found, seen = [], [], set()
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(f"no such file or folder: {p}")
        cands = [p] if p.is_file() else sorted(f for f in p.rglob("*.parquet")
                                              if not f.name.startswith((TMP_PREFIX, ".")))
        for f in cands:
            st = f.stat()  # one call per file: regular? and its identity, for de-duplication
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                (explicit if p.is_file() else found).append(f)
    if not explicit and not found:
        raise InputError(f"no run files (*.parquet) found in {', '.join(map(str, paths))}")
    return explicit, found


def device_label(rec: RunRecord, with_hostname: bool = False) -> str:
    """The run's label; else CPU model + cores. With ``with_hostname``, an automatic label gets '@hostname'."""
    label = rec.display_label
    if with_hostname and label == rec.device.auto_label and rec.device.hostname:
        label = f"{label} @{rec.device.hostname}"
    return label


def model_identity(rec: RunRecord) -> tuple[str, str]:
    """(key, display name): key is the content hash, else name + dominant quant type."""
    m = rec.model
    quant = max(m.type_summary, key=m.type_summary.get) if m.type_summary else ""
    name = m.name or (Path(m.path).stem if m.path else "unknown model")
    display = Path(m.path).stem if m.path else name
    return m.content_hash or f"{name}|{quant}", display


def _read_model(rec: RunRecord):
    """The run's ReadModel, or None when it has no tensor table (e.g. the reference run)."""
    if not rec.model.gguf:
        return None
    from analysis import readmodel
    try:
        return readmodel.from_run(rec)
    except (InputError, KeyError, ValueError, TypeError) as e:
        log.warning("no read model for %s: %s", rec.label, e)
        return None


def run_info(path: Path, rec: RunRecord, with_hostname: bool, rm_cache: dict,
             full_record: Callable[[], RunRecord] | None = None) -> RunInfo:
    """``rec`` may lack the tensor table (DuckDB engine); ``full_record`` then reads the whole footer, once
    per model and settings, for the read model."""
    key, name = model_identity(rec)
    settings = tuple((k, getattr(rec.params, k)) for k in SETTINGS)
    rm_key = (key, settings)
    if rm_key not in rm_cache:
        rm_cache[rm_key] = _read_model(full_record() if full_record and not rec.model.gguf else rec)
    return RunInfo(path=str(path), label=device_label(rec, with_hostname), model_key=key, model_name=name,
                   settings=settings, complete=rec.complete, reference=rec.reference,
                   bandwidth_gbps=rec.bandwidth_gbps, contexts=rec.contexts, read_model=rm_cache[rm_key],
                   flags=tuple(sorted({f.kind for f in rec.flags if f.kind != "synthetic"})))


def _try_meta(path: Path) -> RunRecord | InputError:
    try:
        return read_record(path)
    except InputError as e:
        return e


def _partial(meta: dict, path: Path) -> RunRecord | InputError:
    """A record from a footer without its per-token times and tensor table (the DuckDB fast path)."""
    try:
        return record_from_meta({**meta, "tokens": meta.get("tokens", [])}, path)
    except InputError as e:
        return e


def resolve_engine(engine: str, n_runs: int) -> str:
    if engine not in ENGINES:
        raise UsageError(f"unknown fleet engine {engine!r} (choose from: {', '.join(ENGINES)})")
    if engine == "auto":
        return "duckdb" if n_runs >= DUCKDB_MIN_RUNS else "pandas"
    return engine


def read_records(files: list[Path], engine: str) -> list[RunRecord | InputError]:
    """Each file's validated record, or the InputError that reading it raised. DuckDB leaves out what compare
    never reads (``fleet_db``'s module doc; the rest is validated as usual); a file its fast path cannot
    vouch for is read the pandas way."""
    with paused_gc():
        return _read_records(files, engine)


@contextlib.contextmanager
def paused_gc():
    """Reading thousands of footers allocates millions of small dicts and records, none in a cycle; the
    cyclic collector, run every few hundred allocations, took ~40 % of that time (10,000 runs: 4.8 ->
    2.9 s without it). It is switched back on (if it was on) at the end; the first collection after that
    still scans what was read (~0.5 s for 10,000 runs), so a short command pauses it for its whole run."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _read_records(files: list[Path], engine: str) -> list[RunRecord | InputError]:
    fast: list[RunRecord | InputError | None] = [None] * len(files)
    if engine == "duckdb":
        from analysis import fleet_db
        fast = [None if m is None else _partial(m, f) for f, m in zip(files, fleet_db.read_footers(files),
                                                                       strict=True)]
    slow = [f for f, m in zip(files, fast, strict=True) if m is None]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        it = iter(list(ex.map(_try_meta, slow)))
    return [m if m is not None else next(it) for m in fast]


def load_runs(paths: Iterable[str | os.PathLike], with_hostname: bool = False, engine: str = "auto") -> list[RunInfo]:
    """RunInfo for every run under ``paths``. A bad file named explicitly is an error; one found in a
    folder is skipped with a warning. Raises InputError when no run is left."""
    explicit, found = find_runs(paths)
    files = explicit + found
    engine = resolve_engine(engine, len(files))
    metas = read_records(files, engine)
    runs, rm_cache, skipped = [], {}, []
    for i, (f, m) in enumerate(zip(files, metas, strict=True)):
        if isinstance(m, InputError):
            if i < len(explicit):
                raise m
            skipped.append(m)
            continue
        full = (lambda f=f: read_record(f)) if engine == "duckdb" else None
        runs.append(run_info(f, m, with_hostname, rm_cache, full))
    if not runs:
        raise InputError(f"no harness runs among {len(files)} Parquet file(s); first: {skipped[0]}")
    for e in skipped:
        log.warning("skipping %s", e)
    return runs


def group_runs(runs: Iterable[RunInfo]) -> list[Group]:
    """Groups sorted by label, then model, settings; complete before incomplete."""
    by_key: dict[tuple, list[RunInfo]] = {}
    for r in runs:
        by_key.setdefault(r.group_key, []).append(r)
    groups = [Group(label=k[0], model_key=k[1], model_name=v[0].model_name, settings=k[2], complete=k[3],
                    reference=k[4], runs=tuple(v)) for k, v in by_key.items()]
    return sorted(groups, key=lambda g: (g.label, g.model_name, g.model_key, str(g.settings), not g.complete))


def group_names(groups: list[Group]) -> list[str]:
    """Row labels: the model, plus every setting that differs between groups, plus markers."""
    varying = [k for k in SETTINGS if len({g.setting.get(k) for g in groups} - {None}) > 1]
    names_by_display: dict[str, set[str]] = {}
    for g in groups:
        names_by_display.setdefault(g.model_name, set()).add(g.model_key)
    out = []
    for g in groups:
        model = g.model_name
        if len(names_by_display[model]) > 1:  # same display name, different models: show the key
            model += f" [{g.model_key.split(':')[-1][:8]}]"
        parts = [model] + [f"{k}={g.setting[k]}" for k in varying if g.setting.get(k) is not None]
        if g.reference:
            parts.append("REFERENCE")
        if not g.complete:
            parts.append("INCOMPLETE")
        out.append(" ".join(parts))
    return out


def round_sums(paths: list[str], engine: str = "pandas") -> pd.DataFrame:
    """Stage ms of every profiled token of the runs at ``paths``: columns run (index into ``paths``), context,
    depth, round, stage, ms. Runs whose op table cannot be read are left out with a warning."""
    if engine == "duckdb":
        from analysis import fleet_db
        long = fleet_db.round_sums(paths)
        if long is not None:
            return long
    parts = [t for t in (_ops_sums(i, p) for i, p in enumerate(paths)) if t is not None]
    cols = [slope.RUN, *slope.NEEDED_COLUMNS[:-1], "ms"]
    if not parts:
        return pd.DataFrame(columns=cols)
    return pa.concat_tables(parts, promote_options="permissive").to_pandas()[cols]


def _ops_sums(i: int, path: str) -> pa.Table | None:
    """Per-token per-stage time sums of one run (arrow group-by; only the needed columns are read)."""
    try:
        t = pq.read_table(path, columns=slope.NEEDED_COLUMNS)
    except (pa.ArrowException, OSError, KeyError, ValueError) as e:
        log.warning("no op table for slopes in %s: %s", path, str(e).splitlines()[0][:120])
        return None
    if t.num_rows == 0:
        return None
    keys = [c for c in slope.NEEDED_COLUMNS if c != columns.TIME_US]
    t = t.group_by(keys).aggregate([(columns.TIME_US, "sum")])
    t = t.append_column("ms", pa.compute.divide(t.column(f"{columns.TIME_US}_sum"), 1000.0))
    return t.select(keys + ["ms"]).append_column(slope.RUN, pa.array(np.full(t.num_rows, i, dtype=np.int64)))
