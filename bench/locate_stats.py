"""The figures of ``locate.py``: which variants there are and what they are, the rises per block, each variant's
excess over the plain contexts' rise, the effect of creation order, pooling saved results and printing them. No engine
here: arithmetic on (blocks, rounds, variants, depths) arrays of ms."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from harness import stats
from harness.errors import InputError

VARIANTS = ("plain", "plain2", "stages", "last", "attn", "cal", "pre")
DEFAULT_VARIANTS = VARIANTS[:5]
CAPTURED = ("stages", "last", "attn", "cal")  # an eval callback; the others are plain (no callback)
SPLIT_AROUND_ATTENTION = ("stages", "attn", "cal")  # their attn_kv segments are the attention alone
PREFILLED = ("pre",)  # plain, but prefills itself as a sweep's plain context does (the others are copies only)
SWEEP_CALIBRATION = ("cal",)  # as a sweep's profiled context: calibrate() once, an every-node token per round


def references(variants: list[str]) -> list[int]:
    """The reference: plain variants restored from a copy only (not ``pre``, the variant under test)."""
    return [i for i, v in enumerate(variants) if v not in CAPTURED and v not in PREFILLED]


def check_variants(variants: list[str], error=InputError, what: str = "variants") -> list[str]:
    """Distinct known names with at least one reference among them, else ``error``."""
    if len(set(variants)) < len(variants) or not set(variants) <= set(VARIANTS) or not references(variants):
        raise error(f"{what} takes distinct names from {', '.join(VARIANTS)}, plain or plain2 among them; "
                    f"got {','.join(map(str, variants))!r}")
    return list(variants)


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    m, se = stats.mean_se(x)
    return float(m), float(se)


def _slot_slope(rise: np.ndarray, slot: np.ndarray) -> float:
    """Rise per later creation slot, from rise[b, v] = block_b + variant_v + slope * slot[b, v] (least squares)."""
    nb, nv = rise.shape
    cols = [np.kron(np.eye(nb), np.ones((nv, 1))), np.kron(np.ones((nb, 1)), np.eye(nv)[:, 1:]), slot.reshape(-1, 1)]
    coef, *_ = np.linalg.lstsq(np.hstack(cols), rise.reshape(-1), rcond=None)
    return float(coef[-1])


def figures(wall: np.ndarray, attn: np.ndarray, slot: np.ndarray, variants: list[str]) -> dict:
    """wall, attn: (blocks, rounds, variants, depths) ms; slot: (blocks, variants). Rises are from the first depth to
    the last, paired by round, then averaged per block; intervals are over blocks."""
    with np.errstate(all="ignore"), warnings.catch_warnings():  # NaN rounds (pooled shorter blocks), NaN attn_kv
        warnings.simplefilter("ignore", RuntimeWarning)
        rise = np.nanmean(wall[..., -1] - wall[..., 0], axis=1)  # (blocks, variants)
        arise = np.nanmean(attn[..., -1] - attn[..., 0], axis=1)
    plain = references(variants)  # the reference: these plain contexts' mean rise
    ref, ref_ms = rise[:, plain].mean(axis=1), np.nanmean(wall[:, :, plain], axis=(0, 1, 2))
    mean_ms = np.nanmean(wall, axis=(0, 1))  # (variants, depths)
    rows = stats.boot_indices(rise.shape[0])
    out = {"per_variant": {}, "reference": [variants[i] for i in plain]}
    for i, v in enumerate(variants):
        excess = rise[:, i] - (ref if v in CAPTURED else rise[:, plain[0]])  # plain: minus the first (null control)
        f = {"rise_ms": _mean_se(rise[:, i]), "excess_ms": _mean_se(excess),
             "excess_ci_ms": stats.interval(excess[rows].mean(axis=1)).tolist(),
             "excess_above_0": int((excess > 0).sum()), "ratio_to_plain": (mean_ms[i] / ref_ms).tolist()}
        if np.isfinite(arise[:, i]).any():
            f["attn_kv_rise_ms"] = _mean_se(arise[:, i])
            f["rest_rise_ms"] = _mean_se(rise[:, i] - arise[:, i])
            f["attn_kv_minus_plain_ms"] = _mean_se(arise[:, i] - ref)
        out["per_variant"][v] = f
    boot = [_slot_slope(rise[r], slot[r]) for r in rows[:400]]
    out["slot_slope_ms"] = _slot_slope(rise, slot)
    out["slot_slope_ci_ms"] = stats.interval(np.array(boot)).tolist()
    resid = rise - rise.mean(axis=1, keepdims=True) - rise.mean(axis=0, keepdims=True) + rise.mean()
    first = np.array([resid[b, slot[b] == 0].mean() - resid[b, slot[b] > 0].mean() for b in range(len(rise))])
    out["first_created_ms"] = _mean_se(first)  # the first-created context's rise against the others', per block
    out["mean_ms"] = np.nanmean(wall, axis=(0, 1)).tolist()
    out["blocks"] = rise.shape[0]
    return out


def report(f: dict, depths: list[int], steal: list[float]) -> None:
    print(f"\nrise {depths[0]} -> {depths[-1]}, ms/token, mean over {f['blocks']} blocks ± standard error "
          f"(95 % interval over blocks); reference: the mean of {', '.join(f['reference'])}; "
          f"steal {100 * np.mean(steal):.1f} % of CPU time (max "
          f"{100 * np.max(steal):.1f} % in a block)")
    for v, g in f["per_variant"].items():
        m, se = g["rise_ms"]
        line = f"  {v:7s} rise {m:+6.2f} ± {se:.2f}"
        if v != f["reference"][0]:
            (e, ese), (lo, hi) = g["excess_ms"], g["excess_ci_ms"]
            minus = "the reference's" if v in CAPTURED else f"{f['reference'][0]}'s"
            line += (f"   minus {minus} {e:+.2f} ± {ese:.2f} [{lo:+.2f}, {hi:+.2f}] ({g['excess_above_0']} of "
                     f"{f['blocks']} > 0)")
        line += "   x" + ", x".join(f"{x:.4f}" for x in g["ratio_to_plain"]) + " of plain"
        print(line)
        if "attn_kv_rise_ms" in g:
            (a, ase), (r, rse), (d, dse) = g["attn_kv_rise_ms"], g["rest_rise_ms"], g["attn_kv_minus_plain_ms"]
            print(f"          attn_kv segments {a:+.2f} ± {ase:.2f}, the rest {r:+.2f} ± {rse:.2f}; "
                  f"attn_kv - the reference's rise {d:+.2f} ± {dse:.2f}")
    lo, hi = f["slot_slope_ci_ms"]
    m, se = f["first_created_ms"]
    print(f"  creation order: {f['slot_slope_ms']:+.3f} ms of rise per later slot [{lo:+.3f}, {hi:+.3f}]; the "
          f"first-created context against the others {m:+.2f} ± {se:.2f} ms")


def read_saved(paths: list[str], what: str, names: str, arrays: tuple[str, ...], check: Callable[[dict, str], None],
               optional: tuple[str, ...] = ()) -> list[dict]:
    """Saved results of a bench measured in blocks (this one, ``within.py``), one dict per file: its arrays as float
    (an ``optional`` one that an older file lacks is NaN in wall_ms's shape), ``names`` (its variants or tables),
    depths and steal. Every file must name the same ``names`` and depths as the first and pass ``check(part, path)``;
    else a one-line InputError."""
    parts: list[dict] = []
    for path in paths:
        try:
            saved = json.loads(Path(path).read_text())
            part = {k: np.array(saved[k], float) for k in arrays}
            for k in optional:
                part[k] = np.array(saved.get(k, np.full(part["wall_ms"].shape, np.nan)), float)
            part.update({names: list(saved[names]), "depths": list(saved["depths"]), "steal": list(saved["steal"])})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"cannot read saved {what} figures ({e}): {path}") from None
        if parts and (part[names], part["depths"]) != (parts[0][names], parts[0]["depths"]):
            raise InputError(f"{names} or depths differ from {paths[0]}'s: {path}")
        check(part, path)
        parts.append(part)
    return parts


def padded(parts: list[dict], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The parts' (blocks, rounds, ...) arrays, blocks concatenated; shorter blocks are padded with NaN rounds."""
    most = max(p[keys[0]].shape[1] for p in parts)

    def pad(x: np.ndarray) -> np.ndarray:
        return np.pad(x, [(0, 0), (0, most - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=np.nan)

    return {k: np.concatenate([pad(p[k]) for p in parts]) for k in keys}


def pooled(paths: list[str]) -> tuple[dict, list[int], list[float]]:
    """The figures of saved results with their blocks pooled (same variants and depths), as ``report`` takes them."""
    def check(part: dict, path: str) -> None:
        w, nv = part["wall_ms"], len(part["variants"])
        check_variants(part["variants"], InputError, f"{path}: its variants")
        if (w.ndim != 4 or w.shape[2:] != (nv, len(part["depths"])) or part["attn_ms"].shape != w.shape
                or part["slot"].shape != (len(w), nv) or len(part["steal"]) != len(w) or not len(w)):
            raise InputError(f"not a locate.py result (wall_ms {w.shape}, attn_ms {part['attn_ms'].shape}, slot "
                             f"{part['slot'].shape}, {len(part['steal'])} steal figures): {path}")

    parts = read_saved(paths, "locate.py", "variants", ("wall_ms", "attn_ms", "slot"), check)
    cat = padded(parts, ("wall_ms", "attn_ms"))
    slot = np.concatenate([p["slot"] for p in parts]).astype(int)
    f = figures(cat["wall_ms"], cat["attn_ms"], slot, parts[0]["variants"])
    return f, parts[0]["depths"], [s for p in parts for s in p["steal"]]
