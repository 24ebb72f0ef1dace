"""Orchestration of a sweep: check the model and memory, load, measure round-robin, build the run record,
write the run. ``run_sweeps`` runs a list of configs (the product of list-valued settings), loading
the model once for all configs that share it, under one progress bar."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path

import gguf
import numpy as np
import pandas as pd
import psutil
from tqdm import tqdm

from harness import __version__, checks, columns, device, engine, stats, store
from harness.config import SweepConfig
from harness.errors import HarnessError, InputError, UsageError
from harness.gguf_model import cache_type_bytes, content_hash, kv_cache_cells, kv_owners, swa_layers
from harness.model_cache import read_model
from harness.record import (
    UNITS,
    Bandwidth,
    ContextSummary,
    DeviceMeta,
    ModelMeta,
    RoundNoise,
    RunRecord,
    Sensors,
    SweepParams,
    Timing,
)
from harness.runner import Measured, StopFlag, measure, prepare
from harness.twin import first_normal_token

log = logging.getLogger(__name__)
PROMPT_FILE = Path(__file__).parent / "data" / "prompt.txt"
KNOWN_ARCHS = set(gguf.MODEL_ARCH_NAMES.values())
CONTEXT_OVERHEAD_BYTES = 64 << 20  # bookkeeping of one context beyond its KV cache and logits buffer
PREFILL_WEIGHT = 0.15  # progress units: a prefilled token costs about this much of a decoded one


class Interrupted(HarnessError):
    """The sweep was stopped by a signal; the completed rounds were saved."""

    def __init__(self, msg: str, code: int):
        super().__init__(msg)
        self.exit_code = code


def estimate_memory_bytes(info, cfg: SweepConfig) -> int:
    """Weights + two contexts (plain, profiled) per resident depth, each with a KV cache (every KV-owning layer's
    cells, ``kv_cache_cells``: a sliding layer's cache is the window's) and a compute buffer dominated by ubatch x
    vocab f32 logits (E4B at ub 512: 526 MiB, measured)."""
    hp = info.hparams

    def scalar(v, default):
        return max(v) if isinstance(v, list) and v else (default if v is None else v)

    n_kv = int(scalar(hp.get("attention.head_count_kv"), scalar(hp.get("attention.head_count"), 1)) or 1)
    k_len = int(scalar(hp.get("attention.key_length"), 128))
    v_len = int(scalar(hp.get("attention.value_length"), k_len))
    cell = n_kv * (k_len * cache_type_bytes(cfg.cache_type_k) + v_len * cache_type_bytes(cfg.cache_type_v))
    logits = cfg.n_ubatch * int(hp.get("vocab_size") or 32000) * 4
    cells = sum(kv_cache_cells(s, n_ctx=cfg.n_ctx, n_swa=info.n_swa, n_ubatch=cfg.n_ubatch, n_batch=cfg.n_batch)
                for s, own in zip(swa_layers(info), kv_owners(info), strict=True) if own)
    per_context = cells * cell + logits + CONTEXT_OVERHEAD_BYTES
    return int(info.tensor_bytes + 2 * len(cfg.contexts) * per_context)


def prompt_tokens(model: engine.Model, synthetic: bool, n: int, seed: int = 0) -> list[int]:
    """Exactly n teacher-forced token ids: random ordinary ids for twins, shipped text otherwise."""
    if synthetic:
        rng = np.random.default_rng(seed)
        return [int(x) for x in rng.integers(first_normal_token(), model.n_vocab, size=n)]
    text = PROMPT_FILE.read_text()
    ids, body = model.tokenize(text, add_bos=True), model.tokenize(text, add_bos=False)
    while len(ids) < n:
        ids += body
    return ids[:n]


def check_model(cfg: SweepConfig, model_path: Path, info=None):
    """The model's record (parsed here unless given), checked against one config before llama.cpp sees it."""
    info = info or read_model(model_path)  # validates the GGUF
    if info.arch not in KNOWN_ARCHS:
        raise InputError(f"architecture {info.arch!r} is not one llama.cpp knows: {model_path}")
    if info.n_ctx_train and cfg.n_ctx > info.n_ctx_train:
        raise UsageError(f"context {cfg.max_depth} (+1 decoded token) exceeds the model's context length "
                         f"{info.n_ctx_train}: {model_path}")
    need, avail = estimate_memory_bytes(info, cfg), psutil.virtual_memory().available
    if need > avail and not cfg.force:
        raise InputError(f"model and {2 * len(cfg.contexts)} contexts need about {need / 2**30:.1f} GiB but only "
                         f"{avail / 2**30:.1f} GiB is available (use --force to try anyway): {model_path}")
    return info


def progress_units(cfg: SweepConfig) -> float:
    n = len(cfg.contexts)
    return cfg.max_depth * PREFILL_WEIGHT + cfg.rounds * (2 * n + (1 if cfg.calib_splits else 0))


