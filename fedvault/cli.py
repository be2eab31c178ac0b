"""The ``fedvault`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedvault import __version__
from fedvault.cli_config import add_config_args, config_epilog
from fedvault.config import RunConfig
from fedvault.errors import FedvaultError
from fedvault.logs import show_progress

EXIT_USAGE = 2


def _cmd_simulate(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f'run-dir="{args.out}"'] if args.out else [])
    cfg = RunConfig.from_sources(args.config, overrides)  # config errors before torch, Flower and Ray load
    from fedvault.simulations.harness import simulate

    result = simulate(cfg, verbose=args.verbose)
    s = result.summary
    final = f"{s['final_accuracy']:.4f}" if s["final_accuracy"] is not None else "n/a"
    print(
        f"done: {s['rounds']} rounds in {s['wall_seconds']:.1f}s; centralized accuracy "
        f"{s['initial_accuracy']:.4f} -> {final}; run directory: {result.path}"
    )
    return 1 if s.get("stopped") and s["rounds"] == 0 else 0


def _cmd_strategies(args: argparse.Namespace) -> int:
    from fedvault.strategies.registry import format_strategies, list_strategies

    print(format_strategies(list_strategies()))
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from fedvault.privacy.audit import plot_epsilon, render_table, to_csv, to_json
    from fedvault.privacy.report import EPSILON_PLOT, audit

    report = audit(args.run_dir)
    if args.json:
        print(to_json(report))
    elif args.csv:
        print(to_csv(report), end="")
    else:
        print(render_table(report))
        print(f"plot: {plot_epsilon(report, Path(args.run_dir) / EPSILON_PLOT)}")
    if report.exceeded:
        print(f"fedvault audit: cap exceeded by {', '.join(report.exceeded)}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedvault", description="Federated, privacy-preserving training on Flower, PyTorch and Opacus."
    )
    parser.add_argument("--version", action="version", version=f"fedvault {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    simulate = sub.add_parser(
        "simulate",
        help="run many clients on this machine (Flower Simulation Engine)",
        description="Run a federated simulation on this machine and write a run directory "
        "(config.toml, metrics.jsonl, summary.json, model.pt, accuracy.png, loss.png).",
        epilog=config_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(simulate)
    simulate.add_argument("--out", metavar="DIR", help="run directory (default runs/<time>-<task>)")
    simulate.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    simulate.set_defaults(func=_cmd_simulate)

    strategies = sub.add_parser(
        "strategies",
        help="list the strategies a config can name, with parameters",
        description="Strategies for strategy.name, with their strategy.<param> keys and defaults.",
    )
    strategies.set_defaults(func=_cmd_strategies)

    audit = sub.add_parser(
        "audit",
        help="privacy budget report of a run; verifies the ledger's hash chain",
        description="Verify RUN_DIR/privacy_ledger.jsonl (exit 2 naming the first bad entry if it was altered) and "
        "report per client: rounds, epsilon by PLD (the claim), PRV and RDP (cross-checks), delta, cap, remaining; "
        "the run's client-level epsilon; a plot of epsilon per round. Exit 1 if any cap was exceeded.",
    )
    audit.add_argument("run_dir", metavar="RUN_DIR")
    fmt = audit.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fmt.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    audit.set_defaults(func=_cmd_audit)

    from fedvault.deploy.cli import add_deploy_commands

    add_deploy_commands(sub)
    return parser


def _log_to_console() -> None:
    """fedvault's own INFO lines on stderr; other libraries stay at their defaults."""
    show_progress(logging.INFO)


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
