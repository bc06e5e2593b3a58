"""Shared command-line plumbing: --config / --set parsing that refuses a bad config before any work, the
--tracking-uri option, and `run_command`, every command's entry point (user errors as one line, bugs with
a traceback, SIGTERM as Killed so that open runs end KILLED)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mmdit_core.config import ExperimentConfig, load_config
from mmdit_core.errors import InputError


def add_overrides(
    parser: argparse.ArgumentParser, help: str = "override one field, e.g. --set model.pos_emb=none"
) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=f"{help} (repeatable)"
    )


def add_tracking_uri(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)"
    )


def config_parser(doc: str, default_config: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help="YAML config (defaults apply where omitted)")
    add_overrides(parser)
    return parser


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    """The validated config of --config and --set (a ConfigError, an InputError, names the bad field)."""
    return load_config(args.config, args.overrides)


class Killed(BaseException):
    """SIGTERM reached the driver (BaseException: no library's `except Exception` swallows it)."""


def was_killed(exc: BaseException) -> bool:
    """Killed, or what Killed became when it was raised inside a C extension (Ray's wait turns it into a
    SystemError whose context is the Killed)."""
    return isinstance(exc, Killed) or isinstance(exc.__context__, Killed)


@contextmanager
def sigterm_raises_killed() -> Iterator[None]:
    """SIGTERM raises Killed in this thread for the block. Only the main thread has signal handlers; a Ray
    Tune trial runs fit() in another one, and Tune handles its stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Killed()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(main: Callable[[], Any]) -> None:
    """A command's entry point: bad input (InputError) prints one line naming it and exits with status 2;
    any other exception is a bug and keeps its traceback; SIGTERM ends the open MLflow runs KILLED and
    exits with 143."""
    try:
        with sigterm_raises_killed():
            main()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except BaseException as exc:
        if not was_killed(exc):
            raise
        print("killed (SIGTERM)", file=sys.stderr)
        raise SystemExit(143) from None
