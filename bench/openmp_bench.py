"""Stage-mode capture overhead with and without OpenMP in llama.cpp's CPU backend.

    python bench/openmp_bench.py [--model models/gemma-3n-e4b-q4.gguf] [--tokens 16] [--depth 128]
                                 [--threads 2] [--extra-splits 200] [--no-threadpool]
                                 [--source SDIST_OR_DIR] [--rebuild]

Builds the installed llama-cpp-python version from source with ``CMAKE_ARGS=-DGGML_OPENMP=OFF`` into
its own venv (``bench/.venv-noomp``, git-ignored; skipped when it already holds that version; the
build log is ``bench/.venv-noomp/build.log``; ``--source`` builds from a local sdist or source tree
instead of the registry), then runs the same measurement in this interpreter and in that venv, one
after the other, each as a subprocess: plain and stage-mode profiled tokens interleaved in one
process, each context with its ggml threadpool attached (``--no-threadpool``: without, an A/B).
With ``--extra-splits K`` it also times profiled tokens with K extra asked boundaries and reports
(wall(K) - wall(0)) / K per split. Prints figures side by side; asserts nothing. Medians over
``--tokens`` tokens: on a shared machine, read them with their spread (p10-p90 of the per-token
profiled/plain ratio is printed too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# only stdlib-light imports here: this file also runs as the measuring child in the no-OpenMP venv, which holds
# llama-cpp-python and gguf but not pandas or pyarrow (so not bench/across.py)
from harness.cli import ArgParser, run_cli  # noqa: E402
from harness.errors import InputError, UsageError  # noqa: E402

NOOMP_VENV = ROOT / "bench" / ".venv-noomp"


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _installed_version(python: Path) -> str | None:
    r = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                       text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def build_noomp(version: str, venv: Path, source: str | None, rebuild: bool) -> Path:
    """The venv's python, with llama-cpp-python ``version`` built without OpenMP (built if missing)."""
    py = _venv_python(venv)
    if not rebuild and py.exists() and _installed_version(py) == version:
        print(f"using the existing no-OpenMP build in {venv}", flush=True)
        return py
    if not py.exists():
        r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if r.returncode != 0:
            raise InputError(f"cannot make the venv: {(r.stderr.strip().splitlines() or ['?'])[-1]}: {venv}")
    spec = source or f"llama-cpp-python=={version}"
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_OPENMP=OFF"}
    log = venv / "build.log"
    print(f"building {spec} with CMAKE_ARGS=-DGGML_OPENMP=OFF into {venv} "
          f"(several minutes; log: {log.relative_to(ROOT)})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        cmd = [str(py), "-m", "pip", "install", "-v", "--no-cache-dir", "--force-reinstall",
               "--no-binary", "llama-cpp-python", spec, "gguf"]
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise InputError(f"the no-OpenMP build failed (exit {r.returncode}); its log: {log}")
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    return py


