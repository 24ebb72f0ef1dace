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
  is restored; the other variants are only ever restored from a copy. Not a sweep's history exactly: a sweep
  prefilled the whole span from the previous depth (its last batch is what is left of it), and on a sliding-window
  model the restored cache holds only the window, so rolling back a ubatch can leave the re-decoded tokens without
  the earlier context there (the same shapes and work, other values).

A *block* creates every variant at every depth afresh (each from a copy of one prefilled cache per depth), in a
creation order that rotates from block to block, measures ``--rounds`` rounds (one token per context, in a balanced
order that changes every other round, a variant's depths back to back, their order flipping every round) and frees
them. A context's own offset (its memory placement) stays for its life, so blocks, not rounds, are the unit: per
block and variant the rise is the mean over rounds of t(deepest) - t(shallowest), and figures are means over blocks
with a standard error and a 95 % bootstrap interval over blocks. Printed (``locate_stats``): each captured variant's
rise minus the reference's (the mean of the plain variants restored from a copy: the capture's excess, located by
which variants carry it), each other plain variant's minus the first plain one's (the null control), the raw attn_kv
segments' rise and the rest's for the variants that split around the attention, and the effect of creation order
(rise per later creation slot, from a fit with block and variant effects, and the first-created context against the
others). Creation slots are balanced when the blocks are a multiple of the variants, round slots when the rounds
are a whole number of ``round_order`` cycles (2n rounds for even n variants, 4n for odd). Nothing is asserted; the
figures are saved as JSON in bench/results/ (on Ctrl-C, the blocks done so far).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from across import save_results  # noqa: E402
from locate_stats import (  # noqa: E402
    CAPTURED,
    DEFAULT_VARIANTS,
    PREFILLED,
    SPLIT_AROUND_ATTENTION,
    SWEEP_CALIBRATION,
    check_variants,
    figures,
    pooled,
    report,
)

from harness import device, stages  # noqa: E402
from harness.capture import Capture, StepProfile  # noqa: E402
from harness.cli import ArgParser, run_cli  # noqa: E402
from harness.config import SweepConfig, parse_contexts  # noqa: E402
from harness.engine import Context, Model  # noqa: E402
from harness.errors import UsageError  # noqa: E402
from harness.gguf_model import ModelInfo  # noqa: E402
from harness.model_cache import read_model  # noqa: E402
from harness.orchestrate import check_model, prompt_tokens  # noqa: E402
from harness.runner import grow, round_order  # noqa: E402
from harness.twin import ensure_default_model  # noqa: E402


def _last_only(st: list[str]) -> list[bool]:
    return [i == len(st) - 1 for i in range(len(st))]


def _around_attention(st: list[str]) -> list[bool]:
    return [i == len(st) - 1 or (st[i] == stages.ATTN_KV) != (st[i + 1] == stages.ATTN_KV) for i in range(len(st))]


ASKS = {"stages": None, "last": _last_only, "attn": _around_attention, "cal": None}  # the ask rule of each captured
assert set(ASKS) == set(CAPTURED)


def _seeds(stack: ExitStack, model: Model, ecfg, depths: list[int], prompt: list[int]) -> list[Context]:
    """One prefilled plain context per depth (a deeper one from a copy of the shallower), as a sweep prefills."""
    out: list[Context] = []
    for d in depths:
        c = stack.enter_context(Context(model, ecfg))
        grow(c, out[-1] if out else None, prompt, d)  # a restored state, as every context copied from it gets
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
                    attn[r, i, j] = attn_kv_ms(cap, p)
            for i in (variants.index(v) for v in SWEEP_CALIBRATION if v in variants):  # after the timed tokens
                c, cap = ctx[i, r % nd]
                cap.step(c, tok, extra_splits=len(cap.nodes))
        steal = steal_share(before)
    return wall, attn, [created.index(v) for v in variants], steal


def attn_kv_ms(cap: Capture, p: StepProfile) -> float:
    """The step's attn_kv segments, ms (the attention alone where the table splits around it)."""
    return sum(g.time_ns for g in p.segments if cap.stages[g.node_last] == stages.ATTN_KV) / 1e6


def steal_share(before: dict) -> float:
    """Steal time since the ``device.cpu_counters()`` sample ``before``, as a share of all CPUs' time."""
    noise = device.noise_between(before, device.cpu_counters())
    return (noise["steal_s"] or 0.0) / max(noise["wall_s"], 1e-9) / (os.cpu_count() or 1)


def _round_keys(nv: int, nd: int, r: int) -> list[tuple[int, int]]:
    """Round r's (variant, depth) order: the variants in a balanced order (a row serves two rounds), each variant's
    depths back to back (ascending and descending in turn), so a rise is paired over milliseconds, not a round."""
    return [(i, j) for k, i in enumerate(round_order(nv, r))
            for j in (range(nd) if (r + k) % 2 == 0 else range(nd - 1, -1, -1))]


