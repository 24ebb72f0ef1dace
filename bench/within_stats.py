"""The figures of ``within.py``: the ask tables there are, each table's rise with depth minus the reference's within
one context, pooling saved results and printing them. No engine here: arithmetic on (blocks, rounds, tables, depths)
arrays of ms."""

from __future__ import annotations

import warnings

import numpy as np
from locate_stats import padded, read_saved

from harness import stats
from harness.errors import InputError

TABLES = ("last", "last2", "stages", "attn")
REFERENCE = "last"  # no split: the graph computed in one piece, as a plain context's
SPLIT_AROUND_ATTENTION = ("stages", "attn")  # their attn_kv segments are the attention alone


def check_tables(tables: list[str], error=InputError, what: str = "tables") -> list[str]:
    """Distinct known names with the reference among them, else ``error``."""
    if len(set(tables)) < len(tables) or not set(tables) <= set(TABLES) or REFERENCE not in tables or len(tables) < 2:
        raise error(f"{what} takes two or more distinct names from {', '.join(TABLES)}, {REFERENCE} among them; "
                    f"got {','.join(map(str, tables))!r}")
    return list(tables)


def _over_blocks(x: np.ndarray, rows: np.ndarray) -> dict:
    """Mean over blocks, its standard error, a 95 % bootstrap interval over blocks and how many blocks are above 0."""
    m, se = stats.mean_se(x)
    return {"mean": float(m), "se": float(se),
            "ci": stats.interval(x[rows].mean(axis=1)).tolist(), "above_0": int((x > 0).sum())}


def figures(wall: np.ndarray, attn: np.ndarray, tables: list[str], host: np.ndarray | None = None) -> dict:
    """wall, attn, host: (blocks, rounds, tables, depths) ms (host may be absent or NaN: results saved before it was
    kept). A round's rise is t(deepest) - t(shallowest) of one table
    (measured back to back); a table's excess is its rise minus the reference's in the same round, averaged per
    block (mean, and a 20 % trimmed mean over rounds); intervals are over blocks."""
    ref, rows = tables.index(REFERENCE), stats.boot_indices(wall.shape[0])
    with np.errstate(all="ignore"), warnings.catch_warnings():  # NaN rounds (pooled shorter blocks), NaN attn_kv
        warnings.simplefilter("ignore", RuntimeWarning)
        rise = wall[..., -1] - wall[..., 0]  # (blocks, rounds, tables)
        arise = np.nanmean(attn[..., -1] - attn[..., 0], axis=1)  # (blocks, tables)
        hrise = np.full(arise.shape, np.nan) if host is None else np.nanmean(host[..., -1] - host[..., 0], axis=1)
        block_rise = np.nanmean(rise, axis=1)
        mean_ms = np.nanmean(wall, axis=(0, 1))  # (tables, depths)
    out = {"reference": REFERENCE, "blocks": int(wall.shape[0]), "rounds": int(np.isfinite(rise[..., ref]).sum()),
           "mean_ms": mean_ms.tolist(), "per_table": {}}
    for i, t in enumerate(tables):
        f = {"rise_ms": _over_blocks(block_rise[:, i], rows),
             "ratio_to_reference": (mean_ms[i] / mean_ms[ref]).tolist()}
        if i != ref:
            e = rise[:, :, i] - rise[:, :, ref]  # (blocks, rounds)
            f["excess_ms"] = _over_blocks(np.nanmean(e, axis=1), rows)
            f["excess_trimmed_ms"] = _over_blocks(stats.trimmed_mean(e.T), rows)
        if np.isfinite(hrise[:, i]).all():
            f["host_rise_ms"] = _over_blocks(hrise[:, i], rows)
        if t in SPLIT_AROUND_ATTENTION:
            f["attn_kv_rise_ms"] = _over_blocks(arise[:, i], rows)
            f["rest_rise_ms"] = _over_blocks(block_rise[:, i] - arise[:, i], rows)
            f["attn_kv_minus_reference_ms"] = _over_blocks(arise[:, i] - block_rise[:, ref], rows)
        out["per_table"][t] = f
    return out


def _fmt(g: dict) -> str:
    lo, hi = g["ci"]
    return f"{g['mean']:+6.2f} ± {g['se']:.2f} [{lo:+.2f}, {hi:+.2f}]"


def report(f: dict, depths: list[int], steal: list[float]) -> None:
    n = f["blocks"]
    print(f"\nrise {depths[0]} -> {depths[-1]}, ms/token, one context per depth, the ask table changed token by token; "
          f"mean over {n} blocks ({f['rounds']} rounds) ± standard error [95 % interval over blocks]; steal "
          f"{100 * np.mean(steal):.1f} % of CPU time (max {100 * np.max(steal):.1f} % in a block)")
    for t, g in f["per_table"].items():
        ratio = ", x".join(f"{x:.4f}" for x in g["ratio_to_reference"])
        print(f"  {t:6s} rise {_fmt(g['rise_ms'])}   x{ratio} of {f['reference']}'s ms")
        if "excess_ms" in g:
            e, tr = g["excess_ms"], g["excess_trimmed_ms"]
            print(f"         minus {f['reference']}'s rise {_fmt(e)} ({e['above_0']} of {n} blocks > 0); "
                  f"20 % trimmed over rounds {_fmt(tr)}")
        if "host_rise_ms" in g:
            print(f"         host (wall minus the segments) rise {_fmt(g['host_rise_ms'])}")
        if "attn_kv_rise_ms" in g:
            print(f"         attn_kv segments {_fmt(g['attn_kv_rise_ms'])}, the rest {_fmt(g['rest_rise_ms'])}; "
                  f"attn_kv minus {f['reference']}'s whole rise {_fmt(g['attn_kv_minus_reference_ms'])}")


def pooled(paths: list[str]) -> tuple[dict, list[int], list[float]]:
    """The figures of saved results with their blocks pooled (same tables and depths), as ``report`` takes them."""
    def check(part: dict, path: str) -> None:
        check_tables(part["tables"], InputError, f"{path}: its tables")
        w = part["wall_ms"]
        if (w.ndim != 4 or w.shape[2:] != (len(part["tables"]), len(part["depths"])) or len(part["steal"]) != len(w)
                or part["attn_ms"].shape != w.shape or part["host_ms"].shape != w.shape or len(w) < 1):
            raise InputError(f"not a within.py result (wall_ms {w.shape}, attn_ms {part['attn_ms'].shape}, "
                             f"{len(part['steal'])} steal figures): {path}")

    parts = read_saved(paths, "within.py", "tables", ("wall_ms", "attn_ms"), check, optional=("host_ms",))
    cat = padded(parts, ("wall_ms", "attn_ms", "host_ms"))
    if len(cat["wall_ms"]) < 2:
        raise InputError(f"at least two blocks are needed for an interval over blocks; {paths[0]} has one")
    return figures(cat["wall_ms"], cat["attn_ms"], parts[0]["tables"], cat["host_ms"]), parts[0]["depths"], \
        [s for p in parts for s in p["steal"]]
