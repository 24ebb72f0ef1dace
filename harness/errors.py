"""User-facing errors: each prints as one line (``harness.cli``) and carries its exit code."""

from __future__ import annotations

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


class OutputError(HarnessError):
    """An output could not be written (folder not writable, disk full): the environment, not the flags."""
