"""The ``fedvault`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from fedvault import __version__
from fedvault.config import RunConfig, reference
from fedvault.errors import FedvaultError

EXIT_USAGE = 2


def _config_epilog() -> str:
    lines = ["config keys (TOML file or --set key=value; default in brackets):"]
    for key, type_name, default, help_text in reference():
        lines.append(f"  {key:<20} {type_name:<5} [{default!r}]  {help_text}")
    return "\n".join(lines)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="TOML config file (optional; defaults apply otherwise)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set num-server-rounds=5",
    )


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedvault.simulations.harness import simulate

    overrides = list(args.overrides) + ([f'run-dir="{args.out}"'] if args.out else [])
    cfg = RunConfig.from_sources(args.config, overrides)
    run_dir = simulate(cfg, verbose=args.verbose)
    from fedvault.rundir import RunDirectory

    s = RunDirectory(run_dir).summary()
    print(
        f"done: {s['rounds']} rounds in {s['wall_seconds']:.1f}s; centralized accuracy "
        f"{s['initial_accuracy']:.4f} -> {s['final_accuracy']:.4f}; run directory: {run_dir}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedvault",
        description="Federated, privacy-preserving training on Flower, PyTorch and Opacus.",
    )
    parser.add_argument("--version", action="version", version=f"fedvault {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    simulate = sub.add_parser(
        "simulate",
        help="run many clients on this machine (Flower Simulation Engine)",
        description="Run a federated simulation on this machine and write a run directory "
        "(config.toml, metrics.jsonl, summary.json, model.pt, accuracy.png, loss.png).",
        epilog=_config_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(simulate)
    simulate.add_argument("--out", metavar="DIR", help="run directory (default runs/<time>-<task>)")
    simulate.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    simulate.set_defaults(func=_cmd_simulate)
    return parser


def _log_to_console() -> None:
    """fedvault's own INFO lines on stderr; other libraries stay at their defaults."""
    logger = logging.getLogger("fedvault")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_console()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except FedvaultError as exc:
        print(f"fedvault {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fedvault {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