class _Units:
    """Adapts the runner's progress (prefilled tokens, finished rounds) to one bar in decode-token units."""

    def __init__(self, bar, weight: float):
        self.bar, self.weight = bar, weight

    def update(self, n: int) -> None:
        self.bar.update(n * self.weight)


def run_sweeps(configs: list[SweepConfig], model_path: Path, resume: store.Run | None = None,
               on_run=None) -> list[Path]:
    """Run every config (one run each); the model is loaded once per n_gpu_layers value. ``on_run(record,
    path)`` is called as each run is written."""
    paths: list[Path] = []
    info = read_model(model_path)  # parsed once for every config of a product sweep
    for cfg in configs:
        check_model(cfg, model_path, info)
    out_dirs = {cfg.out: store.check_out_dir(cfg.out) for cfg in configs}
    for d in out_dirs.values():
        store.clean_stale_temps(d)
    model_hash = content_hash(model_path)
    if resume is not None and resume.record.model.content_hash != model_hash:
        raise UsageError(f"cannot resume: model {model_path} is not the one the run was made on "
                         f"(content hash differs): {resume.path}")
    dev = device.device_info()
    total = sum(progress_units(c) for c in configs)
    with tqdm(total=round(total), desc="sweep", unit="tok", disable=None, leave=False,
              bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} tok [{elapsed}<{remaining}]") as bar, StopFlag() as stop:
        for ngl in dict.fromkeys(c.n_gpu_layers for c in configs):
            t0 = time.perf_counter()
            with engine.Model(model_path, ngl) as model:
                load_s = time.perf_counter() - t0
                log.info("loaded %s (%s, %.2f B params) in %.1f s%s", model_path.name, model.desc,
                         model.n_params / 1e9, load_s, " [SYNTHETIC TWIN: random weights]"
                         if info.synthetic else "")
                for i, cfg in enumerate(c for c in configs if c.n_gpu_layers == ngl):
                    if stop:
                        break
                    if len(configs) > 1:
                        log.info("run %d of %d: %s", len(paths) + 1, len(configs), describe(cfg))
                    paths.append(run_one(cfg, model, info, model_hash, model_path, dev,
                                         load_s if i == 0 else 0.0, stop, bar, resume, on_run))
    return paths


def describe(cfg: SweepConfig) -> str:
    return (f"threads={cfg.threads or 'cores'} fa={cfg.flash_attn} ctk={cfg.cache_type_k} ctv={cfg.cache_type_v} "
            f"ngl={cfg.n_gpu_layers} ub={cfg.n_ubatch}")


def run_one(cfg: SweepConfig, model: engine.Model, info, model_hash: str, model_path: Path, dev: dict,
            load_s: float, stop: StopFlag, bar, resume: store.Run | None, on_run=None) -> Path:
    threads = cfg.threads or dev["physical_cores"]
    bandwidth = None if not cfg.probe else device.measure_bandwidth(threads)
    done = len(resume.record.rounds) if resume else 0  # rounds are numbered on from the stored ones
    t_start = time.perf_counter()
    prompt = prompt_tokens(model, info.synthetic, cfg.max_depth)
    failure: HarnessError | None = None
    m, residents = Measured(), None
    with ExitStack() as stack:
        try:
            residents = prepare(stack, model, cfg.engine_config(threads), list(cfg.contexts), prompt,
                                cfg.mode, cfg.warmup, stop, _Units(bar, PREFILL_WEIGHT))
            if residents is not None:
                log.info("measuring %d rounds over depths %s (%s)", cfg.rounds - done,
                         ", ".join(str(d) for _, d in cfg.contexts), describe(cfg))
                per_round = progress_units(cfg.replace(rounds=1)) - cfg.max_depth * PREFILL_WEIGHT
                measure(residents, range(done, cfg.rounds), cfg.calib_splits, prompt[-1], stop,
                        _Units(bar, per_round), m)  # fills m round by round: an error keeps the completed ones
        except HarnessError as e:  # keep the rounds that completed, then report the failure
            failure, stop.reason = e, f"error: {e}"
        extras = {r.label: r for r in residents or []}
        fa_resolved = any(n.op == "FLASH_ATTN_EXT" for n in residents[0].cap.nodes) if residents else None
        callback = residents[0].cap.backend if residents else "unknown"
        pool = residents[0].plain.threadpool_attached if residents else None
    sweep_s = time.perf_counter() - t_start
    if bandwidth:
        after = device.measure_bandwidth(threads)  # a shared machine can starve one probe; keep the best
        best = max(bandwidth, after, key=lambda b: b["read_gbps"])
        bandwidth = {**best, "probes_gbps": [bandwidth["read_gbps"], after["read_gbps"]]}
    ops = pd.DataFrame(m.op_rows, columns=list(columns.OP_COLUMNS))
    tokens = pd.DataFrame(m.token_rows, columns=list(columns.TOKEN_COLUMNS))
    noise = [RoundNoise.from_dict(x) for x in m.noise]
    calib = [tuple(r) for r in m.calib_rows]
    if resume is not None:
        ops = pd.concat([resume.ops[list(columns.OP_COLUMNS)], ops], ignore_index=True)
        tokens = pd.concat([resume.tokens, tokens], ignore_index=True)
        noise = list(resume.record.rounds) + noise
        calib = list(resume.record.calibration_stages) + calib
    if not len(tokens):
        if failure is not None:
            raise failure
        raise Interrupted(f"stopped by {stop.reason} before any round completed; no run written",
                          130 if stop.reason == "SIGINT" else 143)
    record = build_record(cfg, ops, tokens, calib, noise, extras, info, model, model_hash, model_path, dev, threads,
                          bandwidth, Timing(load_s=load_s, sweep_s=sweep_s, prefill_tokens=cfg.max_depth),
                          stop, resume, fa_resolved, callback, pool)
    target = store.run_path(cfg.out, record.label, model_path.stem, cfg.layout)
    store.clean_stale_temps(target.parent)
    path = store.write_run(ops, record, store.check_out_dir(target.parent), target.name)
    if on_run is not None:
        on_run(record, path)
    if failure is not None:
        raise type(failure)(f"{failure} (the {len(noise)} completed round(s) were saved as an incomplete run: {path})")
    if stop:
        raise Interrupted(f"stopped by {stop.reason}: the {len(noise)} completed round(s) were saved as an incomplete "
                          f"run; continue it with --resume {path}", 130 if stop.reason == "SIGINT" else 143)
    return path


