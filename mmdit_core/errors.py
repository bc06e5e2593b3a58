"""The one kind of error a user fixes, not a developer: bad input (a missing or wrong path, a config value
that cannot run, an empty source, a stale cache, a damaged checkpoint). The commands print its message
as one line and exit 2 (experiments/cli.py, `run`); every other exception is a bug and keeps its traceback."""

from __future__ import annotations


class InputError(ValueError):
    """Input the user can correct; the message names what is wrong and, where it can, the fix."""


class MissingInput(InputError, FileNotFoundError):
    """An input file or directory that is not there (still a FileNotFoundError to callers that expect one)."""
