"""Signed receipts: the server's word, kept by each client, that its spends are in the run ledger.

For every spend entry it appends under a client's node id, the server signs a receipt with its
Ed25519 identity key (RFC 8032): canonical JSON ``{"v": 1, "type": "ledger-receipt", "run",
"node", "party", "round", "seq", "entry" (the entry's hash), "event" (SHA-256 of the event's
canonical JSON), "status", "identity" (raw public key, hex)}``, signed over
``"fedvault/ledger-receipt/v1\\0" || statement`` (a domain of its own, distinct from the ledger
anchors' and the instructions'). The receipt travels to the client with its next instruction
(or a final ``query`` message when the run ends) and the client keeps it in its node ledger.

Anchors stop a ledger being rewritten by anyone without the identity key; receipts also catch
the key's holder: an operator who drops or rewrites a client's spend and re-signs the anchors
cannot take back the receipts the clients hold. ``fedvault audit RUN --node-ledger FILE`` checks
every receipt a node ledger holds against the run ledger (:func:`check_receipts`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedvault.errors import FedvaultError
from fedvault.privacy.anchors import key_fingerprint
from fedvault.privacy.findings import Finding
from fedvault.privacy.ledger import LedgerEntry, canonical_json

_DOMAIN = b"fedvault/ledger-receipt/v1\x00"
_INTS = ("node", "round", "seq")
_STRINGS = ("run", "party", "entry", "event", "status", "identity")


class ReceiptError(FedvaultError, ValueError):
    """A receipt is malformed or not signed by the identity it names."""


def event_digest(event: dict[str, Any]) -> str:
    """SHA-256 hex of an event's canonical JSON (what a receipt names the spend by)."""
    return hashlib.sha256(canonical_json(event)).hexdigest()


@dataclass(frozen=True)
class Receipt:
    """One signed receipt; ``statement`` holds the exact bytes signed, ``fields`` their parsed values."""

    statement: bytes
    signature: bytes
    fields: dict[str, Any]

    @property
    def identity(self) -> bytes:
        return bytes.fromhex(self.fields["identity"])

    def to_json(self) -> str:
        return json.dumps({"statement": self.statement.decode("ascii"), "signature": self.signature.hex()})

    @classmethod
    def from_json(cls, text: str) -> Receipt:
        """Parse and verify a receipt's signature (against the identity it names); ReceiptError says why not."""
        try:
            stored = json.loads(text)
            statement, signature = stored["statement"].encode("ascii"), bytes.fromhex(stored["signature"])
            fields = json.loads(statement)
        except (TypeError, KeyError, AttributeError, ValueError, UnicodeError) as exc:
            raise ReceiptError(f"receipt is malformed ({type(exc).__name__}: {exc})") from None
        shape_ok = (
            isinstance(fields, dict)
            and fields.get("v") == 1
            and fields.get("type") == "ledger-receipt"
            and all(isinstance(fields.get(k), int) and not isinstance(fields.get(k), bool) for k in _INTS)
            and all(isinstance(fields.get(k), str) for k in _STRINGS)
        )
        if not shape_ok:
            raise ReceiptError("receipt is not a version 1 ledger-receipt statement")
        receipt = cls(statement, signature, fields)
        try:
            Ed25519PublicKey.from_public_bytes(receipt.identity).verify(signature, _DOMAIN + statement)
        except (InvalidSignature, ValueError):
            raise ReceiptError(f"receipt for ledger entry {fields['seq']}: the signature does not verify") from None
        return receipt


def sign_receipt(key: Ed25519PrivateKey, run: str, entry: LedgerEntry) -> Receipt:
    """The server's receipt for spend ``entry`` of run ``run``, signed with its identity ``key``."""
    if entry.event is None or entry.node is None:
        raise ReceiptError(f"ledger entry {entry.seq} is not a client's spend: nothing to give a receipt for")
    fields = {
        "v": 1,
        "type": "ledger-receipt",
        "run": run,
        "node": entry.node,
        "party": entry.event.party,
        "round": entry.event.round,
        "seq": entry.seq,
        "entry": entry.hash,
        "event": event_digest(entry.event.to_dict()),
        "status": entry.status or "",
        "identity": key.public_key().public_bytes_raw().hex(),
    }
    statement = canonical_json(fields)
    return Receipt(statement, key.sign(_DOMAIN + statement), fields)


def check_receipts(
    entries: Sequence[LedgerEntry], run: str, receipts: Sequence[tuple[str, str]], trusted_fingerprint: str | None
) -> list[Finding]:
    """Check ``(where, receipt json)`` pairs against the run ledger's ``entries``.

    A receipt signed by the trusted key for this run whose entry is not in the ledger at its seq
    with its hash is tampering: the server signed for a spend its ledger no longer shows. A
    receipt that does not verify, or is signed by another key, proves nothing and is reported."""
    findings: list[Finding] = []
    for where, text in receipts:
        try:
            receipt = Receipt.from_json(text)
        except ReceiptError as exc:
            findings.append(Finding("unverified", "receipt-invalid", f"{where}: {exc}"))
            continue
        f = receipt.fields
        seen = key_fingerprint(receipt.identity)
        if trusted_fingerprint is not None and seen != trusted_fingerprint:
            findings.append(
                Finding("unverified", "receipt-other-key", f"{where}: receipt signed by {seen}, not the trusted key")
            )
        elif f["run"] != run:
            findings.append(Finding("unverified", "receipt-other-run", f"{where}: receipt for run {f['run']!r}"))
        elif f["seq"] > len(entries) or entries[f["seq"] - 1].hash != f["entry"]:
            findings.append(
                Finding(
                    "tampered",
                    "receipt-not-in-run-ledger",
                    f"{f['party']} round {f['round']} (node {f['node']}): the server signed a receipt for ledger "
                    f"entry {f['seq']} that the run ledger no longer holds ({where}): entries removed or rewritten",
                )
            )
    return findings
