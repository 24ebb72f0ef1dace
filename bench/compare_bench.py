"""Benchmark: ``analysis.compare`` over a fleet of 300 runs.

The runs are copies of one real tiny-twin sweep (made here unless --source is given) with the
device label (and, so that analysis.fleet does not read them as copies of one run, the load time)
rewritten in the Parquet metadata (the op table is kept): 100 labels x 3 runs, so pooling is
exercised. Prints the wall time of the compare (in-process and as a CLI).

    python bench/compare_bench.py [--runs 300] [--source RUN.parquet] [--plots]
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from across import last_line, tiny_run  # noqa: E402

from analysis import compare  # noqa: E402
from harness.cli import ArgParser, run_cli  # noqa: E402
from harness.errors import InputError, UsageError  # noqa: E402
from harness.store import META_KEY, read_record  # noqa: E402


def make_source(tmp: Path) -> Path:
    from harness.twin import write_twin

    model = write_twin("tiny", "q4_k_m", tmp / "tiny.gguf")
    return tiny_run(model, tmp / "source")


def write_fleet(source: Path, out: Path, n_runs: int, per_label: int = 3) -> None:
    table = pq.read_table(source)
    meta = json.loads(table.schema.metadata[META_KEY])
    for i in range(n_runs):
        label = f"device-{i // per_label:03d}"
        m = {**meta, "label": label, "device": {**meta["device"], "hostname": f"host-{i // per_label:03d}"},
             "timing": {**meta["timing"], "load_s": meta["timing"]["load_s"] + i / 1000}}  # not a copy to read once
        t = table.replace_schema_metadata({**table.schema.metadata, META_KEY: json.dumps(m).encode()})
        d = out / label
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, d / f"20260101T0000{i % 60:02d}Z_{label}_tiny-{i}.parquet", compression="zstd")


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="compare_bench.py", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--source", type=Path, default=None, help="a run to copy (default: sweep the tiny twin)")
    ap.add_argument("--plots", action="store_true", help="also time --plots")
    a = ap.parse_args(argv)
    if a.runs < 1:
        raise UsageError(f"--runs must be >= 1, got {a.runs}")
    if a.source is not None:
        read_record(a.source)  # InputError: missing, a folder, not Parquet, no or bad run metadata
    with tempfile.TemporaryDirectory(prefix="compare-bench-") as tmp_s:
        tmp = Path(tmp_s)
        source = a.source or make_source(tmp)
        fleet = tmp / "fleet"
        write_fleet(source, fleet, a.runs)
        extra = ["--plots", str(tmp / "plots")] if a.plots else []
        t0 = time.perf_counter()
        with redirect_stdout(io.StringIO()) as buf:
            rc = compare.main([str(fleet), *extra])
        in_proc = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "analysis.compare", str(fleet), "--format", "csv", *extra],
                           cwd=ROOT, capture_output=True, text=True)
        cli = time.perf_counter() - t0
        if rc != 0 or r.returncode != 0:
            raise InputError(f"analysis.compare failed: {last_line(r)}")
        n_rows = len(r.stdout.splitlines()) - 1
        print(f"compare over {a.runs} runs ({a.runs // 3} labels, {n_rows} table rows, "
              f"{len(buf.getvalue()):,} chars of markdown{', plots' if a.plots else ''}): "
              f"in-process {in_proc:.2f} s, CLI (incl. Python start-up and imports) {cli:.2f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("compare_bench.py", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
