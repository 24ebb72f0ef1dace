"""The run record: what one sweep stores, as typed, immutable records (one module, one place).

In the style of pyperf's ``Run``/``Benchmark``: frozen dataclasses with ``to_dict``/``from_dict``.
``from_dict`` validates every field against its annotation (presence, type, nested records), so a
run with valid JSON but a missing or mistyped field is refused with one line naming the field.
Units live in the field names (``_ms``, ``_us``, ``_s``, ``_bytes``, ``_gbps``, ``_pct``, ``_mhz``,
``_c``) and in ``UNITS``, which every run carries.

The format history and the upgrades of older runs are in ``harness.upgrades``."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.typed import Record

SCHEMA_VERSION = 3
UNITS = {"time_us": "microseconds", "wall_us": "microseconds", "*_ms": "milliseconds", "*_us": "microseconds",
         "*_s": "seconds", "*_bytes": "bytes", "*_gbps": "1e9 bytes per second", "*_pct": "percent",
         "*_pp": "percentage points", "*_mhz": "megahertz", "*_c": "degrees Celsius",
         "*_ci": "95 % interval [low, high] of the field it names"}


Interval = tuple[float, float]


@dataclass(frozen=True)
class ContextSpec(Record):
    label: str
    depth: int


@dataclass(frozen=True)
class SweepParams(Record):
    """What the sweep was asked to do, and the resolved settings it ran with."""

    contexts: tuple[ContextSpec, ...]
    rounds: int
    warmup: int
    threads: int
    flash_attn: str  # as requested: on, off or auto
    cache_type_k: str
    cache_type_v: str
    n_gpu_layers: int
    n_batch: int
    n_ubatch: int
    mode: str  # stages, ops (or recorded, for the reference run)
    n_ctx: int
    depth_control: str = "rollback"
    order: str = "round-robin"  # every round decodes each depth once (plain, profiled), rotating the order
    callback: str = "native"
    threads_source: str = "physical cores"
    calib_splits: int = 0  # extra graph splits of the calibration token (0: no calibration tokens)
    flash_attn_resolved: bool | None = None  # a FLASH_ATTN_EXT node is in the decode graph
    openmp: bool | None = None
    threadpool: bool | None = None
    thread_env: dict[str, str] = field(default_factory=dict)  # OMP_*/GOMP_*/KMP_*/GGML_* variables the run saw


@dataclass(frozen=True)
class Bandwidth(Record):
    read_gbps: float
    median_gbps: float | None = None
    threads: int | None = None
    buffer_bytes: int | None = None
    reps: int | None = None
    method: str = ""
    probes_gbps: tuple[float, ...] = ()


@dataclass(frozen=True)
class DeviceMeta(Record):
    os: str = ""
    machine: str = ""
    hostname: str = ""
    cpu_model: str = ""
    physical_cores: int | None = None
    logical_cores: int | None = None
    cpu_max_mhz: float | None = None
    ram_bytes: int | None = None
    python: str = ""
    bandwidth: Bandwidth | None = None
    peak_rss_bytes: int | None = None

    @property
    def auto_label(self) -> str:
        """The default device label: CPU model and physical cores."""
        return f"{self.cpu_model or 'unknown CPU'} {self.physical_cores or '?'}c"


@dataclass(frozen=True)
class ModelMeta(Record):
    arch: str
    name: str = ""
    path: str = ""
    file_bytes: int | None = None
    content_hash: str = ""
    synthetic: bool = False
    twin_preset: str = ""
    type_summary: dict[str, int] = field(default_factory=dict)
    engine_desc: str = ""
    n_params: int | None = None
    gguf: dict | None = None  # harness.gguf_model.ModelInfo.to_dict(): the tensor table and hyperparameters


@dataclass(frozen=True)
class Sensors(Record):
    cpu_mhz: float | None = None
    temp_c: float | None = None
    t_unix: float | None = None


@dataclass(frozen=True)
class ContextSummary(Record):
    """One context (depth): plain and profiled ms/token over rounds, stage times, calibration, intervals."""

    context: str
    depth: int
    timed_tokens: int  # rounds that reached this context (one plain and one profiled token each)
    plain_ms: float
    profiled_ms: float
    stage_ms: dict[str, float]
    stage_pct: dict[str, float]
    covered_pct: float
    attributed_pct: float
    overhead_ratio: float | None = None
    plain_ms_median: float | None = None
    plain_ms_std: float | None = None
    plain_ms_ci: Interval | None = None
    overhead_ratio_ci: Interval | None = None
    stage_ms_ci: dict[str, Interval] = field(default_factory=dict)
    sync_us: float | None = None  # cost of one graph split (calibration tokens; version 2: per segment)
    sync_us_ci: Interval | None = None
    sync_us_estimator: str = "mean"  # over rounds: stats.SPLIT_COST_ESTIMATOR since NOTES §24, the mean before
    noop_sync_us: float | None = None  # bare ask/observe round trip on a no-op node (diagnostic)
    stage_ms_calibrated: dict[str, float] = field(default_factory=dict)
    stage_ms_calibrated_ci: dict[str, Interval] = field(default_factory=dict)
    stage_pct_calibrated: dict[str, float] = field(default_factory=dict)
    calibrated_sum_pct: float | None = None  # sum of calibrated stage ms / plain ms x 100
    ops_rounds: int = 0  # rounds whose calibration token (every node timed: an ops-mode token) was at this depth
    ops_pct_calibrated: dict[str, float] = field(default_factory=dict)  # those tokens' calibrated stage shares
    mode_diff_pp: dict[str, float] = field(default_factory=dict)  # ops - stages calibrated share, both over those
    # rounds only (so not ops_pct_calibrated - stage_pct_calibrated, which is over every round)
    mode_diff_pp_ci: dict[str, Interval] = field(default_factory=dict)  # none below stats.MODE_MIN_ROUNDS rounds
    prefill_s: float | None = None
    n_nodes: int | None = None
    syncs_per_token: int | None = None
    sensors_before: Sensors | None = None
    sensors_after: Sensors | None = None
    graph_bytes: dict | None = None  # harness.graph_bytes record of this depth's decode graph
    recorded: dict | None = None  # the reference run's recorded figures

    @property
    def calibrated(self) -> bool:
        """Whether this context has calibrated stage figures (the run had calibration tokens): the one rule
        every reader uses; ``stage``/``share`` fall back to the raw profiled figures otherwise."""
        return bool(self.stage_ms_calibrated)

    def mode_worst(self) -> tuple[str, float, Interval | None] | None:
        """The stage whose ops- and stages-mode shares differ most: (stage, ops - stages in points, its interval
        or None); None without ops-mode tokens."""
        if not self.mode_diff_pp:
            return None
        s = max(self.mode_diff_pp, key=lambda k: abs(self.mode_diff_pp[k]))
        return s, self.mode_diff_pp[s], self.mode_diff_pp_ci.get(s)

    @property
    def mode_agreement_pp(self) -> float | None:
        """Largest |ops - stages| calibrated stage share (points), paired by round; None without ops-mode tokens."""
        worst = self.mode_worst()
        return abs(worst[1]) if worst else None

    def stage(self, name: str, calibrated: bool = True) -> float:
        """Stage ms/token; calibrated when the run has calibrated figures."""
        src = self.stage_ms_calibrated if calibrated and self.calibrated else self.stage_ms
        return float(src.get(name, 0.0))

    def share(self, name: str, calibrated: bool = True) -> float:
        """Stage % (of the calibrated stage sum, or raw: of the profiled wall time); as ``stage``, and raw too when the
        calibrated stage sum was 0 (no calibrated shares exist then)."""
        src = self.stage_pct_calibrated if calibrated and self.stage_pct_calibrated else self.stage_pct
        return float(src.get(name, 0.0))


@dataclass(frozen=True)
class RoundNoise(Record):
    """What the OS said about one round: its order, CPU steal, other processes' CPU, clocks, temperature."""

    round: int
    order: tuple[int, ...]  # depths in the order this round decoded them
    wall_s: float
    steal_s: float | None = None
    others_cpu_s: float | None = None  # CPU time of all other processes during the round
    cpu_mhz: float | None = None
    temp_c: float | None = None