# ---------------------------------------------------------------- the measurement (child process)
def measure(model_path: str, tokens: int, depth: int, threads: int, extra: int, threadpool: bool) -> dict:
    from harness import engine
    from harness.capture import Capture

    with engine.Model(model_path) as m:
        cfg = engine.EngineConfig(threads=threads, n_ctx=depth + 16, threadpool=threadpool)
        cap = Capture("stages")
        prompt = [100 + (i * 7919) % (m.n_vocab - 200) for i in range(depth)]
        tok = prompt[-1]
        with engine.Context(m, cfg) as plain, engine.Context(m, cfg, cap.callback, cap.user_data) as prof:
            plain.prefill(prompt)
            prof.copy_state_from(plain)
            n_nodes = cap.discover(prof, tok)
            for _ in range(2):  # warm-up
                plain.step(tok)
                cap.step(prof, tok)
                cap.step(prof, tok, extra_splits=extra)
            plain_ns, prof_ns, extra_ns, n_extra = [], [], [], 0
            for _ in range(tokens):
                plain_ns.append(plain.step(tok))
                prof_ns.append(cap.step(prof, tok).wall_ns)
                if extra:
                    p = cap.step(prof, tok, extra_splits=extra)
                    extra_ns.append(p.wall_ns)
                    n_extra = p.n_splits - cap.syncs_per_token
            attached = plain.threadpool_attached and prof.threadpool_attached
    ratios = sorted(b / a for a, b in zip(plain_ns, prof_ns, strict=True))
    med = statistics.median
    return {"version": engine.engine_version(), "openmp": engine.openmp_enabled(), "threadpool": attached,
            "callback": cap.backend, "n_nodes": n_nodes, "syncs": cap.syncs_per_token,
            "plain_ms": med(plain_ns) / 1e6, "prof_ms": med(prof_ns) / 1e6, "overhead": med(prof_ns) / med(plain_ns),
            "ratio_p10": ratios[len(ratios) // 10], "ratio_p90": ratios[-1 - len(ratios) // 10],
            "us_per_split": (med(extra_ns) - med(prof_ns)) / 1e3 / n_extra if n_extra else None}


def run_child(python: Path, a: argparse.Namespace) -> dict:
    args = [str(python), str(Path(__file__).resolve()), "--child", "--model", a.model, "--tokens", str(a.tokens),
            "--depth", str(a.depth), "--threads", str(a.threads), "--extra-splits", str(a.extra_splits)]
    args += ["--no-threadpool"] if a.no_threadpool else []
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise InputError(f"the measurement in {python} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="openmp_bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "gemma-3n-e4b-q4.gguf"))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--depth", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra-splits", type=int, default=200, help="extra boundaries for the per-split cost (0: skip)")
    ap.add_argument("--no-threadpool", action="store_true", help="let llama.cpp make its threads per graph (A/B)")
    ap.add_argument("--venv", type=Path, default=NOOMP_VENV)
    ap.add_argument("--source", help="build from this sdist or source tree instead of the registry")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the no-OpenMP venv even if present")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(measure(a.model, a.tokens, a.depth, a.threads, a.extra_splits, not a.no_threadpool)))
        return 0
    if a.tokens < 1 or a.threads < 1 or a.depth < 1 or a.extra_splits < 0:
        raise UsageError("--tokens, --depth and --threads must be >= 1, --extra-splits >= 0")
    if not Path(a.model).is_file():
        raise InputError(f"no model at {a.model} (make a twin: python -m harness.twin --preset tiny -o PATH)")
    import llama_cpp

    noomp = build_noomp(llama_cpp.__version__, a.venv.resolve(), a.source, a.rebuild)
    rows = []
    for label, py in (("this venv", Path(sys.executable)), ("no-OpenMP", noomp)):
        print(f"measuring: {label} ({a.tokens} tokens at depth {a.depth}, {a.threads} threads)", flush=True)
        rows.append((label, run_child(py, a)))
    print(f"\nmodel {a.model}; medians over {a.tokens} interleaved plain/profiled tokens")
    print(f"{'build':10} {'version':8} {'OpenMP':6} {'pool':4} {'hook':6} {'syncs':>5} {'plain ms':>9} "
          f"{'prof ms':>8} {'overhead':>8} {'p10-p90':>13} {'us/split':>8}")
    for label, r in rows:
        split = f"{r['us_per_split']:8.1f}" if r["us_per_split"] is not None else f"{'-':>8}"
        print(f"{label:10} {r['version']:8} {'on' if r['openmp'] else 'off':6} {'yes' if r['threadpool'] else 'no':4} "
              f"{r['callback']:6} {r['syncs']:5d} {r['plain_ms']:9.2f} {r['prof_ms']:8.2f} x{r['overhead']:<7.3f} "
              f"{r['ratio_p10']:6.3f}-{r['ratio_p90']:6.3f} {split}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("openmp_bench.py", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
