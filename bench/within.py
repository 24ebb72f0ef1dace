"""Does the capture cost more at depth in one and the same context? (bench/NOTES.md §32)

    python bench/within.py [--model GGUF] [--depths 13,4096] [--blocks 24] [--rounds 60] [--threads N] [--tables T,..]
    python bench/within.py --load bench/results/within-*.json      # saved figures again, blocks pooled

§31 (``locate.py``) held each variant in its own context, and two identical plain contexts differed by about the size
of the effect it looked for. Here one context per depth carries one eval callback whose ask table changes from token
to token (``Capture(rules=)``, ``step(rule=)``), so every table meets the same context, memory and offset:

- ``last``, ``last2``: ask only the graph's last node: no split, the graph is computed in one piece as a plain
  context's is (the callback still sees every node); ``last2`` is the null control, ``last`` the reference;
- ``stages``: the sweep's profiled table (a boundary at every change of stage);
- ``attn``: boundaries only where the attention over the KV cache (attn_kv) starts and ends.

A table's rise from the shallowest depth to the deepest minus ``last``'s is what its splits add at depth, with no
context's own offset in it; ``last2`` minus ``last`` can differ only by where in the round it sits. A *block* creates
the contexts afresh from one prefilled seed per depth and runs ``--rounds`` rounds: the tables in ``round_order``, a
table's depths back to back, deeper first in half the rounds (every table takes every slot and both depth orders alike
over whole cycles: 4 rounds for 2 tables, 12 for 3, 8 for 4). Per block and table the figure is the mean over rounds
(and, beside it, the 20 % trimmed mean: a token's noise is heavy-tailed) of the round's rise minus ``last``'s. The
host time (wall minus what the segments cover: input set-up such as the attention masks, and the decode call's own
work) is kept too, and its rise printed, since "the rest" of a token includes it. Means over blocks carry a standard
error and a 95 % bootstrap interval over blocks. Nothing is asserted; the figures are saved as JSON in bench/results/
(on Ctrl-C, the blocks done so far).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from across import save_results  # noqa: E402
from locate import (  # noqa: E402
    _around_attention,
    _last_only,
    _round_keys,
    attn_kv_ms,
    block_args,
    measure,
    setup,
    steal_share,
)
from within_stats import (  # noqa: E402
    REFERENCE,
    SPLIT_AROUND_ATTENTION,
    TABLES,
    check_tables,
    figures,
    pooled,
    report,
)

from harness import device  # noqa: E402
from harness.capture import Capture  # noqa: E402
from harness.cli import ArgParser, run_cli  # noqa: E402
from harness.engine import Context, Model  # noqa: E402
from harness.errors import UsageError  # noqa: E402

RULES = {"last": _last_only, "last2": _last_only, "attn": _around_attention}  # stages: the capture's own table
assert set(RULES) | {"stages"} == set(TABLES)


def block(model: Model, ecfg, seeds: list[Context], tables: list[str], b: int, rounds: int, warmup: int,
          tok: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One block: (rounds, tables, depths) wall ms, attn_kv ms (NaN for a table that does not split around the
    attention) and host ms, and the steal share of the block's CPU time."""
    nt, nd = len(tables), len(seeds)
    wall, attn, host = (np.full((rounds, nt, nd), np.nan) for _ in range(3))
    rule = [None if t == "stages" else t for t in tables]
    with ExitStack() as stack:
        held: list[tuple[Context, Capture]] = []
        for seed in seeds:
            cap = Capture("stages", rules={t: RULES[t] for t in tables if t in RULES})
            c = stack.enter_context(Context(model, ecfg, cap.callback, cap.user_data))
            c.copy_state_from(seed)
            cap.discover(c, tok)
            for _ in range(warmup):
                for r in rule:
                    cap.step(c, tok, rule=r)
            held.append((c, cap))
        before = device.cpu_counters()
        for r in range(rounds):
            for i, j in _round_keys(nt, nd, b * rounds + r):
                c, cap = held[j]
                p = cap.step(c, tok, rule=rule[i])
                wall[r, i, j], host[r, i, j] = p.wall_ns / 1e6, p.host_ns / 1e6
                if tables[i] in SPLIT_AROUND_ATTENTION:
                    attn[r, i, j] = attn_kv_ms(cap, p)
        steal = steal_share(before)
    return wall, attn, host, steal


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="within.py", description=__doc__.split("\n")[0])
    block_args(ap, blocks=24, rounds=60)
    ap.add_argument("--tables", default="last,last2,stages",
                    help=f"which ask tables, comma-separated, from {', '.join(TABLES)}; {REFERENCE} among them")
    a = ap.parse_args(argv)
    if a.load:
        report(*pooled(a.load))
        return 0
    tables = check_tables(a.tables.split(","), UsageError, "--tables")
    cfg, path, info = setup(a, 2)  # the seeds and one block's contexts
    depths, ref = [d for _, d in cfg.contexts], tables.index(REFERENCE)

    def line(x: tuple) -> str:
        rise = x[0][:, :, -1] - x[0][:, :, 0]
        ex = ", ".join(f"{t} {(rise[:, i] - rise[:, ref]).mean():+.2f}" for i, t in enumerate(tables) if i != ref)
        return f"rise of {REFERENCE} {rise[:, ref].mean():+.2f} ms; minus it: {ex}"

    (wall, attn, host), steal = measure(
        a, cfg, path, info, f"{len(tables)} tables",
        lambda model, ecfg, seeds, b, prompt: block(model, ecfg, seeds, tables, b, a.rounds, a.warmup, prompt[-1]),
        line, device.physical_cores())  # the seeds with all cores: they are only copied
    f = figures(wall, attn, tables, host)
    report(f, depths, steal)
    save_results("within", {"args": vars(a), "tables": tables, "depths": depths, "threads": cfg.threads,
                            "model": str(path), "synthetic": info.synthetic, "steal": steal, **f,
                            "wall_ms": wall.tolist(), "attn_ms": attn.tolist(), "host_ms": host.tolist()})
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("within.py", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
