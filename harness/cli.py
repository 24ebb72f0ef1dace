"""The command-line runner every command shares: argparse errors and HarnessErrors become one line
on stderr and an exit code, never a traceback (unless ``--debug``); Ctrl-C and SIGTERM unwind (exit 130,
143) so nothing half-written or temporary stays behind; the one table renderer; ``paused_gc`` for short
commands that read thousands of records."""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from harness.errors import HarnessError, UsageError


class ArgParser(argparse.ArgumentParser):
    """argparse that reports bad usage as a UsageError (one line, exit 2) instead of printing usage."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def folder_arg(text: str) -> Path:
    """argparse ``type`` for a folder that is made if missing (``--keep``): a path that exists as anything but a
    folder is bad usage, refused before any work starts."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"not a folder: {path}")
    return path


def run_cli(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main`` and map HarnessError (and Ctrl-C) to a one-line message on stderr.

    ``--debug`` anywhere in argv re-raises so that the traceback is shown.
    """
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(message)s" if not debug else "%(levelname)s %(name)s: %(message)s",
    )
    # SIGTERM (kill, timeout) unwinds like Ctrl-C, so temp folders and half-written files are cleaned up
    # (Python's default would end the process on the spot); the sweep's own StopFlag takes over while it measures
    install = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN)  # an ignored SIGTERM stays ignored
    previous = signal.signal(signal.SIGTERM, functools.partial(_terminated, os.getpid())) if install else None
    try:
        return main([a for a in args if a != "--debug"])
    except HarnessError as e:
        if debug:
            raise
        sys.stderr.write(f"{prog}: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        sys.stderr.write(f"{prog}: {'terminated' if term else 'interrupted'}\n")
        return 143 if term else 130
    finally:
        if install:  # None: the previous handler was not set from Python (the default)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so ``finally`` blocks run (exit 143)."""


def _terminated(owner: int, signum: int, _frame) -> None:
    if os.getpid() != owner:  # a forked child (a multiprocessing worker) inherited the handler: end as by default
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not break off the clean-up of the first
    raise Terminated


def format_table(head: list[str], rows: list[list[str]], style: str = "md", numeric_from: int = 1) -> str:
    """The one table renderer of every command: ``md`` (GitHub markdown; columns from ``numeric_from`` on are
    right-aligned) or ``text`` (space-padded, right-justified, for terminals)."""
    if style == "md":
        sep = "|" + "|".join("---" if i < numeric_from else "---:" for i in range(len(head))) + "|"
        return "\n".join(["| " + " | ".join(head) + " |", sep, *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows])


@contextlib.contextmanager
def paused_gc():
    """Reading thousands of footers allocates millions of small dicts and records, none in a cycle; the
    cyclic collector, run every few hundred allocations, took ~40 % of that time (10,000 runs: 4.8 ->
    2.9 s without it). It is switched back on (if it was on) at the end; the first collection after that
    still scans what was read (~0.5 s for 10,000 runs), so a short command pauses it for its whole run."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
