"""Decode sweep: per-op decode timing through llama.cpp at several contexts, into one Parquet run.

    python -m harness.sweep --model models/gemma-3n-e4b-q4.gguf

For each context (ascending, extending one KV cache so prefill costs max(L) tokens), every
timed token is decoded at exactly depth L and rolled back (``llama_memory_seq_rm``). Each
token is timed twice, interleaved: once in a plain context (no callback: the ms/token to quote)
and once in a profiled context (eval callback: per-stage times). Both contexts hold the same
KV cache (copied after each prefill), so the overhead ratio profiled/plain is measured in-run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pandas as pd
import psutil

from harness import __version__, columns, device, engine, stats, store
from harness.capture import MODES, Capture
from harness.cli import ArgParser, run_cli
from harness.errors import HarnessError, InputError, UsageError
from harness.gguf_model import cache_type_bytes, content_hash, kv_owners, read_model
from harness.runner import ContextResult, LoopSettings, StopFlag, measure_context
from harness.twin import DEFAULT_MODEL, ensure_default_model, first_normal_token

log = logging.getLogger(__name__)
NAMED_CONTEXTS = {"short": 13, "medium": 172, "long": 658}
DEFAULT_CONTEXTS = "short,medium,long"
PROMPT_FILE = Path(__file__).parent / "data" / "prompt.txt"
KNOWN_ARCHS = set(gguf.MODEL_ARCH_NAMES.values())


def parse_contexts(spec: str) -> list[tuple[str, int]]:
    """'short,172,4096' -> [('short', 13), ('172', 172), ('4096', 4096)], sorted by depth."""
    out = {}
    for part in (p.strip() for p in spec.split(",")):
        if part in NAMED_CONTEXTS:
            out[part] = NAMED_CONTEXTS[part]
            continue
        try:
            n = int(part)
        except ValueError:
            raise UsageError(f"context {part!r} is neither a number nor one of "
                             f"{', '.join(NAMED_CONTEXTS)}") from None
        if n <= 0:
            raise UsageError(f"context must be > 0, got {n}")
        label = next((k for k, v in NAMED_CONTEXTS.items() if v == n), str(n))
        out[label] = n
    if not out:
        raise UsageError("no contexts given")
    return sorted(out.items(), key=lambda kv: kv[1])


def prompt_tokens(model: engine.Model, synthetic: bool, n: int, seed: int = 0) -> list[int]:
    """Exactly n teacher-forced token ids: random ordinary ids for twins, shipped text otherwise."""
    if synthetic:
        rng = np.random.default_rng(seed)
        return [int(x) for x in rng.integers(first_normal_token(), model.n_vocab, size=n)]
    text = PROMPT_FILE.read_text()
    ids = model.tokenize(text, add_bos=True)
    body = model.tokenize(text, add_bos=False)
    while len(ids) < n:
        ids += body
    return ids[:n]


def parse_threads(spec: str) -> list[int]:
    try:
        out = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"threads must be integers, got {spec!r}") from None
    if not out or min(out) < 1:
        raise UsageError(f"threads must be >= 1, got {spec!r}")
    return out


def build_parser() -> ArgParser:
    ap = ArgParser(prog="python -m harness.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default=None,
                    help=f"GGUF model (default: the synthetic twin {DEFAULT_MODEL}, made if missing)")
    ap.add_argument("-c", "--contexts", default=DEFAULT_CONTEXTS,
                    help="comma list of names (short=13, medium=172, long=658) or token counts")
    ap.add_argument("-n", "--tokens", type=int, default=8, help="timed tokens per context and repeat")
    ap.add_argument("-r", "--repeats", type=int, default=2, help="repeats of the timed tokens")
    ap.add_argument("--warmup", type=int, default=2, help="untimed tokens per context")
    ap.add_argument("-t", "--threads", type=parse_threads, default=None,
                    help="threads, or a comma list to sweep (one run each), e.g. 1,2 (default: physical cores)")
    ap.add_argument("-fa", "--flash-attn", default="auto", help="on, off or auto")
    ap.add_argument("-ctk", "--cache-type-k", default="f16")
    ap.add_argument("-ctv", "--cache-type-v", default="f16")
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("-b", "--batch-size", type=int, default=512)
    ap.add_argument("-ub", "--ubatch-size", type=int, default=512)
    ap.add_argument("--mode", default="stages", help="stages (default) or ops")
    ap.add_argument("-o", "--out", default="runs", help="output folder (default runs/)")
    ap.add_argument("--label", default=None, help="device label (default: CPU model and cores)")
    ap.add_argument("--no-probe", action="store_true", help="skip the memory bandwidth probe")
    ap.add_argument("--resume", default=None, metavar="RUN", help="continue an incomplete (interrupted) run")
    ap.add_argument("--force", action="store_true", help="run even if the memory estimate exceeds available RAM")
    return ap


def validate(a) -> list[tuple[str, int]]:
    contexts = parse_contexts(a.contexts)
    for name, v in (("tokens", a.tokens), ("repeats", a.repeats)):
        if v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")
    if a.warmup < 0:
        raise UsageError(f"warmup must be >= 0, got {a.warmup}")
    if a.mode not in MODES:
        raise UsageError(f"unknown mode {a.mode!r} (stages or ops)")
    engine.EngineConfig(threads=1, n_ctx=1, flash_attn=a.flash_attn, cache_type_k=a.cache_type_k,
                        cache_type_v=a.cache_type_v, n_batch=a.batch_size, n_ubatch=a.ubatch_size).validate()
    return contexts


def default_label(dev: dict) -> str:
    return f"{dev['cpu_model']} {dev['physical_cores']}c"


class Interrupted(HarnessError):
    """The sweep was stopped by a signal; the completed contexts were saved."""

    def __init__(self, msg: str, code: int):
        super().__init__(msg)
        self.exit_code = code


def estimate_memory_bytes(info, n_ctx: int, cache_type_k: str, cache_type_v: str) -> int:
    """Model weights + two contexts' KV caches (plain and profiled) + ~0.5 GiB compute buffers."""
    hp = info.hparams

    def scalar(v, default):
        return max(v) if isinstance(v, list) and v else (default if v is None else v)

    n_kv = int(scalar(hp.get("attention.head_count_kv"), scalar(hp.get("attention.head_count"), 1)) or 1)
    k_len = int(scalar(hp.get("attention.key_length"), 128))
    v_len = int(scalar(hp.get("attention.value_length"), k_len))
    cell = n_kv * (k_len * cache_type_bytes(cache_type_k) + v_len * cache_type_bytes(cache_type_v))
    kv = sum(kv_owners(info)) * n_ctx * cell
    return int(info.tensor_bytes + 2 * kv + (512 << 20))