def build_record(cfg: SweepConfig, ops, tokens, calib, noise, extras, info, model, model_hash, model_path, dev, threads,
                 bandwidth, timing, stop, resume, fa_resolved, callback, pool) -> RunRecord:
    rd = stats.round_data(ops, tokens, pd.DataFrame(calib, columns=list(columns.CALIB_STAGE_COLUMNS)))
    summaries, cost_us, cost_ci = stats.summarize(rd)
    contexts = []
    for s in summaries:
        r = extras.get(s["context"])
        ci = None if np.isnan(cost_us) else (max(0.0, cost_ci[0]), max(0.0, cost_ci[1]))  # clipped as the point
        s.update(sync_us=None if np.isnan(cost_us) else max(0.0, cost_us), sync_us_ci=ci,
                 sync_us_estimator=stats.SPLIT_COST_ESTIMATOR)
        if r is not None:
            s.update(prefill_s=r.prefill_s, n_nodes=r.n_nodes, syncs_per_token=r.cap.syncs_per_token,
                     noop_sync_us=r.noop_sync_us, sensors_before=Sensors.from_dict(r.sensors_before),
                     graph_bytes=r.graph_bytes,
                     sensors_after=Sensors.from_dict(device.sample_sensors()))
        contexts.append(ContextSummary(**s))
    inv = checks.invariants(contexts, rd)
    complete = not stop
    label = cfg.label or DeviceMeta(cpu_model=dev["cpu_model"], physical_cores=dev["physical_cores"]).auto_label
    flags = checks.flags(contexts, inv, noise, cores=dev["logical_cores"], synthetic=info.synthetic, complete=complete,
                         stop_reason=stop.reason)
    params = SweepParams(
        contexts=cfg.context_specs(), rounds=cfg.rounds, warmup=cfg.warmup, threads=threads,
        flash_attn=cfg.flash_attn, cache_type_k=cfg.cache_type_k, cache_type_v=cfg.cache_type_v,
        n_gpu_layers=cfg.n_gpu_layers, n_batch=cfg.n_batch, n_ubatch=cfg.n_ubatch, mode=cfg.mode, n_ctx=cfg.n_ctx,
        callback=callback, threads_source="--threads" if cfg.threads else "physical cores",
        calib_splits=cfg.calib_splits, flash_attn_resolved=fa_resolved, openmp=engine.openmp_enabled(),
        threadpool=pool, thread_env=device.thread_env())
    return RunRecord(
        label=label, complete=complete, params=params,
        model=ModelMeta(arch=info.arch, name=info.name, path=str(model_path), file_bytes=info.file_bytes,
                        content_hash=model_hash, synthetic=info.synthetic, twin_preset=info.twin_preset,
                        type_summary=info.type_summary(), engine_desc=model.desc, n_params=model.n_params,
                        gguf=info.to_dict()),
        device=DeviceMeta(**dev, bandwidth=Bandwidth.from_dict(bandwidth) if bandwidth else None,
                          peak_rss_bytes=device.peak_rss_bytes()),
        contexts=tuple(contexts), tokens=tuple(tuple(r) for r in tokens.itertuples(index=False, name=None)),
        calibration_stages=tuple(calib),
        harness_version=__version__, engine_version=engine.engine_version(), system_info=engine.system_info(),
        backend_devices=tuple(engine.backend_devices()), stop_reason=stop.reason,
        resumed_from=resume.path if resume else None, synthetic=info.synthetic, timing=timing, rounds=tuple(noise),
        invariants=inv, flags=tuple(flags), units=dict(UNITS))
