"""Command-line pieces every config-taking command shares: the positional config file, ``--set``, and
the epilog listing every key (``fedvault simulate`` and ``fedvault server`` use both)."""

from __future__ import annotations

import argparse

from fedvault.config import reference


def config_epilog() -> str:
    """Every config key with its type, default and help, for ``--help``."""
    lines = ["config keys (TOML file or --set key=value; default in brackets):"]
    for key, type_name, default, help_text in reference():
        lines.append(f"  {key:<20} {type_name:<5} [{default!r}]  {help_text}")
    return "\n".join(lines)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The optional TOML config file and repeatable ``--set KEY=VALUE`` overrides."""
    parser.add_argument("config", nargs="?", help="TOML config file (optional; defaults apply otherwise)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set num-server-rounds=5",
    )