def check_memory(info, n_ctx: int, a) -> None:
    need = estimate_memory_bytes(info, n_ctx, a.cache_type_k, a.cache_type_v)
    avail = psutil.virtual_memory().available
    if need > avail and not a.force:
        raise InputError(f"model and KV cache need about {need / 2**30:.1f} GiB but only {avail / 2**30:.1f} GiB "
                         f"is available (use --force to try anyway): {info.path}")


def run_sweep(a, contexts: list[tuple[str, int]], model_path: Path, resume: store.Run | None = None) -> Path:
    info = read_model(model_path)  # validates the GGUF before llama.cpp sees it
    if info.arch not in KNOWN_ARCHS:
        raise InputError(f"architecture {info.arch!r} is not one llama.cpp knows: {model_path}")
    max_depth = contexts[-1][1]
    n_ctx = max_depth + 1
    if info.n_ctx_train and n_ctx > info.n_ctx_train:
        raise UsageError(f"context {max_depth} (+1 decoded token) exceeds the model's context length "
                         f"{info.n_ctx_train}: {model_path}")
    model_hash = content_hash(model_path)
    if resume is not None and resume.meta["model"]["content_hash"] != model_hash:
        raise UsageError(f"cannot resume: model {model_path} is not the one the run was made on "
                         f"(content hash differs): {resume.path}")
    check_memory(info, n_ctx, a)
    out_dir = store.check_out_dir(a.out)
    store.clean_stale_temps(out_dir)
    dev = device.device_info()
    threads = a.threads or dev["physical_cores"]
    cfg = engine.EngineConfig(threads=threads, n_ctx=n_ctx, flash_attn=a.flash_attn, cache_type_k=a.cache_type_k,
                              cache_type_v=a.cache_type_v, n_gpu_layers=a.n_gpu_layers,
                              n_batch=a.batch_size, n_ubatch=a.ubatch_size)
    bandwidth = None if a.no_probe else device.measure_bandwidth(threads)
    done = {c["context"] for c in resume.meta["contexts"]} if resume else set()
    loop = LoopSettings(tokens=a.tokens, repeats=a.repeats, warmup=a.warmup, batch_size=a.batch_size)
    t_start = time.perf_counter()
    cap = Capture(a.mode)
    results: list[ContextResult] = []
    with StopFlag() as stop, engine.Model(model_path, a.n_gpu_layers) as model, \
            engine.Context(model, cfg) as plain, engine.Context(model, cfg, cap.callback, cap.user_data) as prof:
        load_s = time.perf_counter() - t_start
        log.info("loaded %s (%s, %.2f B params) in %.1f s%s", model_path.name, model.desc, model.n_params / 1e9,
                 load_s, " [SYNTHETIC TWIN: random weights]" if info.synthetic else "")
        prompt = prompt_tokens(model, info.synthetic, max_depth)
        failure: HarnessError | None = None
        for label, depth in contexts:
            if label in done:
                continue
            try:
                r = measure_context(plain, prof, cap, prompt, label, depth, loop, stop)
            except HarnessError as e:  # keep the contexts that completed, then report the failure
                failure = e
                stop.reason = f"error: {e}"
                break
            if r is None:
                break
            results.append(r)
        model_desc, model_params = model.desc, model.n_params
    sweep_s = time.perf_counter() - t_start
    if bandwidth:  # probe again after the sweep: a shared machine can starve one probe; keep the best
        after = device.measure_bandwidth(threads)
        bandwidth = {**max(bandwidth, after, key=lambda b: b["read_gbps"]),
                     "probes_gbps": [bandwidth["read_gbps"], after["read_gbps"]]}
        log.info("memory read bandwidth: %.1f GB/s (%d threads; probes before/after the sweep: %.1f, %.1f)",
                 bandwidth["read_gbps"], threads, *bandwidth["probes_gbps"])
    label = a.label or default_label(dev)
    rows = [row for r in results for row in r.op_rows]
    ops_df = pd.DataFrame(rows, columns=list(columns.OP_COLUMNS))
    tokens = [list(t) for r in results for t in r.token_rows]
    summaries = [r.summary for r in results]
    if resume is not None:
        ops_df = pd.concat([resume.ops[list(columns.OP_COLUMNS)], ops_df], ignore_index=True)
        tokens = resume.meta["tokens"] + tokens
        summaries = resume.meta["contexts"] + summaries
    if not summaries:
        if failure is not None:
            raise failure
        raise Interrupted(f"stopped by {stop.reason} before any context completed; no run written",
                          130 if stop.reason == "SIGINT" else 143)
    meta = {
        "harness_version": __version__, "engine": "llama.cpp via llama-cpp-python",
        "engine_version": engine.engine_version(), "system_info": engine.system_info(),
        "backend_devices": engine.backend_devices(), "complete": not stop, "stop_reason": stop.reason,
        "resumed_from": resume.path if resume else None, "label": label, "synthetic": info.synthetic,
        "params": {"contexts": [{"label": k, "depth": v} for k, v in contexts], "tokens": a.tokens,
                   "repeats": a.repeats, "warmup": a.warmup, "threads": threads, "flash_attn": a.flash_attn,
                   "cache_type_k": a.cache_type_k, "cache_type_v": a.cache_type_v, "n_gpu_layers": a.n_gpu_layers,
                   "n_batch": a.batch_size, "n_ubatch": a.ubatch_size, "mode": a.mode, "n_ctx": n_ctx,
                   "depth_control": "rollback", "callback": cap.backend,
                   "threads_source": getattr(a, "threads_source", None)
                   or ("--threads" if a.threads else "physical cores")},
        "model": {"path": str(model_path), "file_bytes": info.file_bytes, "content_hash": model_hash,
                  "arch": info.arch, "name": info.name, "synthetic": info.synthetic, "twin_preset": info.twin_preset,
                  "type_summary": info.type_summary(), "engine_desc": model_desc, "n_params": model_params,
                  "gguf": info.to_dict()},
        "device": {**dev, "bandwidth": bandwidth, "peak_rss_bytes": device.peak_rss_bytes()},
        "timing": {"load_s": load_s, "sweep_s": sweep_s, "prefill_tokens": max_depth},
        "units": {"time_us": "microseconds", "wall_us": "microseconds", "*_ms": "milliseconds",
                  "*_s": "seconds", "*_bytes": "bytes", "read_gbps": "1e9 bytes per second"},
        "contexts": summaries,
        "tokens": tokens,
    }
    path = store.write_run(ops_df, meta, out_dir, store.run_filename(label, model_path.stem))
    sys.stdout.write(stats.format_summary(summaries, a.mode) + "\n")
    log.info("run written: %s (%d rows, sweep %.1f s%s)", path, len(ops_df), sweep_s,
             "; SYNTHETIC model" if info.synthetic else "")
    if failure is not None:
        raise type(failure)(f"{failure} (the {len(summaries)} completed context(s) were saved as an incomplete "
                            f"run: {path})")
    if stop:
        raise Interrupted(f"stopped by {stop.reason}: the {len(summaries)} completed context(s) were saved as an "
                          f"incomplete run; continue it with --resume {path}", 130 if stop.reason == "SIGINT" else 143)
    return path


