"""Benchmark: ``analysis.compare`` over fleets of 300, 1,000 and 10,000 runs with each fleet engine.

The fleet is synthesised from two real tiny-twin sweeps (1 and 2 threads; made here unless
--source is given): every run is a copy of one of them with its device label, hostname and time
rewritten and its timings (metadata summaries and the op table's ``time_us``) scaled by a random
factor (lognormal, sigma 5 %), written Hive-style (``device=<label>/model=<stem>/<time>.parquet``)
with ``harness.store.run_path``. Ten runs per device, five per thread count: 10,000 runs are
1,000 devices and 2,000 groups. The fleet is written in nested parts (300, +700, +9,000), so the
smaller fleets are prefixes of the larger; about 200 kB per run (2.0 GB for 10,000) in a temp folder
that is removed at the end (or kept with --keep DIR, and reused when it is already there).

Prints, per size and engine, the wall time and CPU time (user + system, all threads) of the whole
command (``python -m analysis.compare PARTS... --engine E --format csv``: start-up, imports,
footers, slopes over every timed token, output) with the load average before it (the CPU time
is the figure that other work on the machine disturbs least), and checks that both engines
printed the same table.

    python bench/fleet_bench.py [--sizes 300,1000,10000] [--engines pandas,duckdb] [--source RUN ...] [--keep DIR]
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from across import last_line, tiny_run  # noqa: E402

from analysis.fleet import ENGINES  # noqa: E402
from harness.cli import ArgParser, folder_arg, run_cli  # noqa: E402
from harness.errors import InputError, OutputError, UsageError  # noqa: E402
from harness.store import META_KEY, read_record, run_path  # noqa: E402

RUNS_PER_DEVICE = 10
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
_SOURCES: list[tuple[pa.Table, dict]] = []


def make_sources(tmp: Path) -> list[Path]:
    from harness.twin import write_twin

    model = write_twin("tiny", "q4_k_m", tmp / "tiny.gguf")
    return [tiny_run(model, tmp / f"source-{threads}t", threads) for threads in (1, 2)]


def _load_sources(paths: list[Path]) -> None:
    _SOURCES[:] = []
    for p in paths:
        t = pq.read_table(p)
        _SOURCES.append((t, json.loads(t.schema.metadata[META_KEY])))


def check_sources(paths: list[Path]) -> None:
    """Load and copy (in memory) each source here, before the pool starts: a worker whose initializer fails is
    restarted by the pool for ever. InputError, one line, for a source that cannot be copied."""
    for p in paths:
        read_record(p)  # InputError: missing, a folder, not Parquet, no or bad run metadata
        try:
            _load_sources([p])
            copy_run(0)
        except (KeyError, TypeError, ValueError, AttributeError, OSError, pa.ArrowException) as e:
            raise InputError(f"cannot copy --source run ({type(e).__name__}: {e}; a run of an older schema?): "
                             f"{p}") from None
        finally:
            _SOURCES.clear()


def _scaled(d: dict, f: float) -> dict:
    return {k: v * f if isinstance(v, float) else v for k, v in d.items()}


def copy_run(i: int) -> tuple[pa.Table, str, dict]:
    """Run ``i`` of the fleet: (its table, its device label, the source's metadata)."""
    table, meta = _SOURCES[i % len(_SOURCES)]
    f = float(np.random.default_rng(i).lognormal(0.0, 0.05))
    label = f"dev-{i // RUNS_PER_DEVICE:04d}"
    ctxs = [{**c, **_scaled({k: c[k] for k in ("plain_ms", "plain_ms_median", "plain_ms_std", "profiled_ms")}, f),
             "stage_ms": _scaled(c["stage_ms"], f), "stage_ms_calibrated": _scaled(c["stage_ms_calibrated"], f)}
            for c in meta["contexts"]]
    m = {**meta, "label": label, "contexts": ctxs, "device": {**meta["device"], "hostname": f"host-{label}"}}
    t = table.set_column(table.schema.get_field_index("time_us"), "time_us", pc.multiply(table["time_us"], f))
    return t.replace_schema_metadata({**table.schema.metadata, META_KEY: json.dumps(m).encode()}), label, meta


def write_run(i: int, root: Path) -> None:
    t, label, meta = copy_run(i)
    p = run_path(root, label, Path(meta["model"]["path"]).stem, "hive", T0 + timedelta(minutes=i))
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, p, compression="zstd")


