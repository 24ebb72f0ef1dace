"""The time model against depths it never saw: fit on the shallow depths of one run, predict the deep ones.

    python bench/predict_bench.py [--model GGUF|tiny] [--contexts 13,172,658,2048,4096,8192]
                                  [--fit 13,172,658,2048] [--rounds 8] [--threads N] [--run RUN.parquet]

Sweeps the model at every context (round-robin, one run; or takes ``--run``), fits
``analysis.timemodel`` on ``--fit`` only, and prints predicted vs measured at every other depth for
the plain ms/token and for attention over the KV cache, with errors against the targets (issue #14:
plain within 5 %, attn_kv within 15 %), and the crossover depths with their intervals. ``--model tiny``
writes the tiny twin to a temporary folder (a smoke test: its depths must stay below 4,096). Nothing is
asserted; the figures are printed and saved as JSON in bench/results/.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from across import run_sweep, save_results  # noqa: E402

from analysis import forecast  # noqa: E402
from harness.cli import ArgParser, run_cli  # noqa: E402
from harness.config import parse_contexts  # noqa: E402
from harness.errors import InputError, UsageError  # noqa: E402
from harness.store import read_run  # noqa: E402

TARGETS = {"plain": 5.0, "attn_kv": 15.0}  # |error| in %, at the held-out depths
DEFAULT_MODEL = ROOT / "models" / "gemma-3n-e4b-q4.gguf"


def sweep(a, model: str, out: Path) -> Path:
    t0 = time.perf_counter()
    run_sweep(["--model", model, "-c", a.contexts, "-r", str(a.rounds), "--label", "predict-bench", "--out", str(out),
               *(["-t", str(a.threads)] if a.threads else [])])
    print(f"sweep of {a.contexts} x {a.rounds} rounds took {time.perf_counter() - t0:.1f} s", flush=True)
    return max(out.glob("*predict-bench_*.parquet"))


def report(path: Path, fit_depths: list[int]) -> dict:
    run = read_run(path)
    tm, dm = forecast.fit_run(run, fit_depths)
    val = forecast.validate(tm, dm)
    held = val[~val["fitted"]]
    if held.empty:
        raise InputError(f"no depth of {path} is held out of the fit {', '.join(map(str, tm.fit_depths))}: "
                         "nothing is validated")
    print(f"\nrun {path}\nfit on {', '.join(map(str, tm.fit_depths))} ({tm.form}; {tm.n_rounds} rounds); "
          f"parameters: " + ", ".join(f"{n} = {v:.4g}" for n, v in zip(tm.param_names, tm.theta, strict=True)))
    for n in tm.notes:
        print(f"  note: {n}")
    rows = []
    print(f"\n{'depth':>6}  {'quantity':<8} {'measured':>9} {'predicted':>10} {'error %':>8}  "
          f"{'95 % interval':>17}  target")
    for r in held.to_dict(orient="records"):
        for key, target in TARGETS.items():
            err = r[f"{key}_error_pct"]
            ok = "met" if abs(err) <= target else "MISSED"
            print(f"{r['depth']:>6}  {key:<8} {r[f'{key}_measured']:>9.3f} {r[f'{key}_predicted']:>10.3f} "
                  f"{err:>+8.2f}  [{r[f'{key}_error_ci_low']:+7.2f}, {r[f'{key}_error_ci_high']:+7.2f}]  "
                  f"|err| <= {target:g} %: {ok}")
            rows.append({"depth": r["depth"], "quantity": key, "measured_ms": r[f"{key}_measured"],
                         "predicted_ms": r[f"{key}_predicted"], "error_pct": err,
                         "error_ci": [r[f"{key}_error_ci_low"], r[f"{key}_error_ci_high"]], "target_pct": target,
                         "met": abs(err) <= target})
    xs = forecast.crossovers(tm)
    print()
    for x in xs:
        print(f"crossover: {x.label:<32} {x.text():>12}  95 % interval {x.ci_text()}  "
              f"({x.crossed_pct:.1f} % of resamples cross)")
    return {"run": str(path), "model": tm.to_dict(), "holdout": rows, "crossovers": [x.to_dict() for x in xs]}


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="predict_bench.py", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="a GGUF, or 'tiny' for the tiny twin")
    ap.add_argument("--contexts", default="13,172,658,2048,4096,8192")
    ap.add_argument("--fit", default="13,172,658,2048", help="fitting depths (the others are held out)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--run", type=Path, default=None, help="an existing run (no sweep)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the sweep's run (default: a temp folder)")
    a = ap.parse_args(argv)
    try:
        fit_depths = sorted({int(x) for x in a.fit.split(",")})
    except ValueError:
        fit_depths = []
    if len(fit_depths) < 2 or fit_depths[0] < 1:
        raise UsageError(f"--fit: a comma list of two or more depths >= 1, got {a.fit!r}")
    if a.rounds < 1 or (a.threads is not None and a.threads < 1):
        raise UsageError("--rounds and --threads must be >= 1")
    if a.run is None:
        depths = [d for _, d in parse_contexts(a.contexts)]  # UsageError for a bad list
        missing = sorted(set(fit_depths) - set(depths))
        if missing:
            raise UsageError(f"--fit depth(s) {', '.join(map(str, missing))} are not in --contexts {a.contexts}")
        if not set(depths) - set(fit_depths):
            raise UsageError(f"--contexts {a.contexts}: no depth is held out of --fit {a.fit}, so nothing is validated")
    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp_s:
        tmp = Path(tmp_s)
        path = a.run
        if path is None:
            model = a.model
            if model == "tiny":
                from harness.twin import write_twin
                model = str(write_twin("tiny", "q4_k_m", tmp / "tiny.gguf"))
            path = sweep(a, model, a.out or tmp)
        result = report(path, fit_depths)
    print()
    save_results("predict", result)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("predict_bench.py", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