RESUMABLE = {"tokens": "tokens", "repeats": "repeats", "warmup": "warmup", "threads": "threads",
             "flash_attn": "flash_attn", "cache_type_k": "cache_type_k", "cache_type_v": "cache_type_v",
             "n_gpu_layers": "n_gpu_layers", "mode": "mode", "batch_size": "n_batch", "ubatch_size": "n_ubatch"}


def given_flags(argv: list[str] | None) -> dict:
    """The options the user actually typed (defaults suppressed)."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return vars(quiet.parse_args(argv))


def resume_args(a, given: dict) -> tuple[store.Run, list[tuple[str, int]], Path]:
    """Take an incomplete run's parameters; refuse typed flags, devices or engines that contradict them."""
    run = store.read_run(a.resume)
    if run.meta.get("complete", True):
        raise UsageError(f"run is already complete, nothing to resume: {a.resume}")
    p = run.meta["params"]
    for key, stored in RESUMABLE.items():
        if key in given and getattr(a, key) != p[stored]:
            flag = key.replace("_", "-")
            raise UsageError(f"cannot resume with --{flag} {getattr(a, key)}: the run used {p[stored]}")
        setattr(a, key, p[stored])
    contexts = sorted(((c["label"], c["depth"]) for c in p["contexts"]), key=lambda kv: kv[1])
    if "contexts" in given and parse_contexts(a.contexts) != contexts:
        raise UsageError(f"cannot resume with --contexts {a.contexts}: the run used "
                         f"{','.join(str(d) for _, d in contexts)}")
    if "label" in given and a.label != run.meta["label"]:
        raise UsageError(f"cannot resume with --label {a.label}: the run used {run.meta['label']}")
    a.label = run.meta["label"]
    a.threads_source = p.get("threads_source")
    dev, here = run.meta.get("device", {}), device.device_info()
    for key, now in (("cpu_model", here["cpu_model"]), ("hostname", here["hostname"])):
        if dev.get(key) not in (None, now):
            raise UsageError(f"cannot resume on another device ({key} {now!r}, the run has {dev.get(key)!r})")
    if run.meta.get("engine_version") not in (None, engine.engine_version()):
        raise UsageError(f"cannot resume with llama-cpp-python {engine.engine_version()}: the run used "
                         f"{run.meta['engine_version']}")
    return run, contexts, Path(a.model or run.meta["model"]["path"])


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.resume:
        if a.threads is not None and len(a.threads) != 1:
            raise UsageError("--resume takes a single thread count")
        a.threads = a.threads[0] if a.threads else None
        run, contexts, model_path = resume_args(a, given_flags(argv))
        validate(a)
        run_sweep(a, contexts, model_path, resume=run)
        return 0
    contexts = validate(a)
    if a.model is None:
        model_path = ensure_default_model()
    else:
        model_path = Path(a.model)
    thread_list = a.threads or [None]
    for i, threads in enumerate(thread_list):
        if len(thread_list) > 1:
            log.info("thread sweep: %d threads (%d of %d)", threads, i + 1, len(thread_list))
        a.threads = threads
        run_sweep(a, contexts, model_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("harness.sweep", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
