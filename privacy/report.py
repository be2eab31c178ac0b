"""The ledger header a run's config implies, and the budget summary a private run ends with.

The audit of a whole run directory (config, anchors from checkpoints and summary, the server's
key) is :func:`fedvault.server.run_audit.audit`, the front door's ``fedvault.audit``: it needs the
server's identity and checkpoints, which this package does not know about.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedvault.config import RunConfig
from fedvault.privacy.anchors import TrustedKey
from fedvault.privacy.audit import AuditReport, audit_run, plot_epsilon, render_table, to_json
from fedvault.privacy.ledger import LedgerHeader

EPSILON_PLOT = "privacy_epsilon.png"


def ledger_header(cfg: RunConfig, run: str) -> LedgerHeader:
    """The header a ledger of ``run`` under ``cfg`` starts with: delta, and the caps of the DP levels on."""
    p = cfg.privacy
    return LedgerHeader(
        run=run,
        target_delta=p.target_delta,
        epsilon_cap=p.target_epsilon if p.sample_level else None,
        client_level_epsilon_cap=p.client_level_target_epsilon if p.client_level else None,
    )


def audit_for_config(
    run_dir: Path,
    cfg: RunConfig,
    run: str,
    trusted: TrustedKey | None,
    anchors: Sequence[tuple[str, Any]],
    node_ledgers: Sequence[str | Path] = (),
) -> AuditReport:
    """Audit ``run_dir``'s ledger, flagging where ``cfg`` (its ``config.toml``) differs from the ledger's header."""
    return audit_run(
        run_dir, trusted=trusted, anchors=anchors, config_header=ledger_header(cfg, run), node_ledgers=node_ledgers
    )


def privacy_summary(
    run_dir: Path, cfg: RunConfig, run: str, trusted: TrustedKey, anchors: Sequence[tuple[str, Any]]
) -> tuple[dict[str, Any], str]:
    """(JSON-able report, printable table); also writes the epsilon-per-round plot."""
    report = audit_for_config(run_dir, cfg, run, trusted, anchors)
    plot_epsilon(report, run_dir / EPSILON_PLOT)
    return json.loads(to_json(report)), "privacy budget:\n" + render_table(report)
