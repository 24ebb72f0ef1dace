"""What the report says about a run, read from its typed record: the flags it raised and the device,
model and engine facts. Every read of a run the report makes is here (and in ``analysis.table`` /
``analysis.fleet``).

Flags are the run's own (``RunRecord.flags``: synthetic, incomplete, drift, noise, overhead,
calibration) plus a few the record's fields imply: reference, resumed, no bandwidth probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from analysis.fleet import device_label
from harness.record import Invariants, RunRecord

WARNING, INFO = "warning", "info"
GIB = 1024**3
INFO_KINDS = ("synthetic", "reference", "resumed", "no-roofline")


@dataclass(frozen=True)
class Flag:
    kind: str
    message: str
    level: str = WARNING
    detail: str = ""


def flags(rec: RunRecord) -> list[Flag]:
    """Every flag of a run, warnings first."""
    out = [Flag(f.kind, f.message, INFO if f.kind in INFO_KINDS else WARNING,
                f"context {f.context}" if f.context else "") for f in rec.flags]
    kinds = {f.kind for f in out}
    if rec.synthetic and "synthetic" not in kinds:
        out.append(Flag("synthetic", "Synthetic twin: the real architecture and tensor shapes with random weights. "
                                     "Timings carry over to the real model; the text it produced is noise.", INFO))
    if not rec.complete and "incomplete" not in kinds:
        why = rec.stop_reason or "no reason recorded"
        out.append(Flag("incomplete", f"Incomplete run: the sweep stopped early ({why}); fewer rounds than asked "
                                      "were measured."))
    if rec.reference:
        out.append(Flag("reference", rec.note or "Recorded reference figures, not measured by this harness.", INFO))
    if rec.resumed_from:
        out.append(Flag("resumed", f"Resumed from {rec.resumed_from}.", INFO))
    if not rec.bandwidth_gbps and not rec.reference:
        out.append(Flag("no-roofline", "No bandwidth probe (--no-probe): roofline columns are blank.", INFO))
    return sorted(out, key=lambda f: f.level != WARNING)


BRIEF = {"synthetic": "Synthetic twin: random weights; timings carry over, the text it produced is noise.",
         "incomplete": "Incomplete run: fewer rounds than asked.",
         "drift": "A depth-invariant stage disagrees across depths beyond the run's threshold.",
         "state": "The device changed state during the run.", "noise": "CPU steal or other processes' CPU was high.",
         "overhead": "An implausible profiled/plain ratio in some context.",
         "calibration": "Calibrated stage ms do not add up to the plain ms/token in some context."}


def brief(kind: str, runs: list[str], compared: bool) -> tuple[str, Flag]:
    """A flag kind raised by runs the report does not detail (``--detail``): who, and what the kind means."""
    who = f"{len(runs)} run{'s' * (len(runs) != 1)} not detailed: {', '.join(runs[:5])}{' …' * (len(runs) > 5)}"
    return who, Flag(kind, BRIEF.get(kind, f"Flagged {kind}.") + " The comparison's rows show it." * compared,
                     INFO if kind in INFO_KINDS else WARNING)


def agreement(inv: Invariants) -> str:
    """The invariance figure in words: within the threshold, or beyond it."""
    word = "agree within" if inv.max_disagreement_pct <= inv.threshold_pct else "disagree by up to"
    return f"{word} {inv.max_disagreement_pct:.2f} % (threshold {inv.threshold_pct:g} %)"


def label(rec: RunRecord) -> str:
    return device_label(rec)


def model_name(rec: RunRecord) -> str:
    m = rec.model
    return m.name or (Path(m.path).stem if m.path else m.arch or "unknown model")


def _gib(v) -> str:
    if not isinstance(v, (int, float)):
        return ""
    return f"{v / GIB:.2f} GiB" if v >= GIB / 4 else f"{v / 2**20:.1f} MiB"


def _rows(pairs) -> list[tuple[str, str]]:
    """Drop the facts a run does not have; lists become comma-separated text."""
    out = []
    for k, v in pairs:
        if isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v))
        if v not in (None, "", [], {}):
            out.append((k, str(v)))
    return out


def device_rows(rec: RunRecord) -> list[tuple[str, str]]:
    d, bw = rec.device, rec.device.bandwidth
    probe = (f"{bw.read_gbps:.1f} GB/s read (best; median {bw.median_gbps or float('nan'):.1f}, "
             f"{bw.threads or '?'} threads, {bw.method})") if bw else "not measured"
    return _rows([("device label", label(rec)), ("hostname", d.hostname), ("CPU", d.cpu_model),
                  ("cores", f"{d.physical_cores} physical, {d.logical_cores} logical" if d.physical_cores else None),
                  ("CPU max MHz", d.cpu_max_mhz), ("RAM", _gib(d.ram_bytes)), ("memory bandwidth", probe),
                  ("peak RSS", _gib(d.peak_rss_bytes)), ("OS", d.os), ("machine", d.machine), ("Python", d.python),
                  ("ggml devices", rec.backend_devices)])


def model_rows(rec: RunRecord) -> list[tuple[str, str]]:
    m = rec.model
    total = sum(m.type_summary.values()) or 1
    return _rows([("model", model_name(rec)), ("architecture", m.arch), ("engine sees", m.engine_desc),
                  ("parameters", f"{m.n_params:,}" if m.n_params else None), ("file", m.path),
                  ("file size", _gib(m.file_bytes)), ("content hash", m.content_hash),
                  ("synthetic twin", f"yes (preset {m.twin_preset})" if m.synthetic else "no"),
                  ("tensor types", [f"{k} {v / total:.0%}" for k, v in sorted(m.type_summary.items(),
                                                                               key=lambda kv: -kv[1])])])


def engine_rows(rec: RunRecord) -> list[tuple[str, str]]:
    p, t = rec.params, rec.timing
    fa = p.flash_attn + (f" (resolved: {'on' if p.flash_attn_resolved else 'off'})"
                         if p.flash_attn_resolved is not None else "")
    return _rows([("engine", rec.engine), ("engine version", rec.engine_version),
                  ("harness version", rec.harness_version), ("run schema", rec.schema_version),
                  ("contexts", [f"{c.label} ({c.depth})" for c in p.contexts]),
                  ("rounds (warm-up)", f"{len(rec.rounds) or p.rounds} of {p.rounds}, {p.order} ({p.warmup})"),
                  ("threads", f"{p.threads} ({p.threads_source})"), ("flash attention", fa),
                  ("KV cache types", f"K {p.cache_type_k}, V {p.cache_type_v}"), ("GPU layers", p.n_gpu_layers),
                  ("batch / ubatch", f"{p.n_batch} / {p.n_ubatch}" if p.n_batch else None),
                  ("capture mode", p.mode), ("eval callback", p.callback),
                  ("OpenMP / threadpool", f"{p.openmp} / {p.threadpool}" if p.openmp is not None else None),
                  ("thread environment", " ".join(f"{k}={v}" for k, v in p.thread_env.items()) or None),
                  ("split cost (calibration)", f"{rec.contexts[0].sync_us:.2f} us per split "
                   f"({rec.contexts[0].sync_us_estimator} over rounds)"
                   if rec.contexts and rec.contexts[0].sync_us is not None else None),
                  ("stage shares, every node timed", modes(rec)),
                  ("depth-invariant stages", f"{agreement(rec.invariants)}; {rec.invariants.stage} worst; "
                   f"{rec.invariants.estimator}s over rounds"
                   if rec.invariants and rec.invariants.across_depths else None),
                  ("load / sweep time", f"{t.load_s:.3g} s / {t.sweep_s:.3g} s" if t else None)])


def modes(rec: RunRecord) -> str | None:
    """The largest calibrated share difference between the calibration tokens (every node timed) and the stages
    tokens of the same rounds, over the contexts; None when the run kept no such tokens."""
    cs = [c for c in rec.contexts if c.mode_agreement_pp is not None]
    if not cs:
        return None
    c = max(cs, key=lambda c: c.mode_agreement_pp)
    s, pp, _ = c.mode_worst()
    return f"minus stages mode, paired by round: largest difference {pp:+.2f} points ({s}, depth {c.depth}, " \
           f"{c.ops_rounds} rounds)"


def system_info(rec: RunRecord) -> str:
    """llama.cpp's system info line (CPU features, backends), or '' when the run has none."""
    return f"llama.cpp system info: {rec.system_info}" if rec.system_info else ""
