"""The budget summary a private run ends with, and :func:`audit`: the same report as ``fedvault audit``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedvault.config import RunConfig
from fedvault.privacy.audit import AuditError, AuditReport, audit_run, plot_epsilon, render_table, to_json
from fedvault.rundir import CONFIG_FILE

EPSILON_PLOT = "privacy_epsilon.png"


def audit(run_dir: str | os.PathLike[str]) -> AuditReport:
    """Audit a run directory against its own records: delta and caps come from its ``config.toml``.

    Verifies the ledger's hash chain (a tampered ledger raises
    :class:`~fedvault.privacy.ledger.LedgerTamperedError`) and returns the report ``fedvault audit``
    prints; ``render_table``, ``to_json`` and ``plot_epsilon`` in :mod:`fedvault.privacy.audit` format
    it. ``run_dir`` may be a :class:`~fedvault.simulations.harness.SimulationResult`.
    """
    path = Path(os.fspath(run_dir))
    if not (path / CONFIG_FILE).is_file():
        raise AuditError(f"{path} is not a run directory (no {CONFIG_FILE})")
    return audit_for_config(path, RunConfig.from_sources(path / CONFIG_FILE))


def audit_for_config(run_dir: Path, cfg: RunConfig) -> AuditReport:
    """Audit ``run_dir``'s ledger against the caps in ``cfg``."""
    p = cfg.privacy
    return audit_run(
        run_dir,
        p.target_delta,
        epsilon_cap=p.target_epsilon if p.sample_level else None,
        client_level_epsilon_cap=p.client_level_target_epsilon if p.client_level else None,
    )


def privacy_summary(run_dir: Path, cfg: RunConfig) -> tuple[dict[str, Any], str]:
    """(JSON-able report, printable table); also writes the epsilon-per-round plot."""
    report = audit_for_config(run_dir, cfg)
    plot_epsilon(report, run_dir / EPSILON_PLOT)
    return json.loads(to_json(report)), "privacy budget:\n" + render_table(report)
