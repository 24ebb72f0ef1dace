"""Across-sweep figures of ``robust.py``: the attn_kv slope's spread over sweeps and how much of it is the device
changing between them (I2, correlation with the split cost and with each stage), sweeps grouped by the VM's
state and by the settings they ran with (``--vary``), and the ratios between two settings' paired sweeps:
arithmetic on the per-sweep dicts that ``robust.figures`` returns (or saved results). Also what every bench
script shares: the folder for kept runs (``runs_folder``), saving figures (``save_results``) and running a sweep as a
child process (``run_child``, ``run_sweep``, ``tiny_run``; ``last_line`` of a failed child)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from harness import checks
from harness.cli import Terminated
from harness.config import LIST_CASTS, LIST_SETTINGS, SweepConfig, expand, split_list
from harness.errors import InputError, OutputError, UsageError
from harness.fsutil import atomic_write

SLOW_SYNC_US = 1.0  # split cost from here up: the VM's slow-sync state (quick 0.45-0.7 us, slow 1.3-2.0; NOTES §12)
STATES = ("quick-sync", "slow-sync", "switched", "unknown")
SLOPE_SPREAD_TARGET_PCT = 10.0
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"  # git-ignored


def parse_vary(spec: str | None, least: int = 2) -> list[tuple[str, object] | None]:
    """'flash_attn=on,off' -> [('flash_attn', 'on'), ('flash_attn', 'off')], each value checked as the sweep
    checks it (at least ``least`` distinct values; else a UsageError); None -> [None] (the sweep's own settings)."""
    if not spec:
        return [None]
    key, _, values = spec.partition("=")
    try:
        if key not in LIST_SETTINGS:
            raise UsageError(f"unknown setting {key!r}")
        vals = split_list(values, key, LIST_CASTS[key])
        if len(vals) < least or len(set(vals)) < len(vals):
            raise UsageError(f"{least} or more distinct values needed, got {values!r}")
        expand(SweepConfig(), {key: vals})
    except UsageError as e:
        raise UsageError(f"--vary takes SETTING=A,B with SETTING one of {', '.join(LIST_SETTINGS)}: {e}") from None
    return [(key, v) for v in vals]


def _settings(r: dict) -> dict:
    return r.get("settings") or {"threads": r.get("threads")}  # saved before the settings were kept: threads only


def arm_label(r: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={_settings(r).get(k, 'unrecorded')}" for k in keys)


def across_by_arm(res: list[dict]) -> dict:
    """``across`` for each value of the settings that differ among the sweeps that recorded them (one group when
    none does); with two groups, the ratios of each pair of sweeps (``pair_ratios``)."""
    keys = [k for k in LIST_SETTINGS if len({str(_settings(r)[k]) for r in res if k in _settings(r)}) > 1]
    groups: dict[str, list[dict]] = {}
    for r in res:
        groups.setdefault(arm_label(r, keys), []).append(r)
    per = {}
    for t, grp in groups.items():
        if len(groups) > 1:
            print(f"\n--- {t}: {len(grp)} sweeps")
        per[t] = across(grp)
    if len(groups) == 2:
        pair_ratios(*groups.items())
    return per


def _pair_index(r: dict) -> int | None:
    m = re.fullmatch(r"robust-(\d+)-.*", str(r.get("label", "")))  # robust.py --vary's labels carry the pair
    return int(m.group(1)) if m else None


def pair_ratios(a: tuple[str, list[dict]], b: tuple[str, list[dict]]) -> dict[str, list[float]]:
    """Print and return, per pair, A / B of the attn_kv slope (each paired within its own sweep) and of the plain
    ms at the shallowest and the deepest depth (not paired: the two sweeps ran minutes apart)."""
    (na, ra), (nb, rb) = a, b
    ia, ib = [_pair_index(r) for r in ra], [_pair_index(r) for r in rb]
    if None not in ia + ib and len(set(ia)) == len(ia) and len(set(ib)) == len(ib):  # pair by the pair number in
        # the labels, whatever order the runs came in (a number seen twice: runs pooled from several sessions)
        by_b = dict(zip(ib, rb, strict=True))
        pairs, how = [(x, by_b[i]) for i, x in zip(ia, ra, strict=True) if i in by_b], "by pair number"
    else:
        pairs, how = list(zip(ra, rb, strict=False)), "the k-th sweep of each, in the order given"
    if len(pairs) < max(len(ra), len(rb)):
        print(f"\n({na}) / ({nb}): {max(len(ra), len(rb)) - len(pairs)} sweep(s) without a partner left out")
    plain = lambda r, i: list(r["plain_ms"].values())[i]  # noqa: E731 (depths in order)
    rows = {"attn_kv slope": [x["attn_kv_slope"] / y["attn_kv_slope"] for x, y in pairs],
            "plain ms, shallowest depth": [plain(x, 0) / plain(y, 0) for x, y in pairs],
            "plain ms, deepest depth": [plain(x, -1) / plain(y, -1) for x, y in pairs]}
    if pairs:
        print(f"\n({na}) / ({nb}), {len(pairs)} pairs ({how}):")
        for k, v in rows.items():
            print(f"  {k}: " + ", ".join(f"x{x:.3f}" for x in v) + f"; median x{np.median(v):.3f}")
    return rows


def across(res: list[dict]) -> tuple[float, dict | None]:
    """Print the attn_kv slope's spread across the sweeps, and how much of it is the device changing between
    sweeps rather than each sweep's sampling noise; return the spread in % and ``heterogeneity``'s figures."""
    slopes = np.array([r["attn_kv_slope"] for r in res])
    spread = float(checks.spread_pct(slopes)) if len(slopes) > 1 else float("nan")
    print(f"\nattn_kv slope across {len(res)} sweeps: " + ", ".join(f"{s:.3f}" for s in slopes)
          + f" ms/1k tokens; spread (max - min) / mean = {spread:.1f} % (target across five sweeps: <= "
            f"{SLOPE_SPREAD_TARGET_PCT:g} %)")
    h = heterogeneity(res)
    if h and np.isfinite(h["q"]):
        print(f"  between sweeps: sd {h['between_sd_pct']:.1f} % of the mean; within a sweep (bootstrap over rounds): "
              f"se {h['within_se_pct']:.1f} %; I2 = {h['i2_pct']:.0f} % of the spread is the device changing between "
              f"sweeps (Cochran's Q {h['q']:.1f} on {len(res) - 1} df); slope vs the sweep's split cost: "
              f"r = {h['r_split_cost']:+.2f}")
        if np.isfinite(h["ratio_to_ffn_spread_pct"]):
            print(f"  slope / the same sweep's FFN ms at the shallowest depth: spread "
                  f"{h['ratio_to_ffn_spread_pct']:.1f} % (a drift that slows every stage alike cancels here)")
        if h["r_stage_shallowest"]:
            print("  slope vs the same sweep's depth-invariant stage ms at the shallowest depth: r = "
                  + ", ".join(f"{k} {v:+.2f}" for k, v in h["r_stage_shallowest"].items()))
    if h:
        groups = [f"{k} {', '.join(f'{v:.3f} ({u:.2f} us)' for v, u in zip(g, h['split_us_by_state'][k], strict=True))}"
                  + (f", spread {checks.spread_pct(np.array(g)):.1f} %" if len(g) > 1 else "")
                  for k, g in h["slope_by_state"].items() if g]
        print(f"  by state (split cost < or >= {SLOW_SYNC_US:g} us; a sweep flagged for a state change apart; unknown: "
              "saved before the state check): "
              + "; ".join(groups))
    return spread, h


def heterogeneity(res: list[dict]) -> dict | None:
    """Between-sweep spread of the attn_kv slope against each sweep's own interval: the between-sweep sd, the
    root-mean-square within-sweep standard error (95 % interval width / 3.92), Cochran's Q and I2 (the share
    of the variation beyond sampling noise), and the correlation of the slope with the sweep's split cost."""
    if len(res) < 3:
        return None
    s = np.array([r["attn_kv_slope"] for r in res], float)
    se = np.array([(r["attn_kv_slope_ci"][1] - r["attn_kv_slope_ci"][0]) / 3.92 for r in res], float)
    sync = np.array([r.get("sync_us") for r in res], float)  # None (not measured) -> NaN
    state = [_state(r, y) for r, y in zip(res, sync, strict=True)]
    nan = float("nan")
    q = nan
    if np.isfinite(se).all() and (se > 0).all():  # an interval of zero width (no bootstrap) weighs nothing
        w = 1 / se**2
        q = float((w * (s - (w * s).sum() / w.sum()) ** 2).sum())
    return {"between_sd_pct": float(100 * s.std(ddof=1) / s.mean()),
            "within_se_pct": float(100 * np.sqrt((se**2).mean()) / s.mean()),
            "q": q, "i2_pct": float(100 * max(0.0, (q - (len(s) - 1)) / q)) if q > 0 else nan,
            "r_split_cost": _r(s, sync),
            "ratio_to_ffn_spread_pct": _ratio_spread(s, res),
            "slope_by_state": {k: [float(x) for x, st in zip(s, state, strict=True) if st == k] for k in STATES},
            "split_us_by_state": {k: [float(y) for y, st in zip(sync, state, strict=True) if st == k] for k in STATES},
            "r_stage_shallowest": {k: _r(s, np.array([r["stage_ms_shallowest"][k] for r in res], float))
                                   for k in checks.INVARIANT_STAGES
                                   if all(k in r.get("stage_ms_shallowest", {}) for r in res)}}


def _ratio_spread(s: np.ndarray, res: list[dict]) -> float:
    """Spread in % of each sweep's slope divided by its FFN ms at the shallowest depth: a drift that slows every
    stage alike cancels here, the VM's two-thread states (which move FFN and attention apart) do not."""
    ffn = np.array([r.get("stage_ms_shallowest", {}).get("ffn", np.nan) for r in res], float)
    return float(checks.spread_pct(s / ffn)) if np.isfinite(ffn).all() else float("nan")


def _state(r: dict, sync_us: float) -> str:
    if "state_change" not in r:  # saved before the check existed: a switch would go unseen
        return "unknown"
    if r["state_change"]:
        return "switched"
    return "unknown" if not np.isfinite(sync_us) else "slow-sync" if sync_us >= SLOW_SYNC_US else "quick-sync"


def _r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r, NaN unless both are finite and vary."""
    ok = np.isfinite(x).all() and np.isfinite(y).all() and x.std() > 0 and y.std() > 0
    return float(np.corrcoef(x, y)[0, 1]) if ok else float("nan")


@contextlib.contextmanager
def runs_folder(d: Path, make: bool):
    """``d``, made first when ``make`` (the sweeps' runs go there); a folder made here that holds nothing at the
    end (the first sweep failed) is removed again."""
    made = make and not d.exists()
    try:
        if make:
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"cannot make the folder for the runs ({e.strerror or e}): {d}") from None
        yield d
    finally:
        if made and d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def save_results(kind: str, payload: dict, folder: Path = RESULTS) -> Path:
    """Save a bench script's figures as ``FOLDER/KIND-STAMP.json`` (written whole or not at all; a taken name
    gets a ``-N`` suffix), say where, and return the path."""
    out = folder / f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        out = atomic_write(out, lambda p: p.write_text(json.dumps(payload, indent=1, default=str)), overwrite=False)
    except OSError as e:
        raise OutputError(f"cannot save the results ({e.strerror or e}): {out}") from None
    print(f"saved {out}")
    return out


def run_child(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kw)``, except that Ctrl-C or SIGTERM reaching this
    script is passed on to the child, which is given ``grace_s`` to stop (a sweep then writes its completed rounds as
    an incomplete run) before it is killed and the interrupt goes on."""
    grace_s = kw.pop("grace_s", 120)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw) as p:
        try:
            out, err = p.communicate()
        except KeyboardInterrupt as e:
            p.send_signal(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
            try:
                p.communicate(timeout=grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def last_line(r: subprocess.CompletedProcess) -> str:
    """What a failed child said last on stderr (the harness's commands end with their one-line error), else its
    exit status."""
    return (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]


def run_sweep(args: list[str], what: str = "the sweep", env: dict | None = None) -> None:
    """``python -m harness.sweep ARGS`` from the project root through ``run_child`` (with ``env`` added to this
    process's environment); an InputError with the sweep's last line when it fails."""
    r = run_child([sys.executable, "-m", "harness.sweep", *args], cwd=ROOT, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise InputError(f"{what} failed: {last_line(r)}")


def tiny_run(model: Path, out: Path, threads: int = 2) -> Path:
    """A real sweep of the tiny twin ``model`` (depths 13, 40, 80, six rounds) into ``out``: the run that
    compare_bench and fleet_bench copy into synthetic fleets."""
    run_sweep(["--model", str(model), "--contexts", "13,40,80", "--rounds", "6", "--warmup", "1", "--no-probe",
               "--threads", str(threads), "--label", "bench", "--out", str(out)], "the source sweep",
              {"HARNESS_NO_MODEL_CACHE": "1"})  # a throwaway twin: no entry for it in the user's model cache
    return next(out.glob("*.parquet"))
