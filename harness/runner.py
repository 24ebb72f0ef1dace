"""The measurement loop: every requested depth resident at once, measured round-robin.

1. ``prepare``: for each depth (ascending) a plain context (no callback: the engine's own ms/token)
   and a profiled context (eval callback). The plain context of a depth starts from a copy of the
   previous depth's cache and prefills only the new tokens, so prefill costs max(L) tokens; then its
   state is saved and restored into itself and into the profiled context, so both hold the same
   cells (a restored sliding cache keeps only the window). Then graph discovery (stages, graph
   bytes) and warm-up.
2. ``measure``: each round decodes one token at every depth, plain and profiled, in an order that
   rotates from round to round (and alternates which pass goes first), so drift hits every depth
   alike; one depth per round (rotating) also decodes a calibration token with extra graph splits.
   Every token is decoded at exactly depth L and rolled back. A round is kept whole or not at all. A
   calibration token that asks every node is an ops-mode token: its segments are kept summed per stage, to
   compare the two modes paired by round (``stats.mode_diff``).

Stops cleanly between tokens when a stop is requested (SIGINT/SIGTERM).
"""

from __future__ import annotations

import logging
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

from harness import columns, device, graph_bytes, stages
from harness.capture import Capture
from harness.engine import Context, EngineConfig, Model

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGINT/SIGTERM while installed; the loop polls it between tokens."""

    def __init__(self):
        self.reason: str | None = None
        self._old: dict = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, _frame) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name
            log.warning("%s received: stopping at the next token boundary", self.reason)

    def __bool__(self) -> bool:
        return self.reason is not None


@dataclass
class Resident:
    """One resident depth: its plain and profiled contexts and what preparing it measured."""

    label: str
    depth: int
    plain: Context
    prof: Context
    cap: Capture
    prefill_s: float = 0.0
    n_nodes: int = 0
    noop_sync_us: float = 0.0
    sensors_before: dict = field(default_factory=dict)
    graph_bytes: dict | None = None  # harness.graph_bytes.GraphBytes.to_dict() of this depth's decode graph


@dataclass
class Measured:
    """Rows of completed rounds: op rows (columns.OP_COLUMNS), token rows (columns.TOKEN_COLUMNS), noise."""

    op_rows: list = field(default_factory=list)
    token_rows: list = field(default_factory=list)
    noise: list = field(default_factory=list)  # dicts of record.RoundNoise fields
    calib_rows: list = field(default_factory=list)  # calibration tokens per stage (columns.CALIB_STAGE_COLUMNS)
    rounds_done: int = 0


def prepare(stack: ExitStack, model: Model, cfg: EngineConfig, contexts: list[tuple[str, int]], prompt: list[int],
            mode: str, warmup: int, stop: StopFlag, progress=None) -> list[Resident] | None:
    """Build every resident depth; None if a stop was requested meanwhile. ``progress.update(n)`` gets
    prefilled token counts."""
    out: list[Resident] = []
    tok = prompt[-1]
    for label, depth in contexts:
        sensors = device.sample_sensors()
        plain = stack.enter_context(Context(model, cfg))
        prefill_s = grow(plain, out[-1].plain if out else None, prompt, depth, stop, progress)
        if prefill_s is None:
            return None
        cap = Capture(mode)
        prof = stack.enter_context(Context(model, cfg, cap.callback, cap.user_data))
        prof.copy_state_from(plain)
        n_nodes = cap.discover(prof, tok)
        gb = graph_bytes.from_capture(cap.nodes, cap.stages, cap.layers)  # None while nodes carry names only
        noop_us = cap.calibrate(prof, tok) / 1000.0
        for _ in range(warmup):
            plain.step(tok)
            cap.step(prof, tok)
        out.append(Resident(label, depth, plain, prof, cap, prefill_s, n_nodes, noop_us, sensors,
                            gb.to_dict() if gb else None))
        log.debug("depth %d resident: prefill %.1f s, %d nodes, %d syncs/token", depth, prefill_s, n_nodes,
                  cap.syncs_per_token)
    return out


def grow(ctx: Context, prev: Context | None, prompt: list[int], depth: int, stop: StopFlag | None = None,
         progress=None) -> float | None:
    """Bring a fresh context to ``depth``: a copy of ``prev``'s cache (when given), the rest of ``prompt`` up to
    ``depth`` prefilled in n_batch chunks, then its state restored into itself (a restored state: sliding caches keep
    only the window, as every context copied from it gets). Seconds spent prefilling; None when ``stop`` was set
    between chunks. ``progress.update(n)`` gets prefilled token counts."""
    if prev is not None:
        ctx.copy_state_from(prev)
    t0 = time.perf_counter()
    new = prompt[ctx.n_past:depth]
    for i in range(0, len(new), ctx.cfg.n_batch):
        if stop:
            return None
        ctx.prefill(new[i:i + ctx.cfg.n_batch])
        if progress is not None:
            progress.update(len(new[i:i + ctx.cfg.n_batch]))
    prefill_s = time.perf_counter() - t0
    ctx.copy_state_from(ctx)
    return prefill_s


def round_order(n: int, r: int) -> list[int]:
    """Indices of the n depths in round r's order: a row of a balanced Latin square (Williams), so that over a cycle
    (n rows for even n; 2n, the square and its mirror, for odd n) every depth takes every slot equally often and
    follows every other depth equally often. Each row serves two rounds in a row (plain first in one, profiled first
    in the other). A rotation reversed on odd rounds, used before, kept each depth in slots of one parity when n was
    even (n = 2: one order for every round; bench/NOTES.md §20)."""
    base, lo, hi = [0], 1, n - 1
    while len(base) < n:  # 0, 1, n-1, 2, n-2, ...
        base.append(lo)
        lo += 1
        if len(base) < n:
            base.append(hi)
            hi -= 1
    k = (r // 2) % (n if n % 2 == 0 else 2 * n)
    row = [(b + (k if n % 2 == 0 else k // 2)) % n for b in base]
    return row[::-1] if n % 2 and k % 2 else row


def _profiled(res: Resident, r: int, tok: int, ops: list, toks: list) -> None:
    p = res.cap.step(res.prof, tok)
    toks.append((res.label, res.depth, r, columns.PROFILED, p.n_splits, p.wall_ns / 1000.0))
    for seg in p.segments:
        node = res.cap.nodes[seg.node_last]
        ops.append((res.label, res.depth, r, seg.node_first, seg.node_last, node.name, res.cap.layers[seg.node_last],
                    node.op, res.cap.stages[seg.node_last], seg.time_ns / 1000.0))
    ops.append((res.label, res.depth, r, -1, -1, "host", -1, "HOST", stages.HOST, p.host_ns / 1000.0))


def _per_stage(res: Resident, r: int, p) -> list:
    """A token's segments summed per stage (host as its own row), as columns.CALIB_STAGE_COLUMNS rows."""
    time_us: dict[str, float] = {}
    segs: dict[str, int] = {}
    for seg in p.segments:
        s = res.cap.stages[seg.node_last]
        time_us[s] = time_us.get(s, 0.0) + seg.time_ns / 1000.0
        segs[s] = segs.get(s, 0) + 1
    rows = [(res.label, res.depth, r, s, segs[s], t) for s, t in time_us.items()]
    return rows + [(res.label, res.depth, r, stages.HOST, 0, p.host_ns / 1000.0)]


