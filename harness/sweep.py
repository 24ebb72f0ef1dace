"""Decode sweep: per-op decode timing through llama.cpp at several contexts, into one Parquet run.

    python -m harness.sweep --model models/gemma-3n-e4b-q4.gguf

For each context (ascending, extending one KV cache so prefill costs max(L) tokens), every
timed token is decoded at exactly depth L and rolled back (``llama_memory_seq_rm``). Each
token is timed twice, interleaved: once in a plain context (no callback: the ms/token to quote)
and once in a profiled context (eval callback: per-stage times). Both contexts hold the same
KV cache (copied after each prefill), so the overhead ratio profiled/plain is measured in-run.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pandas as pd
from tqdm import tqdm

from harness import __version__, device, engine, report, schema, store
from harness.capture import MODES, Capture
from harness.errors import ArgParser, InputError, UsageError, run_cli
from harness.gguf_model import content_hash, read_model
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


def build_parser() -> ArgParser:
    ap = ArgParser(prog="python -m harness.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default=None,
                    help=f"GGUF model (default: the synthetic twin {DEFAULT_MODEL}, made if missing)")
    ap.add_argument("-c", "--contexts", default=DEFAULT_CONTEXTS,
                    help="comma list of names (short=13, medium=172, long=658) or token counts")
    ap.add_argument("-n", "--tokens", type=int, default=8, help="timed tokens per context and repeat")
    ap.add_argument("-r", "--repeats", type=int, default=2, help="repeats of the timed tokens")
    ap.add_argument("--warmup", type=int, default=2, help="untimed tokens per context")
    ap.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
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
    return ap


def validate(a) -> list[tuple[str, int]]:
    contexts = parse_contexts(a.contexts)
    for name, v in (("tokens", a.tokens), ("repeats", a.repeats)):
        if v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")
    if a.warmup < 0:
        raise UsageError(f"warmup must be >= 0, got {a.warmup}")
    if a.threads is not None and a.threads < 1:
        raise UsageError(f"threads must be >= 1, got {a.threads}")
    if a.mode not in MODES:
        raise UsageError(f"unknown mode {a.mode!r} (stages or ops)")
    engine.EngineConfig(threads=a.threads or 1, n_ctx=1, flash_attn=a.flash_attn, cache_type_k=a.cache_type_k,
                        cache_type_v=a.cache_type_v, n_batch=a.batch_size, n_ubatch=a.ubatch_size).validate()
    return contexts


def default_label(dev: dict) -> str:
    return f"{dev['cpu_model']} {dev['physical_cores']}c"


def run_sweep(a, contexts: list[tuple[str, int]], model_path: Path) -> Path:
    info = read_model(model_path)  # validates the GGUF before llama.cpp sees it
    if info.arch not in KNOWN_ARCHS:
        raise InputError(f"architecture {info.arch!r} is not one llama.cpp knows: {model_path}")
    max_depth = contexts[-1][1]
    n_ctx = max_depth + 1
    if info.n_ctx_train and n_ctx > info.n_ctx_train:
        raise UsageError(f"context {max_depth} (+1 decoded token) exceeds the model's context length "
                         f"{info.n_ctx_train}: {model_path}")
    out_dir = store.check_out_dir(a.out)
    store.clean_stale_temps(out_dir)
    dev = device.device_info()
    threads = a.threads or dev["physical_cores"]
    cfg = engine.EngineConfig(threads=threads, n_ctx=n_ctx, flash_attn=a.flash_attn, cache_type_k=a.cache_type_k,
                              cache_type_v=a.cache_type_v, n_gpu_layers=a.n_gpu_layers,
                              n_batch=a.batch_size, n_ubatch=a.ubatch_size)
    bandwidth = None if a.no_probe else device.measure_bandwidth(threads)
    if bandwidth:
        log.info("memory read bandwidth: %.1f GB/s (%d threads)", bandwidth["read_gbps"], threads)
    t_start = time.perf_counter()
    cap = Capture(a.mode)
    rows: list[tuple] = []
    toks: list[tuple] = []
    summaries: list[dict] = []
    with engine.Model(model_path, a.n_gpu_layers) as model, \
            engine.Context(model, cfg) as plain, engine.Context(model, cfg, cap.callback) as prof:
        load_s = time.perf_counter() - t_start
        log.info("loaded %s (%s, %.2f B params) in %.1f s%s", model_path.name, model.desc, model.n_params / 1e9,
                 load_s, " [SYNTHETIC TWIN: random weights]" if info.synthetic else "")
        prompt = prompt_tokens(model, info.synthetic, max_depth)
        step_tok = prompt[-1]
        for label, depth in contexts:
            sensors_before = device.sample_sensors()
            new = prompt[plain.n_past:depth]
            with tqdm(total=len(new), desc=f"prefill {label} ({depth})", unit="tok", leave=False,
                      disable=None) as bar:
                t0 = time.perf_counter()
                for i in range(0, len(new), a.batch_size):
                    plain.prefill(new[i:i + a.batch_size])
                    bar.update(len(new[i:i + a.batch_size]))
                prefill_s = time.perf_counter() - t0
            prof.copy_state_from(plain)
            n_nodes = cap.discover(prof, step_tok)
            for _ in range(a.warmup):
                plain.step(step_tok)
                cap.step(prof, step_tok)
            for rep in range(a.repeats):
                for s in tqdm(range(a.tokens), desc=f"decode {label} rep {rep + 1}/{a.repeats}", unit="tok",
                              leave=False, disable=None):
                    toks.append((label, plain.n_past, rep, s, "plain", plain.step(step_tok) / 1000.0))
                    p = cap.step(prof, step_tok)
                    toks.append((label, prof.n_past, rep, s, "profiled", p.wall_ns / 1000.0))
                    for seg in p.segments:
                        node = cap.nodes[seg.node_last]
                        rows.append((label, prof.n_past, rep, s, seg.node_first, seg.node_last, node.name,
                                     cap.layers[seg.node_last], node.op, cap.stages[seg.node_last],
                                     seg.time_ns / 1000.0))
                    rows.append((label, prof.n_past, rep, s, -1, -1, "host", -1, "HOST", schema.HOST,
                                 p.host_ns / 1000.0))
            ops_df = pd.DataFrame(rows, columns=list(schema.OP_COLUMNS))
            tok_df = pd.DataFrame(toks, columns=list(schema.TOKEN_COLUMNS))
            summ = report.context_summary(ops_df, tok_df, label)
            summ.update(prefill_s=prefill_s, n_nodes=n_nodes, syncs_per_token=cap.syncs_per_token,
                        sensors_before=sensors_before, sensors_after=device.sample_sensors())
            summaries.append(summ)
            log.info("%-6s depth %5d: plain %.2f ms/token, profiled x%.3f, ffn %.1f%%, attn_kv %.1f%%",
                     label, depth, summ["plain_ms"], summ["overhead_ratio"], summ["stage_pct"]["ffn"],
                     summ["stage_pct"]["attn_kv"])
        model_meta = {"desc": model.desc, "n_params": model.n_params, "size_bytes": model.size_bytes}
    sweep_s = time.perf_counter() - t_start
    label = a.label or default_label(dev)
    meta = {
        "harness_version": __version__, "engine": "llama.cpp via llama-cpp-python",
        "engine_version": engine.engine_version(), "system_info": engine.system_info(),
        "backend_devices": engine.backend_devices(), "complete": True, "label": label,
        "synthetic": info.synthetic,
        "params": {"contexts": [{"label": k, "depth": v} for k, v in contexts], "tokens": a.tokens,
                   "repeats": a.repeats, "warmup": a.warmup, "threads": threads, "flash_attn": a.flash_attn,
                   "cache_type_k": a.cache_type_k, "cache_type_v": a.cache_type_v, "n_gpu_layers": a.n_gpu_layers,
                   "n_batch": a.batch_size, "n_ubatch": a.ubatch_size, "mode": a.mode, "n_ctx": n_ctx,
                   "depth_control": "rollback"},
        "model": {"path": str(model_path), "file_bytes": info.file_bytes, "content_hash": content_hash(model_path),
                  "arch": info.arch, "name": info.name, "synthetic": info.synthetic, "twin_preset": info.twin_preset,
                  "type_summary": info.type_summary(), "engine_desc": model_meta["desc"],
                  "n_params": model_meta["n_params"], "gguf": info.to_dict()},
        "device": {**dev, "bandwidth": bandwidth, "peak_rss_bytes": device.peak_rss_bytes()},
        "timing": {"load_s": load_s, "sweep_s": sweep_s, "prefill_tokens": max_depth},
        "contexts": summaries,
        "tokens": [list(t) for t in toks],
    }
    ops_df = pd.DataFrame(rows, columns=list(schema.OP_COLUMNS))
    path = store.write_run(ops_df, meta, out_dir, store.run_filename(label, model_path.stem))
    sys.stdout.write(report.format_summary(summaries, a.mode) + "\n")
    log.info("run written: %s (%d rows, sweep %.1f s%s)", path, len(ops_df), sweep_s,
             "; SYNTHETIC model" if info.synthetic else "")
    return path


def _main(argv: list[str] | None) -> int:
    a = build_parser().parse_args(argv)
    contexts = validate(a)
    if a.model is None:
        model_path = ensure_default_model()
    else:
        model_path = Path(a.model)
    run_sweep(a, contexts, model_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("harness.sweep", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
