"""Shared command-line plumbing: --config / --set parsing that refuses a bad config before any work, the
--tracking-uri option, and `run_command`, every command's entry point (user errors as one line, bugs with
a traceback)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
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


def run_command(main: Callable[[], Any]) -> None:
    """A command's entry point: bad input (InputError) prints one line naming it and exits with status 2;
    any other exception is a bug and keeps its traceback."""
    try:
        main()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