def measure(residents: list[Resident], rounds: range, calib_splits: int, tok: int, stop: StopFlag,
            progress=None, m: Measured | None = None) -> Measured:
    """Run the rounds into ``m`` (a new Measured by default); a round interrupted by a stop or an error is dropped
    whole, and the rounds completed before an error stay in ``m``."""
    m = Measured() if m is None else m
    n = len(residents)
    for r in rounds:
        before = device.cpu_counters()
        ops: list = []
        toks: list = []
        calib: list = []
        order = round_order(n, r)
        for j in order:
            if stop:
                return m
            res = residents[j]
            plain_first = r % 2 == 0
            if plain_first:
                toks.append((res.label, res.depth, r, columns.PLAIN, 0, res.plain.step(tok) / 1000.0))
            _profiled(res, r, tok, ops, toks)
            if not plain_first:
                toks.append((res.label, res.depth, r, columns.PLAIN, 0, res.plain.step(tok) / 1000.0))
        if calib_splits and not stop:  # after every timed token of the round: none of them follows it (§20)
            res = residents[r % n]
            p = res.cap.step(res.prof, tok, extra_splits=calib_splits)
            toks.append((res.label, res.depth, r, columns.CALIBRATION, p.n_splits, p.wall_ns / 1000.0))
            if p.n_splits == len(res.cap.nodes) > res.cap.syncs_per_token:  # every node asked, more than the mode
                calib = _per_stage(res, r, p)  # asks: an ops-mode token, compared with the round's stages token
        noise = device.noise_between(before, device.cpu_counters())
        sensors = device.sample_sensors()
        m.op_rows += ops
        m.token_rows += toks
        m.calib_rows += calib
        m.noise.append({"round": r, "order": [residents[j].depth for j in order], **noise,
                        "cpu_mhz": sensors["cpu_mhz"], "temp_c": sensors["temp_c"]})
        m.rounds_done += 1
        if progress is not None:
            progress.update(1)
    return m
