"""The server's side of ledger anchoring: sign the run ledger's head after every round, and
find the key an audit must trust (format and checks: :mod:`fedvault.privacy.anchors`).

:class:`LedgerAnchorer` signs ``(run, round, entries, head)`` with the server identity key
(:func:`fedvault.server.sealing.server_identity_path`) after every finished round and once more,
``final``, when the run ends; each anchor is appended to ``privacy_ledger.anchors`` (fsync'd)
and returned for the checkpoint and ``summary.json``. A resumed run signs the new head after its
first round, which also covers entries a crash left after the last anchor.

:func:`trusted_key` is what ``fedvault audit`` trusts: ``--server-key`` (a fingerprint or an
``identity.pub`` path), else the public key of the identity the run's config names (its
``identity.pub``, or derived from ``identity.key``), else the one a simulation made in the run dir.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedvault.config import RunConfig
from fedvault.privacy.anchors import ANCHORS_FILENAME, Anchor, TrustedKey, append_anchor, read_anchors, sign_anchor
from fedvault.privacy.ledger import Ledger
from fedvault.rundir import IDENTITY_DIR, SUMMARY_FILE
from fedvault.security.identity import (
    IDENTITY_KEY,
    IDENTITY_PUB,
    IdentityError,
    IdentityPin,
    fingerprint,
    load_identity,
)
from fedvault.server.checkpoint import list_checkpoints, load_checkpoint

#: Where a checkpoint's extras and ``summary.json`` keep the latest anchor.
ANCHOR_KEY = "ledger_anchor"


class LedgerAnchorer:
    """Signs the head of one run's ledger into ``<run-dir>/privacy_ledger.anchors``."""

    def __init__(self, ledger: Ledger, identity: Ed25519PrivateKey, run: str) -> None:
        self.ledger, self.identity, self.run = ledger, identity, run
        self.path = ledger.path.with_name(ANCHORS_FILENAME)
        self.last: Anchor | None = None

    @property
    def trusted(self) -> TrustedKey:
        """This server's own key, for the summary it audits at the end of the run."""
        return TrustedKey(fingerprint(self.identity.public_key()), "this server's identity key")

    def anchor(self, server_round: int, final: bool = False) -> Anchor:
        """Sign and durably store the ledger's current head (after round ``server_round``)."""
        entries, head = self.ledger.head()
        anchor = sign_anchor(
            self.identity, run=self.run, server_round=server_round, entries=entries, head=head, final=final
        )
        append_anchor(self.path, anchor)
        self.last = anchor
        return anchor


def trusted_key(cfg: RunConfig, run_dir: Path, server_key: str | None = None) -> TrustedKey:
    """The key anchors must be signed by, and where it came from (see the module docstring)."""
    if server_key:
        if Path(server_key).expanduser().is_file():
            pin = IdentityPin.from_public_key_file(server_key)
            return TrustedKey(pin.fingerprint, f"--server-key {server_key} (fingerprint {pin.fingerprint})")
        pin = IdentityPin.from_fingerprint(server_key)
        return TrustedKey(pin.fingerprint, f"--server-key fingerprint {pin.fingerprint}")
    key_file = Path(cfg.sealing.identity_key) if cfg.sealing.identity_key else run_dir / IDENTITY_DIR / IDENTITY_KEY
    public_file = key_file.with_name(IDENTITY_PUB)
    if public_file.is_file():
        pin = IdentityPin.from_public_key_file(public_file)
        source = public_file
    elif key_file.is_file():
        pin = IdentityPin(fingerprint(load_identity(key_file).public_key()))
        source = key_file
    else:
        raise IdentityError(
            f"no server identity to verify the ledger's anchors with: neither {public_file} nor {key_file} "
            "exists (pass --server-key FINGERPRINT_OR_IDENTITY_PUB)"
        )
    return TrustedKey(pin.fingerprint, f"{source} from the run's config (fingerprint {pin.fingerprint})")


def anchor_sources(run_dir: Path) -> list[tuple[str, Any]]:
    """``(where, stored anchor)`` from the anchors file, every checkpoint and ``summary.json``."""
    found = read_anchors(run_dir / ANCHORS_FILENAME)
    for _, path in list_checkpoints(run_dir):
        stored = load_checkpoint(path).extra.get(ANCHOR_KEY)
        if stored is not None:
            found.append((f"checkpoint {path.name}", stored))
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        try:
            stored = json.loads(summary.read_text(encoding="utf-8")).get(ANCHOR_KEY)
        except (json.JSONDecodeError, AttributeError):
            stored = {"malformed": True}  # check_anchors names it
        if stored is not None:
            found.append((SUMMARY_FILE, stored))
    return found
