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
from harness.store import TMP_PREFIX, read_meta

log = logging.getLogger(__name__)
SETTINGS = ("threads", "flash_attn", "cache_type_k", "cache_type_v", "n_gpu_layers")
ENGINES = ("auto", "pandas", "duckdb")
DUCKDB_MIN_RUNS = 200  # auto: from here on DuckDB is faster (bench/fleet_bench.py)


@dataclass(frozen=True)
class ContextSummary:
    context: str
    depth: int
    timed_tokens: int
    plain_ms: float
    plain_sd_ms: float  # std across the run's timed tokens
    stage_ms: dict[str, float]  # only the stages the run recorded
    stage_pct: dict[str, float]


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


def auto_label(device: dict) -> str:
    return f"{device.get('cpu_model') or 'unknown CPU'} {device.get('physical_cores') or '?'}c"


def device_label(meta: dict, with_hostname: bool = False) -> str:
    """meta['label']; else CPU model + cores. With ``with_hostname``, an automatic label gets '@hostname'."""
    dev = meta.get("device") or {}
    auto = auto_label(dev)
    label = meta.get("label") or auto
    if with_hostname and label == auto and dev.get("hostname"):
        label = f"{label} @{dev['hostname']}"
    return label


def model_identity(meta: dict) -> tuple[str, str]:
    """(key, display name): key is the content hash, else name + dominant quant type."""
    model = meta.get("model") or {}
    types = model.get("type_summary") or {}
    quant = max(types, key=types.get) if types else ""
    name = model.get("name") or (Path(model["path"]).stem if model.get("path") else "unknown model")
    display = Path(model["path"]).stem if model.get("path") else name
    key = model.get("content_hash") or f"{name}|{quant}"
    return key, display


_NUMBER = (int, float)


def _num(v, default=float("nan")) -> float:
    return float(v) if type(v) in _NUMBER else default  # type(), not isinstance: a bool is not a number here


def _context(c: dict) -> ContextSummary:
    return ContextSummary(
        context=str(c.get("context")), depth=int(c.get("depth", -1)), timed_tokens=int(c.get("timed_tokens") or 1),
        plain_ms=_num(c.get("plain_ms")), plain_sd_ms=_num(c.get("plain_ms_std")),
        stage_ms={k: _num(v) for k, v in (c.get("stage_ms") or {}).items()},
        stage_pct={k: _num(v) for k, v in (c.get("stage_pct") or {}).items()})


def _read_model(meta: dict):
    """The run's ReadModel, or None when it has no tensor table (e.g. the reference run)."""
    if not (meta.get("model") or {}).get("gguf"):
        return None
    from analysis import readmodel
    try:
        return readmodel.from_run(meta)
    except (InputError, KeyError, ValueError, TypeError) as e:
        log.warning("no read model for %s: %s", meta.get("label"), e)
        return None


def run_info(path: Path, meta: dict, with_hostname: bool, rm_cache: dict,
             full_meta: Callable[[], dict] | None = None) -> RunInfo:
    """``meta`` may lack the tensor table (DuckDB engine); ``full_meta`` then reads the whole footer, once
    per model and settings, for the read model."""
    key, name = model_identity(meta)
    params = meta.get("params") or {}
    settings = tuple((k, params.get(k)) for k in SETTINGS)
    rm_key = (key, settings)
    if rm_key not in rm_cache:
        rm_cache[rm_key] = _read_model(full_meta() if full_meta else meta)
    bw = (meta.get("device") or {}).get("bandwidth") or {}
    return RunInfo(path=str(path), label=device_label(meta, with_hostname), model_key=key, model_name=name,
                   settings=settings, complete=bool(meta.get("complete", False)),
                   reference=bool(meta.get("reference", False)), bandwidth_gbps=_num(bw.get("read_gbps"), None),
                   contexts=tuple(_context(c) for c in meta.get("contexts") or []), read_model=rm_cache[rm_key])


def _try_meta(path: Path) -> dict | InputError:
    try:
        return read_meta(path)
    except InputError as e:
        return e


def resolve_engine(engine: str, n_runs: int) -> str:
    if engine not in ENGINES:
        raise UsageError(f"unknown fleet engine {engine!r} (choose from: {', '.join(ENGINES)})")
    if engine == "auto":
        return "duckdb" if n_runs >= DUCKDB_MIN_RUNS else "pandas"
    return engine


def read_metas(files: list[Path], engine: str) -> list[dict | InputError]:
    """Each file's metadata, or the InputError that reading it raised. DuckDB leaves out the tensor
    table and per-token times; a file its fast path cannot vouch for is read the pandas way."""
    fast: list[dict | None] = [None] * len(files)
    if engine == "duckdb":
        from analysis import fleet_db
        fast = fleet_db.read_footers(files)
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
    metas = read_metas(files, engine)
    runs, rm_cache, skipped = [], {}, []
    for i, (f, m) in enumerate(zip(files, metas, strict=True)):
        if isinstance(m, InputError):
            if i < len(explicit):
                raise m
            skipped.append(m)
            continue
        full = (lambda f=f: read_meta(f)) if engine == "duckdb" else None
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


def _ops_tokens(i: int, path: str) -> pa.Table | None:
    """Per-token per-stage time_us sums of one run (arrow group-by; only the needed columns are read)."""
    try:
        t = pq.read_table(path, columns=slope.NEEDED_COLUMNS)
    except (pa.ArrowException, OSError, KeyError, ValueError) as e:
        log.warning("no op table for slopes in %s: %s", path, str(e).splitlines()[0][:120])
        return None
    if t.num_rows == 0:
        return None
    keys = [c for c in slope.NEEDED_COLUMNS if c != columns.TIME_US]
    t = t.group_by(keys).aggregate([(columns.TIME_US, "sum")]).rename_columns([*keys, columns.TIME_US])
    return t.append_column(slope.RUN, pa.array(np.full(t.num_rows, i, dtype=np.int64)))


def token_stage_ms(paths: list[str], engine: str = "pandas") -> pd.DataFrame | None:
    """``slope.token_stage_ms`` of the runs at ``paths`` pooled (``slope.RUN``: index into ``paths``): one row
    per timed token, ms per stage. None when no run has an op table; one that cannot be read is left out."""
    if engine == "duckdb":
        from analysis import fleet_db
        tok = fleet_db.token_stage_ms(paths)
        if tok is not None:
            return tok if len(tok) else None
    parts = [t for t in (_ops_tokens(i, p) for i, p in enumerate(paths)) if t is not None]
    if not parts:
        return None
    return slope.token_stage_ms(pa.concat_tables(parts, promote_options="permissive").to_pandas())
