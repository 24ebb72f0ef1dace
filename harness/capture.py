"""Per-op timing of one decode step through llama.cpp's scheduler eval callback (``cb_eval``).

The scheduler calls the callback twice per node it may stop at: once to *ask* whether we want
the node (for every node, in order), and once to *observe* it after computing up to it and
synchronising. A segment's time is the time between two observations; the first starts at the
first ask of the step. Wall time of the decode call minus the covered span is host work.

Modes:
- ``stages``: ask only at the last node of each run of same-stage nodes (a few hundred syncs).
- ``ops``: ask at every node (thousands of syncs): a full per-op table, at a higher overhead.

``asks`` (a rule from the nodes' stages to the ask table) replaces the mode's table, for experiments on
where the capture's cost lands (``bench/locate.py``); the last node must be asked. ``rules`` names more such rules,
and ``step(..., rule=NAME)`` times one token with that table instead, so one context can alternate tables token by
token (``bench/within.py``).

The ask phase runs no Python with the native hook (a table lookup in C; ``harness.hook``): the
node -> ask table is built once per graph from a discovery step that reads every node
(``engine.read_node``). ``step(..., extra_splits=k)`` asks k more nodes for sync-cost calibration.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from harness import stages
from harness.engine import Context, GraphNode, read_node
from harness.errors import EngineError
from harness.hook import make_hook

log = logging.getLogger(__name__)
MODES = ("stages", "ops")
_ALL = "all"  # ask-table key: every node asked (calibrate)


@dataclass(frozen=True)
class Segment:
    node_first: int
    node_last: int
    time_ns: int


@dataclass(frozen=True)
class StepProfile:
    """One timed decode step: wall time of the decode call, the part no segment covers (host),
    the segments in graph order, and ``n_splits``, the asked boundaries observed (one per segment:
    each is one scheduler sync and one more graph compute call)."""

    wall_ns: int
    host_ns: int
    segments: tuple[Segment, ...]
    n_splits: int = 0


class Capture:
    """Owns the eval callback of one context and turns its calls into timed segments.

    ``native`` (default: when a C compiler is available) picks ``hook.NativeHook``, which runs no
    Python per node while timing; otherwise ``hook.PythonHook``. Both have one interface.
    """

    def __init__(self, mode: str = "stages", native: bool | None = None,
                 asks: Callable[[list[str]], list[bool]] | None = None,
                 rules: dict[str, Callable[[list[str]], list[bool]]] | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown capture mode {mode!r}")
        if any(not isinstance(k, str) or k == _ALL for k in rules or {}):
            raise ValueError(f"rule names are strings other than {_ALL!r}, got {sorted(map(repr, rules))}")
        self.mode = mode
        self._asks = asks  # the nodes' stages -> the ask table, in place of the mode's (bench/locate.py)
        self._rules = dict(rules or {})  # more such rules, by name: step(rule=NAME) (bench/within.py)
        self.nodes: list[GraphNode] = []
        self.stages: list[str] = []
        self.layers: list[int] = []
        self._found: list[GraphNode] = []
        self._tables: dict[int | str, list[bool]] = {}  # ask tables of the current graph, by key
        self._active: int | str | None = None  # key of the table the hook holds
        self.hook = make_hook(self._on_node, native)
        self.callback, self.user_data, self.backend = self.hook.callback, self.hook.user_data, self.hook.backend

    def _on_node(self, t: int) -> None:
        try:
            self._found.append(read_node(t))
        except Exception:  # noqa: BLE001 - a node we cannot read still holds its place
            log.exception("could not read graph node %d", len(self._found))
            self._found.append(GraphNode("?", "?", "", ""))

    def discover(self, ctx: Context, token: int) -> int:
        """Decode one untimed token reading every node; build the stage and ask tables."""
        self._found = []
        self.hook.reset(discovering=True)
        try:
            ctx.step(token)
        finally:
            self.hook.reset(discovering=False)
        self.nodes, self._found = self._found, []
        triples = [(n.name, n.op, n.src0) for n in self.nodes]
        self.stages = stages.classify_graph(triples)
        self.layers = stages.classify_layers(triples)
        n = len(self.nodes)
        base = self._checked(self._asks) if self._asks else [True] * n if self.mode == "ops" else \
            [i == n - 1 or self.stages[i] != self.stages[i + 1] for i in range(n)]
        self._tables, self._active = {0: base}, None
        for name in self._rules:
            self._tables[name] = self._checked(self._rules[name])
        log.debug("graph: %d nodes, %d boundaries asked per token (%s callback)", n, sum(base), self.backend)
        return n

    def _checked(self, rule: Callable[[list[str]], list[bool]]) -> list[bool]:
        n, ask = len(self.stages), list(rule(self.stages))
        if len(ask) != n or (n and not ask[-1]):
            raise ValueError(f"an ask table must have one entry per node ({n}) and ask the last one")
        return ask

    def _table(self, key: int | str) -> list[bool]:
        if key not in self._tables:
            self._tables[key] = [True] * len(self.nodes) if key == _ALL else self._with_extra(key)
        return self._tables[key]

    def _with_extra(self, k: int) -> list[bool]:
        """The base table plus k asks on nodes it does not ask, spread evenly through the graph.

        Each extra ask splits one segment in two inside a run of one stage (the base table asks
        the last node of every run), so both halves keep the stage of their last node. Nodes that
        compute something are preferred over no-op views. Deterministic: same graph and k, same
        nodes. At most as many as there are unasked nodes (none in ops mode). With an ``asks`` rule whose
        boundaries are not stage changes, a segment may hold several stages; it is named by its last node's."""
        ask = list(self._tables[0])
        free = [i for i, a in enumerate(ask) if not a]
        real = [i for i in free if self.nodes[i].op not in stages.NOOP_OPS]
        pool = real if len(real) >= k else free
        k = min(k, len(pool))
        if k < len(pool) and k > 0:
            pool = [pool[(2 * j + 1) * len(pool) // (2 * k)] for j in range(k)]
        for i in pool[:k]:
            ask[i] = True
        return ask

    def calibrate(self, ctx: Context, token: int, steps: int = 3) -> float:
        """Per-sync cost in ns: the median time of segments that hold one no-op node (a view,
        reshape, permute or transpose computes nothing, so its time is the ask/observe round trip
        and the scheduler sync), measured with every node asked."""
        times: list[int] = []
        for _ in range(steps):
            p = self._profile(ctx, token, _ALL)
            noop = {i for i, n in enumerate(self.nodes) if n.op in stages.NOOP_OPS}
            times += [g.time_ns for g in p.segments if g.node_first == g.node_last and g.node_last in noop]
        return float(statistics.median(times)) if times else 0.0

    @property
    def syncs_per_token(self) -> int:
        return sum(self._tables.get(0, ()))

    def step(self, ctx: Context, token: int, extra_splits: int = 0, rule: str | None = None) -> StepProfile:
        """Decode one timed token (rolled back afterwards); rediscovers if the graph changed.

        ``extra_splits=k`` asks k more nodes than the mode does (see ``_with_extra``), to measure what one split
        costs from the wall time; ``n_splits`` of the result counts them. ``rule=NAME`` asks the table of that
        rule (``rules``) instead of the mode's."""
        if extra_splits < 0:
            raise ValueError(f"extra_splits must be >= 0, got {extra_splits}")
        if rule is not None and (rule not in self._rules or extra_splits):
            raise ValueError(f"rule must be one of {sorted(self._rules)} and comes without extra_splits, got {rule!r}")
        return self._profile(ctx, token, extra_splits if rule is None else rule)

    def _profile(self, ctx: Context, token: int, key: int | str) -> StepProfile:
        for _attempt in range(2):
            if self._active != key:
                self.hook.set_ask(self._table(key))
                self._active = key
            self.hook.reset(discovering=False)
            wall = ctx.step(token)
            marks = self.hook.marks()
            if self.hook.n_seen == len(self.nodes) and marks:
                break
            log.info("decode graph changed (%d nodes, expected %d): rediscovering", self.hook.n_seen, len(self.nodes))
            self.discover(ctx, token)
        else:
            raise EngineError("the decode graph changes from step to step; cannot time it")
        t_first = self.hook.t_first
        segs = []
        prev_node, prev_t = -1, t_first
        for node, t in marks:
            segs.append(Segment(prev_node + 1, node, t - prev_t))
            prev_node, prev_t = node, t
        covered = prev_t - t_first
        return StepProfile(wall_ns=wall, host_ns=max(0, wall - covered), segments=tuple(segs), n_splits=len(segs))
