"""Device metadata and a memory-read bandwidth probe (the device's roofline).

The probe must be memory-bound: it or-reduces a u64 buffer far larger than the last-level
cache from one thread per core (numpy releases the GIL inside the reduction). Plain
``numpy.sum`` is compute-bound at ~20 GB/s per thread here and would understate the roofline.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

log = logging.getLogger(__name__)
# psutil.cpu_freq() reads the live clock only from Linux cpufreq (or Windows); elsewhere (a VM without cpufreq,
# macOS) it returns a static nominal figure, which must not be recorded as a measured clock
LIVE_CLOCK = sys.platform == "win32" or Path("/sys/devices/system/cpu/cpu0/cpufreq").is_dir()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


THREAD_ENV_PREFIXES = ("OMP_", "GOMP_", "KMP_", "GGML_")


def thread_env() -> dict[str, str]:
    """Environment variables that steer the OpenMP runtime or ggml (thread placement, wait policy), as set."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(THREAD_ENV_PREFIXES)}


def device_info() -> dict:
    try:
        freq = psutil.cpu_freq() if hasattr(psutil, "cpu_freq") else None
    except (OSError, AttributeError, NotImplementedError):  # cpufreq folders without a current-frequency file
        freq = None
    return {
        "os": platform.platform(),
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cores": psutil.cpu_count(logical=True) or 1,
        "cpu_max_mhz": float(freq.max) if freq and freq.max else None,
        "ram_bytes": int(psutil.virtual_memory().total),
        "python": platform.python_version(),
    }


def sample_sensors() -> dict:
    """CPU frequency and temperature now, where psutil can read them (None otherwise)."""
    out: dict = {"cpu_mhz": None, "temp_c": None, "t_unix": time.time()}
    try:
        f = psutil.cpu_freq() if LIVE_CLOCK else None
        out["cpu_mhz"] = float(f.current) if f else None
    except (OSError, AttributeError, NotImplementedError):
        pass
    try:
        temps = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
        vals = [t.current for entries in temps.values() for t in entries if t.current]
        out["temp_c"] = max(vals) if vals else None
    except (OSError, AttributeError, NotImplementedError):
        pass
    return out


def cpu_counters() -> dict:
    """Cumulative CPU seconds now, summed over every logical CPU: steal (hypervisor; None where the OS does not
    report it), busy (all processes) and this process's own (all its threads)."""
    t = psutil.cpu_times()
    busy = sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "interrupt", "dpc"))
    own = psutil.Process().cpu_times()
    steal = getattr(t, "steal", None)
    return {"steal_s": None if steal is None else float(steal), "busy_s": float(busy),
            "own_s": float(own.user + own.system), "t": time.perf_counter()}


def noise_between(before: dict, after: dict) -> dict:
    """Steal and other processes' CPU seconds between two ``cpu_counters`` samples, and the wall time."""
    others = (after["busy_s"] - before["busy_s"]) - (after["own_s"] - before["own_s"])
    steal = None if after["steal_s"] is None or before["steal_s"] is None else after["steal_s"] - before["steal_s"]
    return {"wall_s": after["t"] - before["t"], "steal_s": None if steal is None else max(0.0, steal),
            "others_cpu_s": max(0.0, others)}


def _or_reduce(a: np.ndarray) -> int:
    return int(np.bitwise_or.reduce(a))


def _timed_pass(buf: np.ndarray, parts: list[np.ndarray]) -> float:
    """GB/s of one pass over ``buf``, one thread per part. Fresh threads each pass (a pool may leave one worker
    doing every part); they start first and wait at a barrier, and the clock starts when it opens, so thread
    start-up (handed over one thread at a time) is not timed as reading."""
    gate = threading.Barrier(len(parts) + 1)

    def read(p: np.ndarray) -> None:
        gate.wait()
        _or_reduce(p)

    ths = [threading.Thread(target=read, args=(p,)) for p in parts]
    for th in ths:
        th.start()
    gate.wait()
    t0 = time.perf_counter()
    for th in ths:
        th.join()
    return buf.nbytes / (time.perf_counter() - t0) / 1e9


def measure_bandwidth(threads: int | None = None, buffer_bytes: int | None = None, budget_s: float = 1.2) -> dict:
    """Best-of-N multi-threaded u64 or-reduce read bandwidth in GB/s, within ~budget_s.

    The buffer is 512 MiB (or an eighth of available RAM, if less): far past any cache.
    """
    threads = threads or physical_cores()
    if buffer_bytes is None:
        buffer_bytes = min(512 << 20, psutil.virtual_memory().available // 8)
    buf = np.ones(buffer_bytes // 8, dtype=np.uint64)
    parts = np.array_split(buf, threads)

    _timed_pass(buf, parts)  # warm-up
    passes: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(passes) < 3 or (time.perf_counter() < t_end and len(passes) < 200):
        passes.append(_timed_pass(buf, parts))
    best, reps = max(passes), len(passes)
    log.debug("bandwidth probe: %.1f GB/s (%d threads, %d reps)", best, threads, reps)
    return {"read_gbps": best, "median_gbps": float(np.median(passes)), "threads": threads,
            "buffer_bytes": buffer_bytes, "reps": reps, "method": "u64 bitwise_or.reduce, best of reps"}


def peak_rss_bytes() -> int:
    try:
        import resource

        rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB
    except (ImportError, OSError):
        return int(psutil.Process().memory_info().rss)