def block_args(ap: ArgParser, blocks: int, rounds: int) -> None:
    """The arguments of a bench that measures blocks of rounds at several depths (this script and within.py)."""
    ap.add_argument("--model", default=None, help="GGUF (default: the E4B Q4_K_M twin, made if missing)")
    ap.add_argument("--depths", default="13,4096")
    ap.add_argument("--blocks", type=int, default=blocks)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--load", nargs="+", default=None, metavar="JSON",
                    help="print the figures of saved results again, their blocks pooled")


def setup(a, copies: int) -> tuple[SweepConfig, Path, ModelInfo]:
    """The checked settings, the model's path (the default twin made if missing) and its parsed metadata; the memory
    guard counts ``copies`` contexts at every depth."""
    if a.blocks < 2 or a.rounds < 1:
        raise UsageError(f"--blocks must be >= 2 and --rounds >= 1, got {a.blocks} and {a.rounds}")
    cfg = SweepConfig(contexts=parse_contexts(a.depths), rounds=a.rounds, warmup=a.warmup,
                      threads=device.physical_cores() if a.threads is None else a.threads).validate()
    path = ensure_default_model() if a.model is None else Path(a.model)
    info = read_model(path)
    check_model(cfg.replace(contexts=tuple(cfg.contexts) * copies), path, info)
    return cfg, path, info


def run_blocks(n: int, one: Callable[[int], tuple], line: Callable[[tuple], str],
               t0: float) -> tuple[list[np.ndarray], list[float]]:
    """``one(b)`` for b in 0..n-1 with a progress line after each (on Ctrl-C, the finished blocks, two or more).
    Each block is a tuple of arrays ending with its steal share; returned: each array stacked over the blocks, and
    the steal shares."""
    done: list[tuple] = []  # appended whole: an interrupt cuts no block in half
    try:
        for b in range(n):
            done.append(one(b))
            print(f"block {b + 1}/{n} ({time.perf_counter() - t0:.0f} s) {line(done[-1])}", flush=True)
    except KeyboardInterrupt:
        if len(done) < 2:
            raise
        print(f"interrupted: the {len(done)} blocks done so far", flush=True)
    *arrays, steal = zip(*done, strict=True)
    return [np.array(a) for a in arrays], list(steal)


def measure(a, cfg: SweepConfig, path: Path, info: ModelInfo, what: str, one: Callable[..., tuple],
            line: Callable[[tuple], str], seed_threads: int) -> tuple[list[np.ndarray], list[float]]:
    """Load the model, prefill one seed per depth with ``seed_threads`` threads, and run ``a.blocks`` blocks of
    ``one(model, ecfg, seeds, b, prompt)`` (``ecfg``: ``cfg.threads`` threads) through ``run_blocks``; ``what`` names
    the things measured in each round for the opening line (this script's variants, within.py's tables)."""
    depths = [d for _, d in cfg.contexts]
    t0 = time.perf_counter()
    with Model(path) as model, ExitStack() as stack:
        prompt = prompt_tokens(model, info.synthetic, cfg.max_depth)
        ecfg = cfg.engine_config(cfg.threads)
        seeds = _seeds(stack, model, cfg.engine_config(seed_threads), depths, prompt)
        print(f"{len(depths)} depths prefilled in {time.perf_counter() - t0:.0f} s; {a.blocks} blocks of {what} x "
              f"{len(depths)} depths x {a.rounds} rounds, {cfg.threads} threads", flush=True)
        return run_blocks(a.blocks, lambda b: one(model, ecfg, seeds, b, prompt), line, t0)


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="locate.py", description=__doc__.split("\n")[0])
    block_args(ap, blocks=20, rounds=20)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help="which, comma-separated (see the docstring); the first plain one is the null control's base")
    a = ap.parse_args(argv)
    if a.load:
        report(*pooled(a.load))
        return 0
    variants = check_variants(a.variants.split(","), UsageError, "--variants")
    cfg, path, info = setup(a, -(-(len(variants) + 1) // 2))  # every variant at every depth, and the seeds
    depths = [d for _, d in cfg.contexts]

    def line(x: tuple) -> str:
        return "rises, ms: " + ", ".join(f"{v} {(x[0][:, i, -1] - x[0][:, i, 0]).mean():+.2f}"
                                         for i, v in enumerate(variants))

    (wall, attn, slot), steal = measure(
        a, cfg, path, info, f"{len(variants)} variants",
        lambda model, ecfg, seeds, b, prompt: block(model, ecfg, seeds, variants, b, a.rounds, a.warmup, prompt),
        line, cfg.threads)
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
