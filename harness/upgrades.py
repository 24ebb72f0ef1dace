"""Format history of runs and the upgrades that bring older metadata to ``record.SCHEMA_VERSION``.

Bump ``record.SCHEMA_VERSION`` and add an ``upgrade_from_N`` on every format change. Upgrades run
on the metadata dict before ``RunRecord.from_dict``; ``harness.store`` upgrades the op table alongside.
A malformed older run is a ``RecordError`` (one line, as for any bad field), never a crash of an upgrade.

- 1: first format.
- 2: per-context sync calibration (``sync_us``, ``noop_sync_us``, ``stage_ms_calibrated``,
  ``stage_pct_calibrated``), ``params.callback`` and ``params.threads_source``.
- 3: typed record; round-robin measurement: ``round`` replaces ``repeat``/``step`` in the op and
  token tables, tokens carry ``splits``; per-context bootstrap intervals, calibration by split
  regression; per-round noise (``rounds``), the depth-invariance check (``invariants``) and
  ``flags``. Older runs are upgraded: ``round = repeat * tokens + step``, intervals unknown, order
  ``sequential`` (such a run cannot be resumed). The checks version 3 added run on the upgraded record
  (``checked``): the depth-invariance figure over the contexts' means (the footer holds no rounds) and the
  flags it and the contexts imply, so readers say what such a run never said.
  Minor fields since (absent in older version-3 runs, so their defaults): ``calibration_stages``, the
  calibration token's time per stage when it asked every node, and the contexts' mode comparison from it
  (``ops_rounds``, ``ops_pct_calibrated``, ``mode_diff_pp``, ``mode_diff_pp_ci``); ``sync_us_estimator``: the
  split cost is a trimmed mean of per-round costs since bench/NOTES.md §24, the mean before (the default). A
  reader that recalibrates an older run from its rounds (checks, slopes, the time model) uses the current one.
"""

from __future__ import annotations

from harness import checks
from harness.record import SCHEMA_VERSION, RunRecord
from harness.typed import RecordError


def _shape(meta: dict) -> None:
    """The containers the upgrades walk: params an object, contexts a list of objects, tokens a list (a
    field's name in the error, as ``RunRecord.from_dict`` would give it)."""
    for key, tp in (("params", dict), ("contexts", list), ("tokens", list)):
        if key in meta and not isinstance(meta[key], tp):
            what = "an object" if tp is dict else "a list"
            raise RecordError(key, f"expected {what}, got {type(meta[key]).__name__}")
    for i, c in enumerate(meta.get("contexts", [])):
        if not isinstance(c, dict):
            raise RecordError(f"contexts[{i}]", f"expected an object, got {type(c).__name__}")


def upgrade_from_1(meta: dict) -> dict:
    for c in meta.get("contexts", []):
        c.setdefault("sync_us", None)
        c.setdefault("noop_sync_us", None)
        c.setdefault("stage_ms_calibrated", {})  # none measured: readers show the raw figures and say so
        c.setdefault("stage_pct_calibrated", {})
    params = meta.setdefault("params", {})
    params.setdefault("callback", "python")
    params.setdefault("threads_source", "unknown")
    meta["schema_version"] = 2
    return meta


def upgrade_from_2(meta: dict) -> dict:
    """Sequential contexts of ``repeats`` x ``tokens``: a (repeat, step) becomes round repeat x tokens + step."""
    params = meta.setdefault("params", {})
    n_tok = params.get("tokens", 1) if isinstance(params.get("tokens"), int) else 1
    params["rounds"] = n_tok * (params.pop("repeats", 1) if isinstance(params.get("repeats"), int) else 1)
    params.pop("tokens", None)
    params["order"] = "sequential"  # round-robin measurement came with version 3
    params.setdefault("warmup", 0)
    for key in ("threads", "n_gpu_layers", "n_batch", "n_ubatch", "n_ctx"):
        params.setdefault(key, 0)
    for key in ("flash_attn", "cache_type_k", "cache_type_v"):
        params.setdefault(key, "unknown")
    rows = []
    for r in meta.get("tokens", []):
        if isinstance(r, list) and len(r) == 6 and all(isinstance(x, int) for x in r[2:4]):
            ctx, depth, rep, step, pass_, wall = r
            rows.append([ctx, depth, rep * n_tok + step, pass_, 0, wall])
        else:
            rows.append(r)  # left for from_dict to refuse with the field's name
    meta["tokens"] = rows
    for c in meta.get("contexts", []):
        c["sync_us_estimator"] = "per segment"  # (profiled - plain) / segments: no calibration tokens before 3
        if c.get("overhead_ratio") is None:
            c.pop("overhead_ratio", None)
        for k in ("sensors_before", "sensors_after"):
            if isinstance(c.get(k), dict):
                c[k] = {x: c[k][x] for x in ("cpu_mhz", "temp_c", "t_unix") if x in c[k]}
    meta["schema_version"] = 3
    return meta


UPGRADES = {1: upgrade_from_1, 2: upgrade_from_2}


def upgrade(meta: dict) -> tuple[dict, int]:
    """The metadata at ``SCHEMA_VERSION`` and the version it was written with. Raises RecordError."""
    v = meta.get("schema_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise RecordError("schema_version", "missing or not a positive integer")
    if v > SCHEMA_VERSION:
        raise RecordError("schema_version", f"{v} is newer than this harness supports ({SCHEMA_VERSION}); "
                          "upgrade the harness")
    if v < SCHEMA_VERSION:
        _shape(meta)
    try:
        while meta["schema_version"] < SCHEMA_VERSION:
            meta = UPGRADES[meta["schema_version"]](meta)
    except RecordError:
        raise
    except (TypeError, AttributeError, KeyError, ValueError) as e:  # a malformed field _shape does not check
        why = (str(e).splitlines() or [""])[0][:120]
        raise RecordError("(top level)", f"malformed version-{v} run, cannot upgrade it ({type(e).__name__}: "
                          f"{why})") from None
    return meta, v


def from_meta(meta: dict) -> tuple[RunRecord, int]:
    """Upgrade and validate run metadata: (record, written version). Raises RecordError naming the field."""
    if not isinstance(meta, dict):
        raise RecordError("(top level)", f"expected an object, got {type(meta).__name__}")
    meta, v = upgrade(meta)
    rec = RunRecord.from_dict(meta)
    if not rec.contexts:  # a sweep writes no run before its first round: every reader needs a context
        raise RecordError("contexts", "empty: a run holds at least one measured context")
    return (checked(rec) if v < 3 and rec.invariants is None and not rec.reference else rec), v


def checked(rec: RunRecord) -> RunRecord:
    """A run from before version 3 with the checks that version added, on its contexts' means."""
    inv, flags = checks.rechecked(rec)  # no rounds in such a run: the noise flags have nothing to judge
    return rec.replace(invariants=inv, flags=tuple(flags))
