"""A fleet of runs: find run files, read their metadata (footer only) and group them by device, model and settings.

A *group* is the unit that ``analysis.compare`` reports: runs with the same device label, the
same model (content hash, else name + dominant quant type), the same work-changing settings
(``SETTINGS``), the same completeness and the same reference flag. Runs within a group are
pooled; runs in different groups are never pooled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import InputError
from harness.store import TMP_PREFIX, read_meta

log = logging.getLogger(__name__)
SETTINGS = ("threads", "flash_attn", "cache_type_k", "cache_type_v", "n_gpu_layers")


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
                                              if f.is_file() and not f.name.startswith((TMP_PREFIX, ".")))
        for f in cands:
            if f.resolve() not in seen:
                seen.add(f.resolve())
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


def _num(v, default=float("nan")) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


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


def run_info(path: Path, meta: dict, with_hostname: bool, rm_cache: dict) -> RunInfo:
    key, name = model_identity(meta)
    params = meta.get("params") or {}
    settings = tuple((k, params.get(k)) for k in SETTINGS)
    rm_key = (key, settings)
    if rm_key not in rm_cache:
        rm_cache[rm_key] = _read_model(meta)
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


def load_runs(paths: Iterable[str | os.PathLike], with_hostname: bool = False) -> list[RunInfo]:
    """RunInfo for every run under ``paths``. A bad file named explicitly is an error; one found in a
    folder is skipped with a warning. Raises InputError when no run is left."""
    explicit, found = find_runs(paths)
    files = explicit + found
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        metas = list(ex.map(_try_meta, files))
    runs, rm_cache, skipped = [], {}, []
    for i, (f, m) in enumerate(zip(files, metas, strict=True)):
        if isinstance(m, InputError):
            if i < len(explicit):
                raise m
            skipped.append(m)
            continue
        runs.append(run_info(f, m, with_hostname, rm_cache))
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
