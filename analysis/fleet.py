"""A fleet of runs: find run files, read their metadata (footer only) and group them by device, model and settings.

A *group* is the unit that ``analysis.compare`` reports: runs with the same device label, the same model (content
hash, else name + dominant quant type), the same work-changing settings (``SETTINGS``), the same completeness, the
same reference flag and the same synthetic (twin) flag. Runs within a group are pooled; runs in different groups
are never pooled. A copy of a run is read once; a run that another run continued (``--resume``: that one holds its
rounds) is left out.

Runs are found recursively, hidden folders left out, so the flat layout (``runs/<time>_<label>_<model>.parquet``)
and the Hive layout (``runs/device=<label>/model=<stem>/<time>.parquet``) read alike. Two engines read them and
give the same results: ``pandas`` (pyarrow, one file at a time on a thread pool) and ``duckdb`` (one query over
every footer, one over every op table: ``analysis.fleet_db``); ``auto`` picks DuckDB from ``DUCKDB_MIN_RUNS`` on.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis import slope
from harness import columns, store
from harness.cli import paused_gc
from harness.errors import InputError, UsageError
from harness.record import ContextSummary, RunRecord
from harness.store import read_record, record_from_meta

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
    synthetic: bool = False  # made on a synthetic twin: its rows say so (SYNTHETIC), and it is never pooled with real
    flags: tuple[str, ...] = ()  # kinds of the measurement flags the run raised (drift, noise, ...)
    resumed_from: str | None = None  # the run file this run continued, as it was named then
    named: bool = False  # named on the command line, not found in a folder: a defect is an error
    identity: tuple = field(default=(), repr=False, compare=False)  # the measurement: copies of a run share it
    read_model: object | None = field(default=None, repr=False, compare=False)  # analysis.readmodel.ReadModel

    @property
    def group_key(self) -> tuple:
        return (self.label, self.model_key, self.settings, self.complete, self.reference, self.synthetic)


@dataclass(frozen=True)
class Group:
    label: str
    model_key: str
    model_name: str
    settings: tuple[tuple[str, object], ...]
    complete: bool
    reference: bool
    runs: tuple[RunInfo, ...]
    synthetic: bool = False

    @property
    def setting(self) -> dict[str, object]:
        return dict(self.settings)


def find_runs(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """(explicit files, files found in folders), each sorted and de-duplicated. Raises when nothing is found."""
    explicit, found, seen = [], [], set()
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(f"no such file or folder: {p}")
        cands = [p] if p.is_file() else sorted(f for f in p.rglob("*.parquet")  # hidden: temp files, tools' state
                                              if not any(s.startswith(".") for s in f.relative_to(p).parts))
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
             full_record: Callable[[], RunRecord] | None = None, named: bool = False) -> RunInfo:
    """``rec`` may lack the tensor table (DuckDB engine); ``full_record`` then reads the whole footer, once
    per model and settings, for the read model."""
    key, name = model_identity(rec)
    settings = tuple((k, getattr(rec.params, k)) for k in SETTINGS)
    if (key, settings) not in rm_cache:
        rm_cache[key, settings] = _read_model(full_record() if full_record and not rec.model.gguf else rec)
    return RunInfo(path=str(path), label=device_label(rec, with_hostname), model_key=key, model_name=name,
                   settings=settings, complete=rec.complete, reference=rec.reference, synthetic=rec.synthetic,
                   bandwidth_gbps=rec.bandwidth_gbps, contexts=rec.contexts, read_model=rm_cache[key, settings],
                   flags=tuple(sorted({f.kind for f in rec.flags if f.kind != "synthetic"})),
                   resumed_from=rec.resumed_from, named=named, identity=(rec.resumed_from, rec.device, rec.timing, *(
                       (c.context, c.depth, c.timed_tokens, c.plain_ms, c.profiled_ms) for c in rec.contexts)))


def _caught(read: Callable[..., RunRecord], *args) -> RunRecord | InputError:
    try:
        return read(*args)
    except InputError as e:
        return e


def resolve_engine(engine: str, n_runs: int) -> str:
    if engine not in ENGINES:
        raise UsageError(f"unknown fleet engine {engine!r} (choose from: {', '.join(ENGINES)})")
    return ("duckdb" if n_runs >= DUCKDB_MIN_RUNS else "pandas") if engine == "auto" else engine


@paused_gc()
def read_records(files: list[Path], engine: str) -> list[RunRecord | InputError]:
    """Each file's validated record, or the InputError that reading it raised. DuckDB leaves out what compare
    never reads (per-token times, the tensor table, ...: ``fleet_db``'s module doc; the rest is validated as
    usual); a file its fast path cannot vouch for is read the pandas way."""
    fast: list[RunRecord | InputError | None] = [None] * len(files)
    if engine == "duckdb":
        from analysis import fleet_db
        fast = [None if m is None else _caught(record_from_meta, {**m, "tokens": m.get("tokens", [])}, f)
                for f, m in zip(files, fleet_db.read_footers(files), strict=True)]
    slow = [f for f, m in zip(files, fast, strict=True) if m is None]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        it = iter(list(ex.map(functools.partial(_caught, read_record), slow)))
    return [m if m is not None else next(it) for m in fast]


def load_runs(paths: Iterable[str | os.PathLike], with_hostname: bool = False, engine: str = "auto") -> list[RunInfo]:
    """RunInfo for every run under ``paths``. A bad file named explicitly is an error; one found in a
    folder is skipped with a warning. Raises InputError when no run is left."""
    explicit, found = find_runs(paths)
    files = explicit + found
    engine = resolve_engine(engine, len(files))
    runs, rm_cache, skipped = [], {}, []
    for i, (f, m) in enumerate(zip(files, read_records(files, engine), strict=True)):
        if isinstance(m, InputError):
            if i < len(explicit):
                raise m
            skipped.append(m)
            continue
        full = (lambda f=f: read_record(f)) if engine == "duckdb" else None
        runs.append(run_info(f, m, with_hostname, rm_cache, full, named=i < len(explicit)))
    if not runs:
        raise InputError(f"no harness runs among {len(files)} Parquet file(s); first: {skipped[0]}")
    for e in skipped:
        log.warning("skipping %s", e)
    return distinct(runs)


def distinct(runs: list[RunInfo]) -> list[RunInfo]:
    """``runs`` less copies of a run (same group and measurement: device, timing, each context's times; the first
    kept) and runs another run continued (``resumed_from``, a path as given then: matched by the file name of any
    copy, within the device, model and settings; runs continuing each other in a loop are kept), each left out
    with a log line (a warning for a run named on the command line)."""
    copies: dict[tuple, list[RunInfo]] = {}
    for r in runs:
        copies.setdefault((r.group_key, r.identity), []).append(r)
    by_name = {(Path(r.path).name, *r.group_key[:3]): k for k, rs in copies.items() for r in rs}
    after: dict[tuple, list[tuple]] = {}  # a measurement -> those that continued it
    for k, rs in copies.items():
        for r in rs[:1]:
            if r.resumed_from and (o := by_name.get((Path(r.resumed_from).name, *r.group_key[:3]))) not in (None, k):
                after.setdefault(o, []).append(k)
    out = []
    for k, (r, *rest) in copies.items():
        for c in rest:
            log.warning("skipping %s: a copy of %s", c.path, r.path)
        seen, todo = set(), list(after.get(k, ()))
        while todo:  # every run that continued k, directly or not; k among them is a loop: keep it
            if (c := todo.pop()) not in seen:
                seen.add(c)
                todo += after.get(c, ())
        if seen and k not in seen:
            (log.warning if r.named else log.info)("leaving out %s: continued by %s (--resume: the same measurement)",
                                                   r.path, ", ".join(copies[c][0].path for c in after[k]))
        else:
            out.append(r)
    return out


def group_runs(runs: Iterable[RunInfo]) -> list[Group]:
    """Groups sorted by label, then model, settings; complete before incomplete."""
    by_key: dict[tuple, list[RunInfo]] = {}
    for r in runs:
        by_key.setdefault(r.group_key, []).append(r)
    groups = [Group(label=k[0], model_key=k[1], model_name=v[0].model_name, settings=k[2], complete=k[3],
                    reference=k[4], synthetic=k[5], runs=tuple(v)) for k, v in by_key.items()]
    return sorted(groups, key=lambda g: (g.label, g.model_name, g.model_key, str(g.settings), not g.complete))


def group_names(groups: list[Group]) -> list[str]:
    """Row labels: the model, plus every setting that differs between groups, plus markers."""
    varying = [k for k in SETTINGS if len({g.setting.get(k) for g in groups} - {None}) > 1]
    clash = {n for n, k in Counter(n for n, _ in {(g.model_name, g.model_key) for g in groups}).items() if k > 1}
    out = []
    for g in groups:
        model = g.model_name
        if model in clash:  # same display name, different models: show the key
            model += f" [{g.model_key.split(':')[-1][:8]}]"
        marks = ["SYNTHETIC"] * g.synthetic + ["REFERENCE"] * g.reference + ["INCOMPLETE"] * (not g.complete)
        out.append(" ".join([model, *(f"{k}={g.setting[k]}" for k in varying if g.setting.get(k) is not None), *marks]))
    return out


def round_sums(paths: list[str], engine: str = "pandas", named: Iterable[str] = ()) -> pd.DataFrame:
    """Stage ms of every profiled token of the runs at ``paths``: columns run (index into ``paths``), context,
    depth, round, stage, ms. A run whose op table cannot be read is an error when ``named``, else left out with a
    warning; an older format (repeat/step for round) is upgraded on read."""
    named, fast, rest = set(named), None, range(len(paths))
    if engine == "duckdb":
        from analysis import fleet_db
        fast, rest = fleet_db.round_sums(paths)  # rest: older formats, or every run when DuckDB failed
    parts = [t for t in (_ops_sums(i, paths[i], paths[i] in named) for i in rest) if t is not None]
    cols = [slope.RUN, *slope.NEEDED_COLUMNS[:-1], "ms"]
    slow = pa.concat_tables(parts, promote_options="permissive").to_pandas()[cols] if parts else None
    frames = [f for f in (fast, slow) if f is not None]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def read_ops(path: str, named: bool, what: str) -> store.Run | None:
    """The run with its op table's slope columns, older formats upgraded. A defect: named, an error; else None."""
    try:
        return store.read_run(path, only=slope.NEEDED_COLUMNS)
    except InputError as e:
        if named:
            raise
        log.warning("%s: %s", what, e)
        return None


def _ops_sums(i: int, path: str, named: bool = False) -> pa.Table | None:
    """Per-token per-stage time sums of one run (arrow group-by; only the needed columns are read). What the plain
    read refuses (an older format, other types, empty keys, bad times) goes through ``read_ops``."""
    try:
        t = pq.read_table(path, columns=slope.NEEDED_COLUMNS)
        store.check_op_table(t, path)
    except (InputError, pa.ArrowException, OSError, KeyError, ValueError):  # read_ops upgrades, or says what is wrong
        run = read_ops(path, named, "no op table for slopes")
        t = None if run is None else pa.Table.from_pandas(run.ops, preserve_index=False)
    if t is None or t.num_rows == 0:
        return None
    keys = [c for c in slope.NEEDED_COLUMNS if c != columns.TIME_US]
    t = t.group_by(keys).aggregate([(columns.TIME_US, "sum")])
    t = t.append_column("ms", pa.compute.divide(t.column(f"{columns.TIME_US}_sum"), 1000.0))
    return t.select(keys + ["ms"]).append_column(slope.RUN, pa.array(np.full(t.num_rows, i, dtype=np.int64)))
