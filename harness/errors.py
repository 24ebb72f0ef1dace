"""User-facing errors and the CLI wrapper that turns them into one-line messages and exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

EXIT_INPUT = 1  # bad input file / environment
EXIT_USAGE = 2  # bad command-line usage


class HarnessError(Exception):
    """An error meant for the user: printed as one line, never as a traceback."""

    exit_code = EXIT_INPUT


class InputError(HarnessError):
    """A bad input file or path (missing, corrupt, wrong kind)."""


class UsageError(HarnessError):
    """A bad command-line value."""

    exit_code = EXIT_USAGE


class EngineError(HarnessError):
    """llama.cpp refused the model or the context."""


class ArgParser(argparse.ArgumentParser):
    """argparse that reports bad usage as a UsageError (one line, exit 2) instead of printing usage."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


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
    try:
        return main([a for a in args if a != "--debug"])
    except HarnessError as e:
        if debug:
            raise
        sys.stderr.write(f"{prog}: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
