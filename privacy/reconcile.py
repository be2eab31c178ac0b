"""Reconcile the run ledger with who paid and with the clients' own ledgers.

* Identity: every client spend in the run ledger names the Flower node it came from (the
  reply's ``metadata.src_node_id``, which Flower authenticates) besides the party name the
  client sent. One node spending under several party names, or one party name claimed by
  several nodes, is flagged: a client may have spent under another's name to hide its own spend
  (or, for the second, a client re-registered under a new node id: check which).
* Completeness: a client's node ledger (:class:`~fedvault.privacy.node_ledger.NodeLedger`) is
  the source of truth for its spend; the server only sees replies that reach it. A spend in a
  node ledger that the run ledger lacks (a late reply Flower discarded, a reply lost in a server
  crash, one that could not be opened) is added to the audit and flagged unverified; the same
  round recorded differently in the two is tampering; a run-ledger spend that a node ledger
  holding that client lacks means rows were removed from the node ledger.
* Receipts: the server's signed receipts a node ledger keeps
  (:mod:`fedvault.privacy.receipts`) must each name an entry the run ledger still holds: one
  that does not shows the run ledger was cut or rewritten, even by the identity key's holder.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from fedvault.privacy.events import DPEvent
from fedvault.privacy.findings import Finding
from fedvault.privacy.ledger import LedgerEntry, spends
from fedvault.privacy.node_ledger import NodeLedger, NodeLedgerError, NodeLedgerTamperedError
from fedvault.privacy.receipts import check_receipts


def identity_findings(spends: Sequence[LedgerEntry]) -> list[Finding]:
    """Flag a node id under several party names and a party name claimed by several node ids."""
    parties: dict[int, set[str]] = defaultdict(set)
    nodes: dict[str, set[int]] = defaultdict(set)
    for entry in spends:
        if entry.node is not None and entry.event is not None:
            parties[entry.node].add(entry.event.party)
            nodes[entry.event.party].add(entry.node)
    findings = [
        Finding("tampered", "node-several-parties", f"node {node} spent under several party names: {sorted(names)}")
        for node, names in sorted(parties.items())
        if len(names) > 1
    ]
    findings += [
        Finding(
            "tampered",
            "party-several-nodes",
            f"party {party!r} was claimed by several nodes: {sorted(ids)} (a spoofed name, or a re-registered node)",
        )
        for party, ids in sorted(nodes.items())
        if len(ids) > 1
    ]
    return findings


def merge_node_ledgers(
    entries: Sequence[LedgerEntry], run: str, paths: Sequence[Path], trusted_fingerprint: str | None
) -> tuple[list[DPEvent], list[Finding]]:
    """Spends only the node ledgers at ``paths`` hold for ``run`` (to add to the audit), and the
    disagreements with the run ledger's ``entries``, receipts included (signed by ``trusted_fingerprint``)."""
    recorded: dict[tuple[str, int], list[DPEvent]] = defaultdict(list)
    for entry in spends(entries):
        if entry.event is not None:
            recorded[(entry.event.party, entry.event.round)].append(entry.event)
    extra: list[DPEvent] = []
    findings: list[Finding] = []
    known: set[tuple[str, int]] = set()
    for path in paths:
        try:
            ledger = NodeLedger(path, create=False)
            clients = ledger.clients(run)
        except NodeLedgerError as exc:
            findings.append(Finding("tampered", "node-ledger-unreadable", str(exc)))
            continue
        for client in clients:
            findings += check_receipts(
                entries, run, [(f"node ledger {path}", r) for r in ledger.receipts(run, client)], trusted_fingerprint
            )
            try:
                events = ledger.events(run, client)
            except NodeLedgerTamperedError as exc:
                findings.append(Finding("tampered", "node-ledger-tampered", str(exc)))
                continue
            held = {e.round for e in events}
            for event in events:
                key = (client, event.round)
                if key in known:
                    continue
                known.add(key)
                if not recorded.get(key):
                    extra.append(event)
                    findings.append(
                        Finding(
                            "unverified",
                            "missing-from-run-ledger",
                            f"{client} round {event.round}: spent in node ledger {path} but missing from the run "
                            "ledger (a late, lost or unreadable reply); added to the audit",
                        )
                    )
                elif event not in recorded[key]:
                    findings.append(
                        Finding(
                            "tampered",
                            "differs-from-run-ledger",
                            f"{client} round {event.round}: node ledger {path} and the run ledger record "
                            "different spends",
                        )
                    )
            for party, rnd in sorted(recorded):
                if party == client and rnd not in held:
                    findings.append(
                        Finding(
                            "tampered",
                            "missing-from-node-ledger",
                            f"{client} round {rnd}: in the run ledger but not in node ledger {path} (rows removed?)",
                        )
                    )
    return extra, findings
