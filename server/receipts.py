"""The server's side of receipts (:mod:`fedvault.privacy.receipts`): sign one for every client spend
the run ledger records and hand it to that client.

:class:`ReceiptGrid` wraps the run's grid under the sealing grid, so receipts join instructions
after they are signed (each receipt carries its own signature; the instruction digest leaves them
out). It subscribes to the ledger, signs a receipt for each spend entry with a node id once the
entry is durable, and attaches every receipt a node has not acknowledged to the next instruction
sent to it; a reply to that instruction acknowledges them. :meth:`ReceiptGrid.deliver` sends what
is left, at the end of the run, in ``query`` messages to the nodes still connected.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedvault.privacy.ledger import Ledger, LedgerEntry
from fedvault.privacy.receipts import sign_receipt
from fedvault.protocol import CONFIG, SERVER_ROUND, with_receipts
from fedvault.server.rounds import GridWrapper, exchange

log = logging.getLogger("fedvault")


class ReceiptGrid(GridWrapper):
    """Gives each client the server's signed receipts for its spends (see the module docstring)."""

    def __init__(self, grid: Grid, ledger: Ledger, identity: Ed25519PrivateKey, run: str) -> None:
        super().__init__(grid)
        self.identity, self.ledger_run = identity, run
        self._pending: dict[int, dict[int, str]] = defaultdict(dict)  # node -> seq -> receipt json
        self._carried: dict[str, tuple[int, list[int]]] = {}  # instruction id -> (node, seqs it carried)
        ledger.subscribe(self._issue)

    def _issue(self, entry: LedgerEntry) -> None:
        if entry.event is not None and entry.node is not None:
            self._pending[entry.node][entry.seq] = sign_receipt(self.identity, self.ledger_run, entry).to_json()

    def pending_nodes(self) -> list[int]:
        """Nodes holding receipts they have not acknowledged."""
        return sorted(node for node, receipts in self._pending.items() if receipts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for msg in messages:
            if receipts := self._pending.get(msg.metadata.dst_node_id):
                msg.content = with_receipts(msg.content, sorted(receipts.items()))
        ids = list(self._grid.push_messages(messages))
        for msg in messages:  # the wrapped grid set each message id while pushing
            if receipts := self._pending.get(msg.metadata.dst_node_id):
                self._carried[msg.metadata.message_id] = (msg.metadata.dst_node_id, list(receipts))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            node, seqs = self._carried.pop(reply.metadata.reply_to_message_id, (0, []))
            if not reply.has_error():
                for seq in seqs:
                    self._pending[node].pop(seq, None)
        return replies

    def deliver(self, outer: Grid, server_round: int, timeout: float) -> None:
        """Send the unacknowledged receipts to the connected nodes that hold them (through ``outer``,
        the grid that signs), waiting up to ``timeout``; log the nodes left without theirs."""
        connected = set(outer.get_node_ids())
        nodes = [node for node in self.pending_nodes() if node in connected]
        messages = [
            Message(
                content=RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: server_round})}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
                group_id=str(server_round),
            )
            for node in nodes
        ]
        if messages:
            exchange(outer, messages, timeout)
        if left := self.pending_nodes():
            log.warning("ledger receipts not delivered to nodes %s (gone or not answering)", left)
