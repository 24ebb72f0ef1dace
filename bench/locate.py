"""Where does the capture's extra cost at depth come from? (bench/NOTES.md §30-§31)

    python bench/locate.py [--model GGUF] [--depths 13,4096] [--blocks 20] [--rounds 20] [--threads N] [--variants V,..]
    python bench/locate.py --load bench/results/locate-*.json       # saved figures again, blocks pooled

A sweep's profiled contexts rise from the shallowest depth to the deepest ~0.5 ms a token more than its plain
ones (§30), and every sweep creates the plain context first. Here several *variants* of a context are resident
at each depth and measured in the same rounds:

- ``plain``, ``plain2``: no callback (``plain2`` is the null control: the same thing created at another moment);
- ``stages``: the sweep's profiled pass (a boundary at every change of stage);
- ``last``: a callback that asks only the graph's last node: the callback is set and sees every node, but the
  graph is computed in one piece, as plain's is;
- ``attn``: a callback that asks only where the attention over the KV cache (stage attn_kv) starts and ends;
- ``cal`` (with ``--variants``): ``stages`` plus what a sweep's profiled context also runs: ``Capture.calibrate``
  once, and a calibration token asking every node each round (at one depth, in turn; after the timed tokens);
- ``pre`` (with ``--variants``): plain, but with a history like a sweep's plain context, which prefilled its cache
  itself: the last ubatch of its prompt (all of it when shorter) is rolled back and decoded again, then the state
  is restored; the other variants are only ever restored from a copy.

A *block* creates every variant at every depth afresh (each from a copy of one prefilled cache per depth), in a
creation order that rotates from block to block, measures ``--rounds`` rounds (one token per context, in a balanced
order that changes every round, a variant's depths back to back) and frees them. A context's own offset (its memory
placement) stays for its life, so blocks, not rounds, are the unit: per block and variant the rise is the mean over
rounds of t(deepest) - t(shallowest), and figures are means over blocks with a standard error and a 95 % bootstrap
interval over blocks. Printed: each variant's rise minus plain's (the capture's excess, located by which variants
carry it), the raw attn_kv segments' rise and the rest's for the variants that split around the attention, and the
effect of creation order (rise per later creation slot, from a fit with block and variant effects). Nothing is
asserted; the figures are saved as JSON in bench/results/.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from across import save_results  # noqa: E402

from harness import device, stages, stats  # noqa: E402
from harness.capture import Capture  # noqa: E402
from harness.cli import ArgParser, run_cli  # noqa: E402
from harness.config import SweepConfig, parse_contexts  # noqa: E402
from harness.engine import Context, Model  # noqa: E402
from harness.errors import InputError, UsageError  # noqa: E402
from harness.model_cache import read_model  # noqa: E402
from harness.orchestrate import check_model, prompt_tokens  # noqa: E402
from harness.runner import round_order  # noqa: E402
from harness.twin import ensure_default_model  # noqa: E402

VARIANTS = ("plain", "plain2", "stages", "last", "attn", "cal", "pre")
DEFAULT_VARIANTS = VARIANTS[:5]


def _last_only(st: list[str]) -> list[bool]:
    return [i == len(st) - 1 for i in range(len(st))]


def _around_attention(st: list[str]) -> list[bool]:
    return [i == len(st) - 1 or (st[i] == stages.ATTN_KV) != (st[i + 1] == stages.ATTN_KV) for i in range(len(st))]


ASKS = {"stages": None, "last": _last_only, "attn": _around_attention, "cal": None}  # captured; the rest are plain
SPLIT_AROUND_ATTENTION = ("stages", "attn", "cal")  # their attn_kv segments are the attention alone
PREFILLED = ("pre",)  # plain, but prefills itself as a sweep's plain context does (the others are copies only)
SWEEP_CALIBRATION = ("cal",)  # as a sweep's profiled context: calibrate() once, an every-node token per round


def _seeds(stack: ExitStack, model: Model, ecfg, depths: list[int], prompt: list[int]) -> list[Context]:
    """One prefilled plain context per depth (a deeper one from a copy of the shallower), as a sweep prefills."""
    out: list[Context] = []
    for d in depths:
        c = stack.enter_context(Context(model, ecfg))
        if out:
            c.copy_state_from(out[-1])
        c.prefill(prompt[c.n_past:d])
        c.copy_state_from(c)  # a restored state (sliding caches keep only the window), as every context here gets
        out.append(c)
    return out


def block(model: Model, ecfg, seeds: list[Context], variants: list[str], b: int, rounds: int, warmup: int,
          prompt: list[int]) -> tuple[np.ndarray, np.ndarray, list[int], float]:
    """One block: (rounds, variants, depths) wall ms and raw attn_kv ms (NaN where not split around it), each
    variant's creation slot, and the steal share of the block's CPU time."""
    nv, nd, tok = len(variants), len(seeds), prompt[-1]
    created = [variants[(b + k) % nv] for k in range(nv)]  # rotated: every variant in every slot once per nv blocks
    wall, attn = np.full((rounds, nv, nd), np.nan), np.full((rounds, nv, nd), np.nan)
    with ExitStack() as stack:
        ctx: dict[tuple[int, int], tuple[Context, Capture | None]] = {}
        for v in created:
            i = variants.index(v)
            for j, seed in enumerate(seeds):
                cap = Capture("stages", asks=ASKS[v]) if v in ASKS else None
                c = stack.enter_context(Context(model, ecfg, *((cap.callback, cap.user_data) if cap else ())))
                c.copy_state_from(seed)
                if v in PREFILLED:  # its last ubatch of the prompt decoded anew, then restored (its own history)
                    c.rollback(max(0, seed.n_past - ecfg.n_ubatch))
                    c.prefill(prompt[c.n_past:seed.n_past])
                    c.copy_state_from(c)
                if cap:
                    cap.discover(c, tok)
                if v in SWEEP_CALIBRATION:
                    cap.calibrate(c, tok)
                for _ in range(warmup):
                    if cap:
                        cap.step(c, tok)
                    else:
                        c.step(tok)
                ctx[i, j] = (c, cap)
        before = device.cpu_counters()
        for r in range(rounds):
            for i, j in _round_keys(nv, nd, b * rounds + r):
                c, cap = ctx[i, j]
                if cap is None:
                    wall[r, i, j] = c.step(tok) / 1e6
                    continue
                p = cap.step(c, tok)
                wall[r, i, j] = p.wall_ns / 1e6
                if variants[i] in SPLIT_AROUND_ATTENTION:
                    kv = (g.time_ns for g in p.segments if cap.stages[g.node_last] == stages.ATTN_KV)
                    attn[r, i, j] = sum(kv) / 1e6
            for i in (variants.index(v) for v in SWEEP_CALIBRATION if v in variants):  # after the timed tokens
                c, cap = ctx[i, r % nd]
                cap.step(c, tok, extra_splits=len(cap.nodes))
        noise = device.noise_between(before, device.cpu_counters())
    steal = (noise["steal_s"] or 0.0) / max(noise["wall_s"], 1e-9) / (os.cpu_count() or 1)
    return wall, attn, [created.index(v) for v in variants], steal


def _round_keys(nv: int, nd: int, r: int) -> list[tuple[int, int]]:
    """Round r's (variant, depth) order: the variants in a balanced order that changes every round, each variant's
    depths back to back (ascending and descending in turn), so a rise is paired over milliseconds, not a round."""
    return [(i, j) for k, i in enumerate(round_order(nv, r))
            for j in (range(nd) if (r + k) % 2 == 0 else range(nd - 1, -1, -1))]


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


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
    plain = [i for i, v in enumerate(variants) if v not in ASKS]  # the reference: the plain contexts' mean rise
    ref, ref_ms = rise[:, plain].mean(axis=1), np.nanmean(wall[:, :, plain], axis=(0, 1, 2))
    mean_ms = np.nanmean(wall, axis=(0, 1))  # (variants, depths)
    rows = stats.boot_indices(rise.shape[0])
    out = {"per_variant": {}, "reference": [variants[i] for i in plain]}
    for i, v in enumerate(variants):
        excess = rise[:, i] - (ref if v in ASKS else rise[:, plain[0]])  # a plain one: minus the first (null control)
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
    out["mean_ms"] = np.nanmean(wall, axis=(0, 1)).tolist()
    out["blocks"] = rise.shape[0]
    return out


def report(f: dict, depths: list[int], steal: list[float]) -> None:
    print(f"\nrise {depths[0]} -> {depths[-1]}, ms/token, mean over {f['blocks']} blocks ± standard error "
          f"(95 % interval over blocks); steal {100 * np.mean(steal):.1f} % of CPU time (max "
          f"{100 * np.max(steal):.1f} % in a block)")
    for v, g in f["per_variant"].items():
        m, se = g["rise_ms"]
        line = f"  {v:7s} rise {m:+6.2f} ± {se:.2f}"
        if v != f["reference"][0]:
            (e, ese), (lo, hi) = g["excess_ms"], g["excess_ci_ms"]
            minus = "the plain ones'" if v in ASKS else f"{f['reference'][0]}'s"
            line += (f"   minus {minus} {e:+.2f} ± {ese:.2f} [{lo:+.2f}, {hi:+.2f}] ({g['excess_above_0']} of "
                     f"{f['blocks']} > 0)")
        line += "   x" + ", x".join(f"{x:.4f}" for x in g["ratio_to_plain"]) + " of plain"
        print(line)
        if "attn_kv_rise_ms" in g:
            (a, ase), (r, rse), (d, dse) = g["attn_kv_rise_ms"], g["rest_rise_ms"], g["attn_kv_minus_plain_ms"]
            print(f"          attn_kv segments {a:+.2f} ± {ase:.2f}, the rest {r:+.2f} ± {rse:.2f}; "
                  f"attn_kv - plain's rise {d:+.2f} ± {dse:.2f}")
    lo, hi = f["slot_slope_ci_ms"]
    print(f"  creation order: {f['slot_slope_ms']:+.3f} ms of rise per later slot [{lo:+.3f}, {hi:+.3f}]")


def pooled(paths: list[str]) -> tuple[dict, list[int], list[float]]:
    """The figures of saved results with their blocks pooled (same variants and depths), as ``report`` takes them."""
    parts: list[dict] = []
    for path in paths:
        try:
            saved = json.loads(Path(path).read_text())
            part = {k: np.array(saved[k], float) for k in ("wall_ms", "attn_ms", "slot")}
            part.update(variants=list(saved["variants"]), depths=list(saved["depths"]), steal=list(saved["steal"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"cannot read saved locate.py figures ({e}): {path}") from None
        if parts and (part["variants"], part["depths"]) != (parts[0]["variants"], parts[0]["depths"]):
            raise InputError(f"variants or depths differ from {paths[0]}'s: {path}")
        if part["wall_ms"].ndim != 4 or part["wall_ms"].shape[2:] != (len(part["variants"]), len(part["depths"])):
            raise InputError(f"not a locate.py result (wall_ms has shape {part['wall_ms'].shape}): {path}")
        parts.append(part)
    most = max(p["wall_ms"].shape[1] for p in parts)  # blocks of fewer rounds are padded with NaN rounds

    def pad(x: np.ndarray) -> np.ndarray:
        return np.pad(x, [(0, 0), (0, most - x.shape[1]), (0, 0), (0, 0)], constant_values=np.nan)

    cat = {k: np.concatenate([pad(p[k]) for p in parts]) for k in ("wall_ms", "attn_ms")}
    cat["slot"] = np.concatenate([p["slot"] for p in parts])
    f = figures(cat["wall_ms"], cat["attn_ms"], cat["slot"].astype(int), parts[0]["variants"])
    return f, parts[0]["depths"], [s for p in parts for s in p["steal"]]


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="locate.py", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the E4B Q4_K_M twin, made if missing)")
    ap.add_argument("--depths", default="13,4096")
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"which, comma-separated, plain first (from {', '.join(VARIANTS)})")
    ap.add_argument("--load", nargs="+", default=None, metavar="JSON",
                    help="print the figures of saved results again, their blocks pooled")
    a = ap.parse_args(argv)
    if a.load:
        report(*pooled(a.load))
        return 0
    if a.blocks < 2 or a.rounds < 1:
        raise UsageError(f"--blocks must be >= 2 and --rounds >= 1, got {a.blocks} and {a.rounds}")
    variants = a.variants.split(",")
    if variants[0] != "plain" or len(set(variants)) < len(variants) or not set(variants) <= set(VARIANTS):
        raise UsageError(f"--variants takes distinct names from {', '.join(VARIANTS)}, plain first; got {a.variants!r}")
    cfg = SweepConfig(contexts=parse_contexts(a.depths), rounds=a.rounds, warmup=a.warmup,
                      threads=device.physical_cores() if a.threads is None else a.threads).validate()
    depths = [d for _, d in cfg.contexts]
    path = ensure_default_model() if a.model is None else Path(a.model)
    info = read_model(path)
    check_model(cfg.replace(contexts=tuple(cfg.contexts) * -(-(len(variants) + 1) // 2)), path, info)  # + seeds
    walls, attns, slots, steal = [], [], [], []
    t0 = time.perf_counter()
    with Model(path) as model, ExitStack() as stack:
        prompt = prompt_tokens(model, info.synthetic, cfg.max_depth)
        ecfg = cfg.engine_config(cfg.threads)
        seeds = _seeds(stack, model, ecfg, depths, prompt)
        print(f"{len(depths)} depths prefilled in {time.perf_counter() - t0:.0f} s; {a.blocks} blocks of "
              f"{len(variants)} variants x {len(depths)} depths x {a.rounds} rounds", flush=True)
        for b in range(a.blocks):
            w, at, sl, st = block(model, ecfg, seeds, variants, b, a.rounds, a.warmup, prompt)
            walls.append(w)
            attns.append(at)
            slots.append(sl)
            steal.append(st)
            rises = ", ".join(f"{v} {(w[:, i, -1] - w[:, i, 0]).mean():+.2f}" for i, v in enumerate(variants))
            print(f"block {b + 1}/{a.blocks} ({time.perf_counter() - t0:.0f} s) rises, ms: {rises}", flush=True)
    wall, attn, slot = np.array(walls), np.array(attns), np.array(slots)
    f = figures(wall, attn, slot, variants)
    report(f, depths, steal)
    save_results("locate", {"args": vars(a), "variants": variants, "depths": depths, "threads": cfg.threads,
                            "model": str(path), "synthetic": info.synthetic, "steal": steal, **f,
                            "wall_ms": wall.tolist(), "attn_ms": attn.tolist(), "slot": slot.tolist()})
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("locate.py", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
