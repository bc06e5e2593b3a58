"""Shared command-line plumbing: --config / --set parsing that refuses a bad config before any work, and
the --tracking-uri option."""

from __future__ import annotations

import argparse

from mmdit_core.config import ConfigError, ExperimentConfig, load_config


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
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
