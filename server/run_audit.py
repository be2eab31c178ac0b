"""``fedvault.audit(run_dir)``: the privacy audit of a run directory against its own records.

Delta and caps come from the ledger's header (``config.toml`` is compared with it); the ledger
is checked against the anchors the server signed (anchors file, checkpoints, ``summary.json``)
with the key :func:`fedvault.server.anchoring.trusted_key` picks; ``node_ledgers`` (clients'
SQLite files) are merged. Here, not in :mod:`fedvault.privacy`, because it needs the server's
identity and checkpoint formats.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fedvault.config import RunConfig
from fedvault.privacy.anchors import TrustedKey
from fedvault.privacy.audit import AuditError, AuditReport
from fedvault.privacy.report import audit_for_config
from fedvault.rundir import CONFIG_FILE
from fedvault.security.identity import IdentityError
from fedvault.server.anchoring import anchor_sources, trusted_key


def audit(
    run_dir: str | os.PathLike[str], *, server_key: str | None = None, node_ledgers: Sequence[str | Path] = ()
) -> AuditReport:
    """Audit a run directory; ``server_key`` pins the anchor key (fingerprint or ``identity.pub`` path).

    A tampered ledger line raises :class:`~fedvault.privacy.ledger.LedgerTamperedError`; other
    problems are the report's ``findings`` (``report.tampered``, ``report.unverified``).
    ``render_table``, ``to_json`` and ``plot_epsilon`` in :mod:`fedvault.privacy.audit` format it.
    ``run_dir`` may be a :class:`~fedvault.simulations.harness.SimulationResult`.
    """
    path = Path(os.fspath(run_dir))
    if not (path / CONFIG_FILE).is_file():
        raise AuditError(f"{path} is not a run directory (no {CONFIG_FILE})")
    cfg = RunConfig.from_sources(path / CONFIG_FILE)
    trusted: TrustedKey | None
    try:
        trusted = trusted_key(cfg, path, server_key)
    except IdentityError:
        if server_key:
            raise
        trusted = None  # reported as a finding: nothing can be vouched for
    return audit_for_config(path, cfg, path.name, trusted, anchor_sources(path), node_ledgers)