@dataclass(frozen=True)
class Invariants(Record):
    """Depth-invariant stages (work independent of depth) compared across depths, and over rounds. A run of one
    depth has only the check over rounds: no stage, disagreement 0 and no per-stage spread (``across_depths``)."""

    max_disagreement_pct: float  # largest (max - min) / mean across depths, over the checked stages
    stage: str  # the stage where it occurred ("" with one depth)
    threshold_pct: float
    per_stage_pct: dict[str, float] = field(default_factory=dict)
    estimator: str = "mean"  # each depth's value over rounds: "paired 20 % trimmed mean" (checks.depth_values),
    # "20 % trimmed mean" (unpaired: runs written before it) or "mean" (no rounds)
    per_stage_mean_pct: dict[str, float] = field(default_factory=dict)  # the same spread of the per-depth means
    noise_floor_pct: dict[str, float] = field(default_factory=dict)  # 95th pct of the spread, depths shuffled in rounds
    step_ratio: dict[str, float] = field(default_factory=dict)  # largest step of the per-round time: after / before
    step_round: dict[str, int] = field(default_factory=dict)  # rounds before that step
    step_floor_pct: dict[str, float] = field(default_factory=dict)  # 99th pct of the step's size, rounds shuffled
    judged: tuple[str, ...] = ()  # stages judged (a share of decode >= checks.INVARIANT_MIN_SHARE_PCT)

    @property
    def across_depths(self) -> bool:
        """Whether depths were compared (two or more of them)."""
        return bool(self.stage)


