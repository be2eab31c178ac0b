"""The ``fedvault`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedvault import __version__
from fedvault.cli_config import add_config_args, add_verbosity_args, config_epilog
from fedvault.config import RunConfig
from fedvault.errors import ConfigError, FedvaultError
from fedvault.interruption import Interrupted, run_interruptible
from fedvault.logs import show_progress
from fedvault.rundir import RunDirectory, default_run_dir

EXIT_USAGE = 2
EXIT_STOPPED = 3  # the run stopped before its last round (finished rounds are kept)
INTERRUPTED_LOG = "interrupted.log"  # what the engine printed while it shut down after SIGINT/SIGTERM


def _cmd_simulate(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f'run-dir="{args.out}"'] if args.out else [])
    cfg = RunConfig.from_sources(args.config, overrides)  # config errors before torch, Flower and Ray load
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.task)
    from fedvault.progress import Progress
    from fedvault.simulations.harness import simulate, stop_engine

    if args.quiet:
        show_progress(logging.ERROR)
    display = Progress(quiet=args.quiet)
    try:
        resolved = cfg.with_options(run_dir=str(run_dir))
        result = run_interruptible(
            lambda: simulate(resolved, verbose=args.verbose, overwrite=args.overwrite, display=display),
            run_dir / INTERRUPTED_LOG,
        )
    except Interrupted as stop:
        display.close()  # the ServerApp's thread may still be running: its status line goes first
        stop_engine()
        finished = sum(1 for r in RunDirectory(run_dir).rounds() if r["round"] > 0)
        stop.tell(
            f"fedvault simulate: {stop}; {finished} finished rounds are kept in {run_dir} with their checkpoints "
            f"and ledger entries (engine output: {run_dir / INTERRUPTED_LOG}); continue with: "
            f"fedvault simulate --out {run_dir} --set resume=true"
        )
        stop.exit()
    s = result.summary
    final = f"{s['final_accuracy']:.4f}" if s["final_accuracy"] is not None else "n/a"
    print(
        f"done: {s['rounds']} rounds in {s['wall_seconds']:.1f}s; centralized accuracy "
        f"{s['initial_accuracy']:.4f} -> {final}; run directory: {result.path}"
    )
    if s.get("stopped"):
        print(f"fedvault simulate: stopped early after {s['rounds']} rounds: {s['stopped']}", file=sys.stderr)
        return EXIT_STOPPED
    return 0


def _cmd_strategies(args: argparse.Namespace) -> int:
    from fedvault.strategies.registry import format_strategies, format_strategy, list_strategies

    infos = list_strategies()
    if args.name is None:
        print(format_strategies(infos))
        return 0
    chosen = [info for info in infos if info.name == args.name.lower()]
    if not chosen:
        raise ConfigError(f"no strategy named {args.name!r}; known: {', '.join(info.name for info in infos)}")
    print(format_strategy(chosen[0]))
    return 0


EXIT_TAMPERED = 2  # also every other error (FedvaultError), e.g. a ledger line that fails its chain
EXIT_UNVERIFIED = 3


def _cmd_audit(args: argparse.Namespace) -> int:
    from fedvault.privacy.audit import ledger_verdict, plot_epsilon, render_table, to_csv, to_json
    from fedvault.privacy.report import EPSILON_PLOT
    from fedvault.server.run_audit import audit

    report = audit(args.run_dir, server_key=args.server_key, node_ledgers=args.node_ledger)
    if args.json:
        print(to_json(report))
    elif args.csv:
        print(to_csv(report), end="")
    else:
        print(render_table(report))
        print(f"plot: {plot_epsilon(report, Path(args.run_dir) / EPSILON_PLOT)}")
    for finding in report.findings:
        print(f"fedvault audit: {finding.severity} [{finding.code}]: {finding.message}", file=sys.stderr)
    if report.exceeded:
        print(f"fedvault audit: cap exceeded by {', '.join(report.exceeded)}", file=sys.stderr)
    refuted = _empirical(Path(args.run_dir), args.canaries) if args.empirical else False
    return _audit_status(ledger_verdict(report), refuted)


#: The exit status of ``fedvault audit`` (and ``report``) for the ledger's verdict.
VERDICT_STATUS = {
    "verified": 0,
    "no DP": 0,
    "cap exceeded": 1,
    "tampered": EXIT_TAMPERED,
    "unverified": EXIT_UNVERIFIED,
}


def _audit_status(verdict: str, refuted: bool) -> int:
    """Tampering first (2), then a cap exceeded or a claim refuted (1), then unverified (3); else 0."""
    status = VERDICT_STATUS.get(verdict, EXIT_TAMPERED)  # an audit that failed is an error
    return 1 if refuted and status != EXIT_TAMPERED else status


def _cmd_report(args: argparse.Namespace) -> int:
    from fedvault.server.run_report import write_report

    written = write_report(args.run_dir, args.out, server_key=args.server_key)
    print(f"report: {written.path} (privacy: {written.verdict})")
    return _audit_status(written.verdict, written.refuted)


def _empirical(run_dir: Path, canaries: int) -> bool:
    """Run the canary audit of the run's mechanisms, print it; True if it refuted a claim."""
    from fedvault.config import RunConfig
    from fedvault.privacy.empirical_report import empirical_audit_of_run, render_empirical
    from fedvault.rundir import CONFIG_FILE

    print(f"empirical audit: training with {canaries} canaries (a separate run; this takes a while)", flush=True)
    results = empirical_audit_of_run(run_dir, RunConfig.from_sources(run_dir / CONFIG_FILE), canaries)
    print(render_empirical(results), end="")
    return any(r["flagged"] for r in results)