def _write_chunk(args: tuple[int, int, str]) -> None:
    lo, hi, root = args
    for i in range(lo, hi):
        write_run(i, Path(root))


def write_fleet(sources: list[Path], parts: list[tuple[Path, int, int]]) -> None:
    jobs = [(lo + k, min(hi, lo + k + 250), str(root)) for root, lo, hi in parts for k in range(0, hi - lo, 250)]
    try:
        with Pool(min(2, os.cpu_count() or 1), initializer=_load_sources, initargs=(sources,)) as pool:
            pool.map(_write_chunk, jobs)
    except OSError as e:
        raise OutputError(f"cannot write the fleet ({e.strerror or e}): {parts[0][0].parent}") from None


SETTLE_S = 10.0  # pause after writing a fleet, once its pages are on disk, before timing anything


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_compare(roots: list[Path], engine: str) -> tuple[float, float, str]:
    """(wall s, CPU s of the command, its CSV)."""
    t0, c0 = time.perf_counter(), _child_cpu()
    r = subprocess.run([sys.executable, "-m", "analysis.compare", *map(str, roots), "--engine", engine,
                        "--format", "csv"], cwd=ROOT, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - c0
    if r.returncode != 0:
        raise InputError(f"compare --engine {engine} failed: {last_line(r)}")
    return wall, cpu, r.stdout


def same_table(a: str, b: str) -> bool:
    da, db = (pd.read_csv(io.StringIO(s)) for s in (a, b))
    try:
        pd.testing.assert_frame_equal(da, db, rtol=1e-6)
    except AssertionError:
        return False
    return True


def _positive_ints(spec: str, flag: str) -> list[int]:
    try:
        vals = sorted({int(s) for s in spec.split(",")})
    except ValueError:
        vals = []
    if not vals or vals[0] < 1:
        raise UsageError(f"{flag}: a comma list of positive counts, got {spec!r}")
    return vals


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="fleet_bench.py", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="300,1000,10000", help="fleet sizes (each a multiple of 10)")
    ap.add_argument("--engines", default="pandas,duckdb")
    ap.add_argument("--source", type=Path, nargs="+", default=None, help="runs to copy (default: two tiny sweeps)")
    ap.add_argument("--keep", type=folder_arg, default=None, help="write (or reuse) the fleet here and keep it")
    a = ap.parse_args(argv)
    sizes = _positive_ints(a.sizes, "--sizes")
    engines = a.engines.split(",")
    if not set(engines) <= set(ENGINES[1:]):
        raise UsageError(f"--engines: a comma list of {' and '.join(ENGINES[1:])}, got {a.engines!r}")
    if a.source:
        check_sources(a.source)
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    try:
        base = a.keep or tmp / "fleet"
        bounds = [0, *sizes]
        parts = [(base / f"part-{lo:05d}-{hi:05d}", lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False)]
        todo = [p for p in parts if not p[0].exists()]
        if todo:
            t0 = time.perf_counter()
            write_fleet(a.source or make_sources(tmp), todo)
            du = sum(f.stat().st_size for f in base.rglob("*.parquet")) / 1e9
            print(f"wrote {sum(hi - lo for _, lo, hi in todo):,} runs in {time.perf_counter() - t0:.1f} s "
                  f"({du:.2f} GB under {base})")
            os.sync()  # the first compare right after writing read 13 s instead of 8: disk writeback competed
            time.sleep(SETTLE_S)
        for k, n in enumerate(sizes):
            roots = [p[0] for p in parts[: k + 1]]
            found = sum(1 for r in roots for _ in r.rglob("*.parquet"))
            if found != n:  # a kept folder from another --sizes, or a half-written one
                raise InputError(f"{found:,} runs under {', '.join(map(str, roots))}, expected {n:,}: remove them")
            outs = {}
            for engine in engines:
                load = os.getloadavg()[0]
                wall, cpu, outs[engine] = run_compare(roots, engine)
                rows = len(outs[engine].splitlines()) - 1
                print(f"{n:>6,} runs ({n // RUNS_PER_DEVICE:,} devices, {rows:,} table rows) --engine {engine:<6}: "
                      f"{wall:6.2f} s wall, {cpu:6.2f} s CPU (load average before: {load:.1f})", flush=True)
            if len(outs) > 1:
                first, *rest = outs.values()
                print(f"{n:>6,} runs: engines agree: {all(same_table(first, o) for o in rest)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("fleet_bench.py", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
