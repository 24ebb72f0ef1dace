"""What the report says about a run, read from its metadata: the flags it raised and the device,
model and engine facts. Every read of run metadata the report makes is here (and in
``analysis.table`` / ``analysis.fleet``), so a typed run record can replace these few functions.

Flags come from the run's own ``flags`` list when present (each a dict with at least ``kind`` and
``message``; an optional ``level``/``severity`` and any other keys are shown as detail) and from
its fields: ``synthetic``, ``complete``/``stop_reason``, ``reference``, ``resumed_from`` and a
missing bandwidth probe. Anything malformed is shown as it is rather than dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from analysis.fleet import device_label
from analysis.table import bandwidth_gbps

WARNING, INFO = "warning", "info"
GIB = 1024**3


@dataclass(frozen=True)
class Flag:
    kind: str
    message: str
    level: str = WARNING
    detail: str = ""


def _listed(item) -> Flag:
    if not isinstance(item, dict):
        return Flag("flag", str(item))
    level = str(item.get("level") or item.get("severity") or WARNING).lower()
    rest = {k: v for k, v in item.items() if k not in ("kind", "message", "level", "severity")}
    return Flag(str(item.get("kind") or "flag"), str(item.get("message") or ""),
                INFO if level in ("info", "note") else WARNING, ", ".join(f"{k}={v}" for k, v in rest.items()))


def flags(meta: dict) -> list[Flag]:
    """Every flag of a run, warnings first."""
    listed = meta.get("flags")
    out = [_listed(f) for f in listed] if isinstance(listed, list) else []
    if listed is not None and not isinstance(listed, list):
        out.append(Flag("flag", f"unreadable flags entry: {listed!r}"))
    kinds = {f.kind for f in out}
    model = meta.get("model") or {}
    if (meta.get("synthetic") or model.get("synthetic")) and "synthetic" not in kinds:
        out.append(Flag("synthetic", "Synthetic twin: the real architecture and tensor shapes with random weights. "
                                     "Timings carry over to the real model; the text it produced is noise."))
    if meta.get("complete") is False and "incomplete" not in kinds:
        why = meta.get("stop_reason") or "no reason recorded"
        out.append(Flag("incomplete", f"Incomplete run: the sweep stopped early ({why}); only the contexts shown "
                                      "were measured."))
    if meta.get("reference") and "reference" not in kinds:
        out.append(Flag("reference", str(meta.get("note") or "Recorded reference figures, not measured by this "
                                                              "harness."), INFO))
    if meta.get("resumed_from"):
        out.append(Flag("resumed", f"Resumed from {meta['resumed_from']}.", INFO))
    if not bandwidth_gbps(meta) and not meta.get("reference"):
        out.append(Flag("no-roofline", "No bandwidth probe (--no-probe): roofline columns are blank.", INFO))
    return sorted(out, key=lambda f: f.level != WARNING)


def label(meta: dict) -> str:
    return device_label(meta)


def model_name(meta: dict) -> str:
    m = meta.get("model") or {}
    return str(m.get("name") or (Path(m["path"]).stem if m.get("path") else m.get("arch") or "unknown model"))


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


def device_rows(meta: dict) -> list[tuple[str, str]]:
    d = meta.get("device") or {}
    bw = (d.get("bandwidth") or {}) if isinstance(d.get("bandwidth"), dict) else {}
    probe = (f"{bw['read_gbps']:.1f} GB/s read (best; median {bw.get('median_gbps', float('nan')):.1f}, "
             f"{bw.get('threads', '?')} threads, {bw.get('method', '')})") if bw.get("read_gbps") else "not measured"
    return _rows([("device label", label(meta)), ("hostname", d.get("hostname")), ("CPU", d.get("cpu_model")),
                  ("cores", f"{d.get('physical_cores')} physical, {d.get('logical_cores')} logical"
                   if d.get("physical_cores") else None),
                  ("CPU max MHz", d.get("cpu_max_mhz")), ("RAM", _gib(d.get("ram_bytes"))),
                  ("memory bandwidth", probe), ("peak RSS", _gib(d.get("peak_rss_bytes"))),
                  ("OS", d.get("os")), ("machine", d.get("machine")), ("Python", d.get("python")),
                  ("ggml devices", meta.get("backend_devices"))])


def model_rows(meta: dict) -> list[tuple[str, str]]:
    m = meta.get("model") or {}
    types = m.get("type_summary") or {}
    total = sum(v for v in types.values() if isinstance(v, (int, float))) or 1
    return _rows([("model", model_name(meta)), ("architecture", m.get("arch")), ("engine sees", m.get("engine_desc")),
                  ("parameters", f"{m['n_params']:,}" if isinstance(m.get("n_params"), int) else None),
                  ("file", m.get("path")), ("file size", _gib(m.get("file_bytes"))),
                  ("content hash", m.get("content_hash")),
                  ("synthetic twin", f"yes (preset {m.get('twin_preset')})" if m.get("synthetic") else "no"),
                  ("tensor types", [f"{k} {v / total:.0%}" for k, v in sorted(types.items(), key=lambda kv: -kv[1])])])


def engine_rows(meta: dict) -> list[tuple[str, str]]:
    p = meta.get("params") or {}
    t = meta.get("timing") or {}
    ctxs = [f"{c.get('label')} ({c.get('depth')})" for c in p.get("contexts") or [] if isinstance(c, dict)]
    return _rows([("engine", meta.get("engine")), ("engine version", meta.get("engine_version")),
                  ("harness version", meta.get("harness_version")), ("run schema", meta.get("schema_version")),
                  ("contexts", ctxs), ("timed tokens x repeats (warm-up)",
                                       f"{p.get('tokens')} x {p.get('repeats')} ({p.get('warmup')})"),
                  ("threads", f"{p.get('threads')} ({p.get('threads_source')})" if p.get("threads_source")
                   else p.get("threads")),
                  ("flash attention", p.get("flash_attn")), ("KV cache types", f"K {p.get('cache_type_k')}, "
                                                                               f"V {p.get('cache_type_v')}"),
                  ("GPU layers", p.get("n_gpu_layers")), ("batch / ubatch", f"{p.get('n_batch')} / {p.get('n_ubatch')}"
                                                          if p.get("n_batch") else None),
                  ("capture mode", p.get("mode")), ("eval callback", p.get("callback")),
                  ("depth control", p.get("depth_control")),
                  ("load / sweep time", f"{t['load_s']:.3g} s / {t['sweep_s']:.3g} s"
                   if isinstance(t.get("load_s"), (int, float)) and isinstance(t.get("sweep_s"), (int, float))
                   else None)])


def system_info(meta: dict) -> str:
    """llama.cpp's system info line (CPU features, backends), or '' when the run has none."""
    info = meta.get("system_info")
    return f"llama.cpp system info: {info}" if info else ""