def _add_server_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server-key",
        metavar="PUB_OR_FINGERPRINT",
        help="pin the key the anchors must be signed by: an identity.pub file or its SHA-256 fingerprint "
        "(default: the identity the run's config names, or RUN_DIR/identity/)",
    )


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
        "(config.toml, metrics.jsonl, summary.json, model.pt, accuracy.png, loss.png). An existing run "
        "directory is refused unless resumed (--set resume=true, with the run's own config) or --overwrite. "
        "Exit status: 0 all rounds done; 2 an error; 3 stopped early (budget, too few clients; rounds kept).",
        epilog=config_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(simulate)
    simulate.add_argument("--out", metavar="DIR", help="run directory (default runs/<time>-<task>)")
    add_verbosity_args(simulate, "also show Flower's and Ray's own logs")
    simulate.add_argument(
        "--overwrite",
        action="store_true",
        help="if --out already holds a run, move it aside to <out>.replaced-<time> first (nothing is deleted)",
    )
    simulate.set_defaults(func=_cmd_simulate)

    strategies = sub.add_parser(
        "strategies",
        help="list the strategies a config can name, with parameters",
        description="Strategies for strategy.name, with their strategy.<param> keys and defaults.",
    )
    strategies.add_argument("name", nargs="?", metavar="NAME", help="show one strategy in full")
    strategies.set_defaults(func=_cmd_strategies)

    audit = sub.add_parser(
        "audit",
        help="privacy budget report of a run; verifies the ledger against its signed anchors",
        description="Verify RUN_DIR/privacy_ledger.jsonl: its hash chain, its header (delta and caps; config.toml "
        "must agree) and its head against the server's signed anchors (privacy_ledger.anchors, checkpoints, "
        "summary.json); with --node-ledger, merge the clients' own ledgers. Report per client: rounds, node ids, "
        "dropped (paid for, not aggregated), epsilon by PLD (the claim), PRV and RDP (cross-checks), delta, cap, "
        "remaining; the run's client-level epsilon; a plot of epsilon per round.",
        epilog="exit status: 0 ok; 1 a cap was exceeded (or --empirical measured more than the claim); "
        "2 tampering (an edited, removed or reordered entry, "
        "truncation, an emptied ledger, a rewrite, entries after the final anchor, a config that differs from the "
        "ledger, a node id under several party names or a party claimed by several nodes, node-ledger rows "
        "removed) or any other error; 3 unverified (entries after the last anchor of a run that did not finish, "
        "a spend only a node ledger holds, an unreadable reply, no key). Limit: whoever holds the server's "
        "identity key can re-sign a rewritten ledger.",
    )
    audit.add_argument("run_dir", metavar="RUN_DIR")
    _add_server_key(audit)
    audit.add_argument(
        "--node-ledger",
        metavar="FILE",
        action="append",
        default=[],
        help="a client's SQLite ledger (node-ledger.sqlite) to merge and compare; repeat for several",
    )
    audit.add_argument(
        "--empirical",
        action="store_true",
        help="also measure epsilon with canaries: a separate run of this run's DP mechanism and parameters "
        "(one-run lower bound for DP-SGD, Steinke et al. 2023; one-shot estimate for client-level DP, Andrew et "
        "al. 2024); writes RUN_DIR/empirical_audit.json with the canary seeds; the run's model holds no canaries",
    )
    audit.add_argument(
        "--canaries", type=int, default=1000, metavar="M", help="canaries for --empirical (default 1000)"
    )
    fmt = audit.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fmt.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    audit.set_defaults(func=_cmd_audit)

    report = sub.add_parser(
        "report",
        help="one self-contained HTML page of a run (config, curves, privacy audit, system) for a reviewer",
        description="Write RUN_DIR/report.html (or --out FILE): the run's config, accuracy and loss per round, "
        "the privacy audit of `fedvault audit` (ledger verdict, findings, caps exceeded, epsilon per client and "
        "per round), the empirical audit if `fedvault audit --empirical` was run, and seconds, bytes and clients "
        "per round. The page loads nothing from anywhere (inline CSS, figures as inline PNGs): open it offline "
        "or send it as one file. Nothing else in RUN_DIR is written.",
        epilog="exit status: 2 and no page when config.toml or metrics.jsonl is missing or damaged (naming the "
        "file) or another error stops it; once the page is written, as `fedvault audit`: 0 verified (or no DP); "
        "1 a cap exceeded or the empirical audit refuted the claim; 2 tampering, or a ledger that cannot be "
        "audited; 3 unverified.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--out", metavar="FILE", help="where to write the page (default RUN_DIR/report.html)")
    _add_server_key(report)
    report.set_defaults(func=_cmd_report)

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
    except BrokenPipeError:  # `fedvault audit RUN | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's documented remedy
        return 141


if __name__ == "__main__":
    sys.exit(main())
