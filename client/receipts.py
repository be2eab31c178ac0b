"""Client side of receipts (:mod:`fedvault.privacy.receipts`): keep the server's signed word that
each of this client's spends is in the run ledger.

Every receipt an instruction carries is checked before it is kept in the node ledger: it must
verify, be signed by the pinned server identity (when the client pins one), and name this node,
this client and this run. One that does not is logged and not kept; nothing else about the
instruction changes.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message

from fedvault.client.node import DataSelection, client_party, node_ledger_path
from fedvault.client.policy import ClientPolicy
from fedvault.config import RunConfig
from fedvault.privacy.anchors import key_fingerprint
from fedvault.privacy.node_ledger import NodeLedger
from fedvault.privacy.receipts import Receipt, ReceiptError
from fedvault.protocol import read_receipts, run_key

log = logging.getLogger("fedvault")


def keep_receipts(msg: Message, cfg: RunConfig, context: Context, policy: ClientPolicy) -> int:
    """Store the instruction's valid receipts in this client's node ledger; how many were new."""
    try:
        pairs = read_receipts(msg.content)
    except (TypeError, ValueError) as exc:
        log.warning("receipts ignored: %s", exc)
        return 0
    if not pairs or not cfg.privacy.sample_level:
        return 0
    run = run_key(cfg, context.run_id)
    party = client_party(DataSelection.from_run(cfg, context.node_config))
    kept = []
    for seq, text in pairs:
        try:
            receipt = Receipt.from_json(text)
        except ReceiptError as exc:
            log.warning("receipt for ledger entry %d not kept: %s", seq, exc)
            continue
        f = receipt.fields
        expected = (run, context.node_id, party, seq)
        if (f["run"], f["node"], f["party"], f["seq"]) != expected:
            log.warning("receipt for ledger entry %d not kept: it is for %s, not %s", seq, f, expected)
        elif policy.pin is not None and key_fingerprint(receipt.identity) != policy.pin.fingerprint:
            log.warning("receipt for ledger entry %d not kept: not signed by the pinned server identity", seq)
        else:
            kept.append((seq, text))
    return NodeLedger(node_ledger_path(cfg, context.node_config)).keep_receipts(run, party, kept) if kept else 0
