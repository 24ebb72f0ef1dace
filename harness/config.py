"""The sweep's configuration: one frozen record, built from argv or from a stored run (``--resume``).

Settings that llama-bench takes as lists (threads, flash attention, KV cache types, GPU layers,
ubatch size) take comma lists here too; ``expand`` gives the product, one config (one run) each.
A resume conflict is the difference between the config the user typed and the stored one.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from harness.engine import CACHE_TYPES, FLASH_ATTN, EngineConfig
from harness.errors import UsageError
from harness.record import ContextSpec, RunRecord
from harness.store import LAYOUTS

NAMED_CONTEXTS = {"short": 13, "medium": 172, "long": 658}
DEFAULT_CONTEXTS = "short,medium,long"
MODES = ("stages", "ops")
CALIB_ALL = 1 << 20  # extra splits of a calibration token: as many as the graph allows (every node asked)
# settings that take comma lists, as in llama-bench: config field -> its flag
LIST_SETTINGS = {"threads": "--threads", "flash_attn": "--flash-attn", "cache_type_k": "--cache-type-k",
                 "cache_type_v": "--cache-type-v", "n_gpu_layers": "--n-gpu-layers", "n_ubatch": "--ubatch-size"}
LIST_CASTS = {"threads": int, "flash_attn": str, "cache_type_k": str, "cache_type_v": str, "n_gpu_layers": int,
              "n_ubatch": int}  # config field -> parser of one list item


def parse_contexts(spec: str) -> tuple[tuple[str, int], ...]:
    """'short,172,4096' -> (('short', 13), ('172', 172), ('4096', 4096)), sorted by depth."""
    out = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part in NAMED_CONTEXTS:
            out[part] = NAMED_CONTEXTS[part]
            continue
        try:
            n = int(part)
        except ValueError:
            raise UsageError(f"context {part!r} is neither a number nor one of {', '.join(NAMED_CONTEXTS)}") from None
        if n <= 0:
            raise UsageError(f"context must be > 0, got {n}")
        out[next((k for k, v in NAMED_CONTEXTS.items() if v == n), str(n))] = n
    if not out:
        raise UsageError("no contexts given")
    return tuple(sorted(out.items(), key=lambda kv: kv[1]))


@dataclass(frozen=True)
class SweepConfig:
    """One run's settings. ``threads`` None: the physical core count, resolved at run time."""

    contexts: tuple[tuple[str, int], ...] = parse_contexts(DEFAULT_CONTEXTS)
    model: str | None = None  # None: the default synthetic twin, made if missing
    rounds: int = 40
    warmup: int = 2
    threads: int | None = None
    flash_attn: str = EngineConfig.flash_attn  # engine settings default as the engine's own config does
    cache_type_k: str = EngineConfig.cache_type_k
    cache_type_v: str = EngineConfig.cache_type_v
    n_gpu_layers: int = EngineConfig.n_gpu_layers
    n_batch: int = EngineConfig.n_batch
    n_ubatch: int = EngineConfig.n_ubatch
    mode: str = "stages"
    calib_splits: int = CALIB_ALL
    out: str = "runs"
    layout: str = "flat"
    label: str | None = None
    probe: bool = True
    force: bool = False

    @property
    def max_depth(self) -> int:
        return self.contexts[-1][1]

    @property
    def n_ctx(self) -> int:
        return self.max_depth + 1  # every timed token sits at depth L and is rolled back

    def validate(self) -> SweepConfig:
        for name in ("rounds",):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "calib_splits", "n_gpu_layers"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.mode not in MODES:
            raise UsageError(f"unknown mode {self.mode!r} ({' or '.join(MODES)})")
        if self.layout not in LAYOUTS:
            raise UsageError(f"unknown layout {self.layout!r} (choose from: {', '.join(LAYOUTS)})")
        self.engine_config(1 if self.threads is None else self.threads).validate()  # 0 is refused, not defaulted
        return self

    def engine_config(self, threads: int) -> EngineConfig:
        return EngineConfig(threads=threads, n_ctx=self.n_ctx, flash_attn=self.flash_attn,
                            cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v,
                            n_gpu_layers=self.n_gpu_layers, n_batch=self.n_batch, n_ubatch=self.n_ubatch)

    def replace(self, **changes) -> SweepConfig:
        return dataclasses.replace(self, **changes)

    def differences(self, other: SweepConfig, fields: tuple[str, ...] | None = None) -> dict[str, tuple]:
        """{field: (mine, theirs)} for every field (of ``fields``) where the two configs differ."""
        names = tuple(f.name for f in dataclasses.fields(self)) if fields is None else fields
        return {n: (getattr(self, n), getattr(other, n)) for n in names if getattr(self, n) != getattr(other, n)}

    def context_specs(self) -> tuple[ContextSpec, ...]:
        return tuple(ContextSpec(label, depth) for label, depth in self.contexts)

    @classmethod
    def from_record(cls, run: RunRecord) -> SweepConfig:
        """The config a stored run was made with (for --resume)."""
        p = run.params
        return cls(contexts=tuple((c.label, c.depth) for c in p.contexts), model=run.model.path or None,
                   rounds=p.rounds, warmup=p.warmup, threads=p.threads, flash_attn=p.flash_attn,
                   cache_type_k=p.cache_type_k, cache_type_v=p.cache_type_v, n_gpu_layers=p.n_gpu_layers,
                   n_batch=p.n_batch, n_ubatch=p.n_ubatch, mode=p.mode, calib_splits=p.calib_splits,
                   label=run.label)


def split_list(spec: str, what: str, cast=str) -> list:
    items = [x.strip() for x in str(spec).split(",") if x.strip()]
    if not items:
        raise UsageError(f"{what}: empty list")
    try:
        return [cast(x) for x in items]
    except ValueError:
        raise UsageError(f"{what} must be {cast.__name__}s, got {spec!r}") from None


def expand(base: SweepConfig, lists: dict[str, list]) -> list[SweepConfig]:
    """The product of list-valued settings, one config each, validated (llama-bench order: as given)."""
    for key, values in lists.items():
        if key not in LIST_SETTINGS:
            raise ValueError(key)
        if key == "flash_attn":
            bad, ok = [v for v in values if v not in FLASH_ATTN], ", ".join(FLASH_ATTN)
        elif key.startswith("cache_type"):
            bad, ok = [v for v in values if v not in CACHE_TYPES], ", ".join(CACHE_TYPES)
        else:
            least = 0 if key == "n_gpu_layers" else 1
            bad, ok = [v for v in values if v < least], f"integers >= {least}"
        if bad:
            raise UsageError(f"bad {LIST_SETTINGS[key]} value(s): {', '.join(map(str, bad))} (choose from: {ok})")
    keys = list(lists)
    return [base.replace(**dict(zip(keys, combo, strict=True))).validate()
            for combo in itertools.product(*(lists[k] for k in keys))]
