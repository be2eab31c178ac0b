"""The budget summary a private run ends with (the same report as ``fedvault audit``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedvault.config import RunConfig
from fedvault.privacy.audit import audit_run, plot_epsilon, render_table, to_json

EPSILON_PLOT = "privacy_epsilon.png"


def audit_for_config(run_dir: Path, cfg: RunConfig):
    """Audit ``run_dir``'s ledger against the caps in ``cfg``."""
    p = cfg.privacy
    return audit_run(
        run_dir, p.target_delta,
        epsilon_cap=p.target_epsilon if p.sample_level else None,
        client_level_epsilon_cap=p.client_level_target_epsilon if p.client_level else None,
    )


def privacy_summary(run_dir: Path, cfg: RunConfig) -> tuple[dict[str, Any], str]:
    """(JSON-able report, printable table); also writes the epsilon-per-round plot."""
    report = audit_for_config(run_dir, cfg)
    plot_epsilon(report, run_dir / EPSILON_PLOT)
    return json.loads(to_json(report)), "privacy budget:\n" + render_table(report)
