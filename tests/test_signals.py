"""SIGTERM unwinds every command (harness.cli.run_cli), is not inherited by forked workers, and reaches a bench
script's child sweep (bench/across.run_child), which the scripts run through one helper (across.run_sweep). Real
processes and real signals. An error mid-sweep keeps the rounds completed before it, as a stop does."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

from harness import store


def _start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, text=True, stdout=-1, stderr=-1)


def test_sigterm_unwinds_a_command_so_its_temp_folder_goes(tmp_path):
    """fleet_bench's temp folder outlived a SIGTERM: Python's default ends the process without unwinding."""
    p = _start("import sys, tempfile, time\nfrom harness.cli import run_cli\ndef main(argv):\n"
               "    with tempfile.TemporaryDirectory(dir=sys.argv[1]) as d: print(d, flush=True); time.sleep(60)\n"
               "raise SystemExit(run_cli('x.py', main, []))\n", str(tmp_path))
    assert (made := Path(p.stdout.readline().strip())).is_dir()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert (p.returncode, err.strip()) == (143, "x.py: terminated") and not made.exists()


def test_a_forked_worker_ends_on_sigterm_as_by_default():
    """multiprocessing's Pool.terminate sends SIGTERM to its workers: they must die of it, not unwind a copy of
    the parent's command (a traceback per worker, exit code 1)."""
    p = _start("import multiprocessing as mp, time\nfrom harness.cli import run_cli\ndef main(argv):\n"
               "    w = mp.get_context('fork').Process(target=time.sleep, args=(60,)); w.start(); time.sleep(0.5)\n"
               "    w.terminate(); w.join(); print(w.exitcode); return 0\n"
               "raise SystemExit(run_cli('x.py', main, []))\n")
    out, err = p.communicate(timeout=60)
    assert (p.returncode, out.strip(), err) == (0, str(-signal.SIGTERM), "")


def test_a_bench_script_passes_sigterm_on_to_its_child_sweep(tmp_path):
    """A sweep run by robust.py saves its completed rounds on SIGTERM; killed outright it saves nothing."""
    child = ("import pathlib, signal, sys, time\nd = pathlib.Path(sys.argv[1])\n"
             "signal.signal(signal.SIGTERM, lambda *a: ((d / 'got').write_text('x'), sys.exit(0)))\n"
             "(d / 'ready').write_text('x'); time.sleep(60)\n")
    p = _start("import sys\nsys.path.insert(0, 'bench')\nfrom across import run_child\n"
               "from harness.cli import run_cli\n"
               "raise SystemExit(run_cli('x.py', lambda argv: run_child([sys.executable, '-c', sys.argv[1], "
               "sys.argv[2]]).returncode, []))\n", child, str(tmp_path))
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert (p.returncode, err.strip()) == (143, "x.py: terminated") and (tmp_path / "got").exists()


def test_bench_scripts_run_their_sweeps_through_one_helper(tiny_gguf, tmp_path):
    """A real tiny sweep lands its run where asked; a failing one is an InputError carrying the sweep's own
    one-line error."""
    import pytest

    sys.path.insert(0, str(ROOT / "bench"))
    import across

    from harness.errors import InputError

    run = across.tiny_run(tiny_gguf, tmp_path / "out", threads=1)
    assert run.parent == tmp_path / "out" and run.suffix == ".parquet"
    with pytest.raises(InputError, match=r"^the source sweep failed: harness.sweep: error: .*missing\.gguf"):
        across.tiny_run(tmp_path / "missing.gguf", tmp_path / "out2")


def test_an_engine_error_mid_sweep_keeps_the_rounds_completed_before_it(tiny_gguf, tmp_path, monkeypatch, capsys):
    from harness import runner, sweep
    from harness.errors import EngineError

    real = runner._profiled

    def failing(res, r, *rest):
        if r == 2:
            raise EngineError("llama_decode failed (injected)")
        return real(res, r, *rest)

    monkeypatch.setattr(runner, "_profiled", failing)
    code = sweep.main(["--model", str(tiny_gguf), "-c", "13,40", "-r", "5", "--warmup", "1", "--no-probe",
                       "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and "injected" in err and "the 2 completed round(s) were saved" in err, err
    (path,) = tmp_path.glob("*.parquet")
    rec = store.read_record(path)
    assert not rec.complete and [r.round for r in rec.rounds] == [0, 1]
    assert {r[2] for r in rec.calibration_stages} == {0, 1}
