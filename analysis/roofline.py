"""Achieved GB/s and the roofline: the one place their arithmetic and units live.

Units: bytes, milliseconds per token, and GB/s = 10^9 bytes/s (the unit of the bandwidth probe,
``RunRecord.bandwidth_gbps``).

- achieved GB/s of a stage = bytes it reads per token / its measured ms per token;
- roofline ms/token = bytes read per token / the device's measured read bandwidth;
- x roofline = measured ms / roofline ms.

Bytes per token are the run's graph bytes when it has them (``graph_bytes`` in each context
summary: weight and KV bytes the decode graph read and KV bytes it stored at that depth,
``harness.graph_bytes``), else the read model's (``analysis.readmodel``). Anything missing gives NaN, never an error.
"""

from __future__ import annotations

import math

from harness.record import ContextSummary

GB = 1e9
NAN = float("nan")
GRAPH, MODEL = "graph", "model"


def _ok(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def gbps(nbytes: float | None, ms: float | None) -> float:
    """Achieved GB/s: ``nbytes`` read in ``ms`` milliseconds."""
    if not (_ok(nbytes) and _ok(ms)) or ms <= 0:
        return NAN
    return nbytes / (ms * 1e-3) / GB


def roofline_ms(nbytes: float | None, bw_gbps: float | None) -> float:
    """ms/token to read ``nbytes`` at ``bw_gbps``."""
    if not (_ok(nbytes) and _ok(bw_gbps)) or bw_gbps <= 0 or nbytes <= 0:
        return NAN
    return nbytes / (bw_gbps * GB) * 1e3


def x_roofline(measured_ms: float | None, nbytes: float | None, bw_gbps: float | None) -> float:
    """Measured ms over roofline ms (1.0 = at the device's read bandwidth)."""
    roof = roofline_ms(nbytes, bw_gbps)
    return measured_ms / roof if _ok(measured_ms) and _ok(roof) and roof > 0 else NAN


def graph_bytes_per_token(context: ContextSummary) -> dict[str, float] | None:
    """Stage -> weight + KV read + KV written bytes per token that the graph of one context summary
    shows (``GraphBytes.per_token``); None when the run stored no graph bytes."""
    gb = context.graph_bytes
    if not gb:
        return None
    return {s: float(gb["weight"].get(s, 0)) + float(gb["kv"].get(s, 0)) + float(gb["kv_written"].get(s, 0))
            for s in gb["weight"]}


def context_bytes(context: ContextSummary, model=None) -> tuple[dict[str, float], str]:
    """(stage -> bytes read per token, source) for one context: ``graph`` bytes when the run stored
    them, else the read model's (``model``, an ``analysis.readmodel.ReadModel``); ({}, "") when neither."""
    graph = graph_bytes_per_token(context)
    if graph is not None:
        return graph, GRAPH
    if model is not None and context.depth >= 0:
        return model.bytes_per_token(context.depth), MODEL
    return {}, ""


def faster_than_probe(contexts, bw_gbps: float | None, model=None,
                      min_share_pct: float = 5.0) -> tuple[str, str, float] | None:
    """(context, stage, GB/s) of the fastest stage holding >= ``min_share_pct`` of decode (calibrated ms, the bytes
    of ``context_bytes``) when it read faster than the device's measured bandwidth: the probe is then no roofline,
    since a memory-bound probe cannot be slower than the engine. None otherwise, or without a probe."""
    if not _ok(bw_gbps):
        return None
    rates = [(c.context, s, gbps(b, c.stage(s))) for c in contexts for s, b in context_bytes(c, model)[0].items()
             if c.share(s) >= min_share_pct]
    best = max((r for r in rates if _ok(r[2])), key=lambda r: r[2], default=None)
    return best if best is not None and best[2] > bw_gbps else None
