"""The measurement loop of one context: prefill, discovery, warm-up, interleaved timed tokens.

Stops cleanly at the next token boundary when a stop is requested (SIGINT/SIGTERM): the
context in progress is then dropped, so a run only ever holds whole contexts.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass

import pandas as pd
from tqdm import tqdm

from harness import columns, device, graph_bytes, stages, stats
from harness.capture import Capture
from harness.engine import Context

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


@dataclass(frozen=True)
class ContextResult:
    label: str
    depth: int
    op_rows: list  # tuples in columns.OP_COLUMNS order
    token_rows: list  # tuples in columns.TOKEN_COLUMNS order
    summary: dict


@dataclass(frozen=True)
class LoopSettings:
    tokens: int
    repeats: int
    warmup: int
    batch_size: int


def measure_context(plain: Context, prof: Context, cap: Capture, prompt: list[int], label: str, depth: int,
                    s: LoopSettings, stop: StopFlag) -> ContextResult | None:
    """Measure one context; None if a stop was requested before it completed."""
    sensors_before = device.sample_sensors()
    step_tok = prompt[-1]
    new = prompt[plain.n_past:depth]
    t0 = time.perf_counter()
    with tqdm(total=len(new), desc=f"prefill {label} ({depth})", unit="tok", leave=False, disable=None) as bar:
        for i in range(0, len(new), s.batch_size):
            if stop:
                return None
            plain.prefill(new[i:i + s.batch_size])
            bar.update(len(new[i:i + s.batch_size]))
    prefill_s = time.perf_counter() - t0
    if stop:
        return None
    prof.copy_state_from(plain)
    n_nodes = cap.discover(prof, step_tok)
    # [H2 graph bytes; lead: port to the typed run record] the resolved flash-attention state (a
    # FLASH_ATTN_EXT node in the graph) and the bytes the graph reads (None while nodes carry names only)
    fa_on = any(n.op == "FLASH_ATTN_EXT" for n in cap.nodes)
    gbytes = graph_bytes.from_capture(cap.nodes, cap.stages, cap.layers)
    sync_us = cap.calibrate(prof, step_tok) / 1000.0
    for _ in range(s.warmup):
        plain.step(step_tok)
        cap.step(prof, step_tok)
    rows: list[tuple] = []
    toks: list[tuple] = []
    for rep in range(s.repeats):
        for k in tqdm(range(s.tokens), desc=f"decode {label} rep {rep + 1}/{s.repeats}", unit="tok", leave=False,
                      disable=None):
            if stop:
                return None
            toks.append((label, plain.n_past, rep, k, "plain", plain.step(step_tok) / 1000.0))
            p = cap.step(prof, step_tok)
            toks.append((label, prof.n_past, rep, k, "profiled", p.wall_ns / 1000.0))
            for seg in p.segments:
                node = cap.nodes[seg.node_last]
                rows.append((label, prof.n_past, rep, k, seg.node_first, seg.node_last, node.name,
                             cap.layers[seg.node_last], node.op, cap.stages[seg.node_last], seg.time_ns / 1000.0))
            rows.append((label, prof.n_past, rep, k, -1, -1, "host", -1, "HOST", stages.HOST, p.host_ns / 1000.0))
    summ = stats.context_summary(pd.DataFrame(rows, columns=list(columns.OP_COLUMNS)),
                                  pd.DataFrame(toks, columns=list(columns.TOKEN_COLUMNS)), label, sync_us)
    summ.update(prefill_s=prefill_s, n_nodes=n_nodes, syncs_per_token=cap.syncs_per_token,
                sensors_before=sensors_before, sensors_after=device.sample_sensors(),
                flash_attn_on=fa_on, graph_bytes=gbytes.to_dict() if gbytes else None)  # [H2]
    log.info("%-6s depth %5d: plain %.2f ms/token, profiled x%.3f, ffn %.1f%%, attn_kv %.1f%%", label, depth,
             summ["plain_ms"], summ["overhead_ratio"], summ["stage_pct"]["ffn"], summ["stage_pct"]["attn_kv"])
    return ContextResult(label, depth, rows, toks, summ)