@dataclass(frozen=True)
class Flag(Record):
    kind: str  # synthetic, drift, state, noise, overhead, incomplete, calibration
    message: str
    context: str = ""


@dataclass(frozen=True)
class Timing(Record):
    load_s: float
    sweep_s: float
    prefill_tokens: int


@dataclass(frozen=True)
class RunRecord(Record):
    label: str
    complete: bool
    params: SweepParams
    model: ModelMeta
    device: DeviceMeta
    contexts: tuple[ContextSummary, ...]
    tokens: tuple[tuple[str, int, int, str, int, float], ...]  # columns.TOKEN_COLUMNS rows
    calibration_stages: tuple[tuple[str, int, int, str, int, float], ...] = ()  # columns.CALIB_STAGE_COLUMNS rows
    schema_version: int = SCHEMA_VERSION
    harness_version: str = ""
    engine: str = "llama.cpp via llama-cpp-python"
    engine_version: str | None = None
    system_info: str = ""
    backend_devices: tuple[str, ...] = ()
    stop_reason: str | None = None
    resumed_from: str | None = None
    synthetic: bool = False
    reference: bool = False
    note: str = ""
    timing: Timing | None = None
    rounds: tuple[RoundNoise, ...] = ()
    invariants: Invariants | None = None
    flags: tuple[Flag, ...] = ()
    units: dict[str, str] = field(default_factory=lambda: dict(UNITS))

    def sorted_contexts(self) -> list[ContextSummary]:
        return sorted(self.contexts, key=lambda c: c.depth)

    @property
    def calibrated(self) -> bool:
        """Every context has calibrated stage figures (``ContextSummary.calibrated``)."""
        return bool(self.contexts) and all(c.calibrated for c in self.contexts)

    @property
    def bandwidth_gbps(self) -> float | None:
        return self.device.bandwidth.read_gbps if self.device.bandwidth else None

    @property
    def display_label(self) -> str:
        return self.label or self.device.auto_label
