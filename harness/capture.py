"""Per-op timing of one decode step through llama.cpp's scheduler eval callback (``cb_eval``).

The scheduler calls the callback twice per node it may stop at: once to *ask* whether we want
the node (for every node, in order), and once to *observe* it after computing up to it and
synchronising. A segment's time is the time between two observations; the first starts at the
first ask of the step. Wall time of the decode call minus the covered span is host work.

Modes:
- ``stages``: ask only at the last node of each run of same-stage nodes (a few hundred syncs).
- ``ops``: ask at every node (thousands of syncs): a full per-op table, at a higher overhead.

The ask phase does no Python work beyond a list lookup: the node -> ask table is built once
per graph from a discovery step that reads every node's name, op and first source.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

from harness import stages
from harness.engine import Context, EvalCallback, GraphNode, NativeHook, read_node
from harness.errors import EngineError

log = logging.getLogger(__name__)
MODES = ("stages", "ops")


@dataclass(frozen=True)
class Segment:
    node_first: int
    node_last: int
    time_ns: int


@dataclass(frozen=True)
class StepProfile:
    wall_ns: int
    host_ns: int
    segments: tuple[Segment, ...]

    @property
    def n_splits(self) -> int:
        return len(self.segments)


class Capture:
    """Owns the eval callback of one context and turns its calls into timed segments.

    ``native`` (default when a C compiler is available) uses engine.NativeHook: no Python runs per
    node while timing. Otherwise a Python ctypes callback does the same bookkeeping.
    """

    def __init__(self, mode: str = "stages", native: bool | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown capture mode {mode!r}")
        self.mode = mode
        self.nodes: list[GraphNode] = []
        self.stages: list[str] = []
        self.layers: list[int] = []
        self._ask: list[bool] = []
        self._discovering = False
        self._found: list[GraphNode] = []
        self._i = 0
        self._t_first = 0
        self._marks: list[tuple[int, int]] = []
        self._generation = 0  # bumped by every discovery
        self._py_callback = EvalCallback(self._cb)
        use_native = NativeHook.available() if native is None else native
        self.hook = NativeHook(self._py_callback) if use_native else None
        self.callback = self.hook.callback if self.hook else self._py_callback
        self.user_data = self.hook.user_data if self.hook else None
        self.backend = "native" if self.hook else "python"

    # The callback runs on llama.cpp's thread, in the middle of graph compute: keep it tiny and
    # never let an exception escape (ctypes would print it and return False, aborting compute).
    def _cb(self, t, ask, _user_data):
        if ask:
            i = self._i
            self._i = i + 1
            if i == 0:
                self._t_first = time.perf_counter_ns()
            if self._discovering:
                try:
                    self._found.append(read_node(t))
                except Exception:  # noqa: BLE001 - must not raise into C
                    self._found.append(GraphNode("?", "?", "", ""))
                return False
            return self._ask[i] if i < len(self._ask) else True
        self._marks.append((self._i - 1, time.perf_counter_ns()))
        return True

    def _reset(self, discovering: bool) -> None:
        self._i = 0
        self._marks = []
        self._discovering = discovering
        if self.hook:
            self.hook.reset(discovering)

    def discover(self, ctx: Context, token: int) -> int:
        """Decode one untimed token reading every node; build the stage and ask tables."""
        self._found = []
        self._reset(discovering=True)
        try:
            ctx.step(token)
        finally:
            self._reset(discovering=False)
        self.nodes = self._found
        self._generation += 1
        triples = [(n.name, n.op, n.src0) for n in self.nodes]
        self.stages = stages.classify_graph(triples)
        self.layers = stages.classify_layers(triples)
        n = len(self.nodes)
        self._ask = self._ask_table()
        if self.hook:
            self.hook.set_ask(self._ask)
        log.debug("graph: %d nodes, %d boundaries asked per token (%s callback)", n, sum(self._ask), self.backend)
        return n

    def _ask_table(self) -> list[bool]:
        n = len(self.nodes)
        if self.mode == "ops":
            return [True] * n
        return [i == n - 1 or self.stages[i] != self.stages[i + 1] for i in range(n)]

    def calibrate(self, ctx: Context, token: int, steps: int = 3) -> float:
        """Per-sync cost in ns: the median time of segments that hold one no-op node (a view,
        reshape, permute or transpose computes nothing, so its time is the ask/observe round trip
        and the scheduler sync). Measured with every node asked, then the ask table is restored."""
        saved, generation = self._ask, self._generation
        self._ask = [True] * len(self.nodes)
        if self.hook:
            self.hook.set_ask(self._ask)
        noop = {i for i, n in enumerate(self.nodes) if n.op in stages.NOOP_OPS}
        times: list[int] = []
        try:
            for _ in range(steps):
                p = self.step(ctx, token)
                times += [g.time_ns for g in p.segments if g.node_first == g.node_last and g.node_last in noop]
        finally:
            if self._generation == generation:
                self._ask = saved
            else:  # the graph changed and was rediscovered meanwhile: rebuild for the new graph
                self._ask = self._ask_table()
            if self.hook:
                self.hook.set_ask(self._ask)
        return float(statistics.median(times)) if times else 0.0

    @property
    def syncs_per_token(self) -> int:
        return sum(self._ask)

    def with_extra_splits(self, k: int) -> list[bool]:
        """The ask table plus up to k more asked nodes, spread evenly over the nodes not already asked."""
        free = [i for i, a in enumerate(self._ask) if not a]
        k = min(k, len(free))
        ask = list(self._ask)
        for j in range(k):
            ask[free[j * len(free) // k]] = True
        return ask

    def step(self, ctx: Context, token: int, extra_splits: int = 0) -> StepProfile:
        """Decode one timed token (rolled back afterwards), with ``extra_splits`` more graph splits than the
        ask table. Rediscovers if the graph changed."""
        if extra_splits:
            saved = self._ask
            self._ask = self.with_extra_splits(extra_splits)
            if self.hook:
                self.hook.set_ask(self._ask)
            try:
                return self.step(ctx, token)
            finally:
                self._ask = saved
                if self.hook:
                    self.hook.set_ask(self._ask)
        for _attempt in range(2):
            self._reset(discovering=False)
            wall = ctx.step(token)
            if self.hook:
                seen, marks, t_first = self.hook.n_seen, self.hook.marks(), self.hook.t_first
            else:
                seen, marks, t_first = self._i, self._marks, self._t_first
            if seen == len(self.nodes) and marks:
                break
            log.info("decode graph changed (%d nodes, expected %d): rediscovering", seen, len(self.nodes))
            self.discover(ctx, token)
        else:
            raise EngineError("the decode graph changes from step to step; cannot time it")
        segs = []
        prev_node, prev_t = -1, t_first
        for node, t in marks:
            segs.append(Segment(prev_node + 1, node, t - prev_t))
            prev_node, prev_t = node, t
        covered = prev_t - t_first
        return StepProfile(wall_ns=wall, host_ns=max(0, wall - covered), segments=tuple(segs))
