"""Signed anchors of the run ledger's head: what makes truncation, appends and rewrites visible.

After every round (and once more, ``final``, when the run ends) the server signs the ledger's
head with its Ed25519 identity key (RFC 8032; the key ``sealing.identity-key`` names, or the one a
simulation makes in ``<run-dir>/identity/``). The signed statement is ``canonical JSON {"v": 1,
"type": "ledger-anchor", "run", "round", "entries", "head", "final", "identity" (raw public key,
hex)}``; the signature is over ``"fedvault/ledger-anchor/v1\\0" || statement`` (a domain prefix
distinct from the run-key and model signatures of :mod:`fedvault.security.identity`). Anchors are
appended, one JSON line ``{"statement", "signature" (hex)}`` each, fsync'd, to
``privacy_ledger.anchors``; the latest is also kept in each checkpoint and, ``final``, in
``summary.json``.

:func:`check_anchors` compares the ledger with every anchor it is given: an anchor that is
unsigned, signed by another key or for another run, that counts more entries than the ledger
has (truncated, emptied) or whose head differs from the ledger's entry at that count
(rewritten) is tampering; entries after the ``final`` anchor were appended after the run ended;
entries after the last non-final anchor are a crash mid-round or an append, reported as
unverified. Limit: whoever holds the identity key can sign a rewritten ledger (in a simulation
the key lives in the run directory itself: keep ``sealing.identity-key`` elsewhere, or pin the
key's fingerprint with ``fedvault audit --server-key``, to make that matter).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedvault.atomic import append_line
from fedvault.errors import FedvaultError
from fedvault.privacy.findings import Finding
from fedvault.privacy.ledger import GENESIS_HASH, LedgerEntry, canonical_json

ANCHORS_FILENAME = "privacy_ledger.anchors"
_DOMAIN = b"fedvault/ledger-anchor/v1\x00"
_FIELDS = frozenset({"v", "type", "run", "round", "entries", "head", "final", "identity"})
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AnchorError(FedvaultError, ValueError):
    """An anchor is malformed; the message names where it was read."""


def key_fingerprint(raw_public_key: bytes) -> str:
    """SHA-256 of the raw 32-byte Ed25519 public key, hex (as ``fedvault.security.identity.fingerprint``)."""
    return hashlib.sha256(raw_public_key).hexdigest()


@dataclass(frozen=True)
class TrustedKey:
    """The identity anchors must be signed by: its fingerprint, and where the audit got it (for the report)."""

    fingerprint: str
    source: str


@dataclass(frozen=True)
class Anchor:
    """One signed statement of the ledger head; ``statement`` holds the exact bytes signed."""

    statement: bytes
    signature: bytes
    run: str
    round: int
    entries: int
    head: str
    final: bool
    identity: bytes

    def to_dict(self) -> dict[str, str]:
        return {"statement": self.statement.decode("ascii"), "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Anchor:
        """Parse a stored anchor (not yet verified); :class:`AnchorError` naming ``where``."""
        try:
            statement = data["statement"].encode("ascii")
            signature = bytes.fromhex(data["signature"])
            fields = json.loads(statement)
        except (TypeError, KeyError, AttributeError, ValueError, UnicodeError) as exc:
            raise AnchorError(f"ledger anchor at {where} is malformed ({type(exc).__name__}: {exc})") from None
        if not isinstance(fields, dict) or set(fields) != _FIELDS or fields["type"] != "ledger-anchor":
            raise AnchorError(f"ledger anchor at {where} is not a version 1 ledger-anchor statement")
        ok = (
            fields["v"] == 1
            and isinstance(fields["run"], str)
            and all(isinstance(fields[k], int) and not isinstance(fields[k], bool) for k in ("round", "entries"))
            and isinstance(fields["final"], bool)
            and isinstance(fields["head"], str)
            and _HEX64.match(fields["head"])
            and isinstance(fields["identity"], str)
            and _HEX64.match(fields["identity"])
        )
        if not ok:
            raise AnchorError(f"ledger anchor at {where} has a field of the wrong type")
        return cls(
            statement,
            signature,
            fields["run"],
            fields["round"],
            fields["entries"],
            fields["head"],
            fields["final"],
            bytes.fromhex(fields["identity"]),
        )

    def verify_signature(self) -> bool:
        """True if the statement is signed by the identity it names."""
        try:
            Ed25519PublicKey.from_public_bytes(self.identity).verify(self.signature, _DOMAIN + self.statement)
        except (InvalidSignature, ValueError):
            return False
        return True


def sign_anchor(
    key: Ed25519PrivateKey, *, run: str, server_round: int, entries: int, head: str, final: bool = False
) -> Anchor:
    """Sign ``(run, round, entries, head, final)`` with the server identity ``key``."""
    identity = key.public_key().public_bytes_raw()
    fields = {
        "v": 1,
        "type": "ledger-anchor",
        "run": run,
        "round": server_round,
        "entries": entries,
        "head": head,
        "final": final,
        "identity": identity.hex(),
    }
    statement = canonical_json(fields)
    return Anchor(statement, key.sign(_DOMAIN + statement), run, server_round, entries, head, final, identity)


def append_anchor(path: Path, anchor: Anchor) -> None:
    """Durably append ``anchor`` to the anchors file (one line, fsync'd)."""
    append_line(path, json.dumps(anchor.to_dict(), sort_keys=True))


def read_anchors(path: Path) -> list[tuple[str, Any]]:
    """``(where, stored anchor)`` for each line of the anchors file (empty if it does not exist)."""
    if not path.exists():
        return []
    found: list[tuple[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        where = f"{path.name} line {number}"
        try:
            found.append((where, json.loads(line)))
        except json.JSONDecodeError:
            found.append((where, None))  # reported as malformed by check_anchors
    return found


@dataclass(frozen=True)
class AnchorCheck:
    """What the anchors vouch for: ``anchored`` entries (0 if none), the last anchor, and the problems."""

    anchored: int
    last: Anchor | None
    findings: list[Finding]


def check_anchors(
    entries: Sequence[LedgerEntry], run: str | None, anchors: Sequence[tuple[str, Any]], trusted: TrustedKey | None
) -> AnchorCheck:
    """Check the ledger ``entries`` of ``run`` against every ``(where, stored anchor)``, signed by ``trusted``."""
    findings: list[Finding] = []

    def tampered(code: str, message: str) -> None:
        findings.append(Finding("tampered", code, message))

    if trusted is None:
        findings.append(Finding("unverified", "no-key", "no server identity key to verify the ledger's anchors"))
    valid: list[Anchor] = []
    for where, stored in anchors:
        try:
            anchor = Anchor.from_dict(stored, where)
        except AnchorError as exc:
            tampered("anchor-malformed", str(exc))
            continue
        seen = key_fingerprint(anchor.identity)
        if trusted is not None and seen != trusted.fingerprint:
            tampered("anchor-wrong-key", f"anchor at {where} is signed by {seen}, not by {trusted.fingerprint}")
        elif not anchor.verify_signature():
            tampered("anchor-bad-signature", f"anchor at {where}: the signature does not verify (statement edited)")
        elif run is not None and anchor.run != run:
            tampered("anchor-other-run", f"anchor at {where} is for run {anchor.run!r}, the ledger for {run!r}")
        elif anchor.entries > len(entries):
            tampered(
                "truncated",
                f"ledger truncated: it has {len(entries)} entries, but the anchor of round {anchor.round} at {where} "
                f"signed {anchor.entries}",
            )
        elif (entries[anchor.entries - 1].hash if anchor.entries else GENESIS_HASH) != anchor.head:
            tampered(
                "rewritten",
                f"ledger rewritten: entry {anchor.entries} does not have the head hash the anchor of round "
                f"{anchor.round} at {where} signed",
            )
        elif trusted is not None:
            valid.append(anchor)
    last = max(valid, key=lambda a: (a.entries, a.final, a.round), default=None)
    anchored = last.entries if last else 0
    after = len(entries) - anchored
    if trusted is None:
        pass  # nothing can be vouched for; said once above
    elif last is None and entries:
        tampered("unanchored", f"no valid signed anchor covers the ledger's {len(entries)} entries (anchors removed?)")
    elif last is not None and after > 0 and last.final:
        tampered(
            "appended",
            f"{after} entries after the final signed anchor (seq {anchored + 1} on): appended after the run ended",
        )
    elif last is not None and after > 0:
        findings.append(
            Finding(
                "unverified",
                "after-last-anchor",
                f"{after} entries after the last signed anchor (round {last.round}, seq {anchored + 1} on): "
                "a crash mid-round, or appended; counted, but not vouched for",
            )
        )
    return AnchorCheck(anchored, last, findings)
