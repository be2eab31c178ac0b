"""Late replies are recorded, and every client keeps the server's signed receipt for each of its spends."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from strategy_helpers import InstantGrid
from test_ledger_anchoring import server_pieces, spend

from fedvault.client.policy import ClientPolicy
from fedvault.client.receipts import keep_receipts
from fedvault.config import RunConfig
from fedvault.privacy.node_ledger import NodeLedger
from fedvault.privacy.receipts import Receipt, ReceiptError, check_receipts, sign_receipt
from fedvault.protocol import (
    CONFIG,
    DP_EVENT,
    METRICS,
    NUM_EXAMPLES,
    RECEIPTS,
    SERVER_ROUND,
    dp_event_record,
    read_receipts,
    with_receipts,
)
from fedvault.security.identity import IdentityPin, fingerprint, generate_identity, load_identity
from fedvault.server.receipts import ReceiptGrid
from fedvault.server.rounds import RoundLoop
from fedvault.server.run_audit import audit
from fedvault.strategies.arrays import to_record
from fedvault.strategies.validation import ValidationRules

NODES = {11: "client-0", 12: "client-1", 13: "client-2"}


class SpendingGrid(InstantGrid):
    """Each node answers a train instruction with a good update and its DP event, a query with nothing."""

    def __init__(self) -> None:
        super().__init__(NODES)
        self.received: list[Message] = []

    def answer(self, msg: Message) -> Message:
        self.received.append(msg)
        if msg.metadata.message_type == MessageType.QUERY:
            return Message(RecordDict({METRICS: MetricRecord({"receipts_kept": 0})}), reply_to=msg)
        node, rnd = msg.metadata.dst_node_id, int(msg.content[CONFIG][SERVER_ROUND])
        content = RecordDict(
            {
                "arrays": to_record({"w": np.ones(3, dtype=np.float32)}),
                METRICS: MetricRecord({NUM_EXAMPLES: 10}),
                DP_EVENT: dp_event_record(spend(NODES[node], rnd)),
            }
        )
        return Message(content, reply_to=msg)


def _loop(grid, ledger) -> RoundLoop:
    return RoundLoop(
        strategy=FedAvg(fraction_train=1.0, min_available_nodes=2, min_train_nodes=2, fraction_evaluate=0.0),
        grid=grid,
        central_evaluate=lambda server_round, arrays: MetricRecord(),
        on_round=lambda record, arrays: None,
        timeout=0.2,
        rules=ValidationRules(),
        client_evaluate=False,
        ledger=ledger,
        pull_seconds=0.01,
    )


ZEROS = to_record({"w": np.zeros(3, dtype=np.float32)})


def test_a_reply_that_misses_its_round_is_recorded_as_late_when_it_arrives(tmp_path, flower_task_identity):
    _, ledger, _ = server_pieces(tmp_path / "run")
    grid = SpendingGrid()
    loop = _loop(grid, ledger)
    grid.held = {13}  # node 13's round-1 reply misses the round's timeout
    loop._round(1, ZEROS, ConfigRecord())
    assert {(e.node, e.status) for e in ledger.entries() if e.event} == {(11, "kept"), (12, "kept")}
    grid.held = set()
    grid.release()  # ... and arrives during round 2
    loop._round(2, ZEROS, ConfigRecord())
    late = [e for e in ledger.entries() if e.status == "late"]
    assert [(e.node, e.event.round) for e in late] == [(13, 1)]
    assert "round 1 arrived after its timeout" in late[0].reason
    report = audit(tmp_path / "run")
    client2 = next(p for p in report.parties if p.party == "client-2")
    assert client2.rounds == [1, 2] and client2.dropped_rounds == [1]  # paid for, never aggregated


def test_a_late_reply_after_the_last_round_is_collected_at_the_end(tmp_path, flower_task_identity):
    _, ledger, _ = server_pieces(tmp_path / "run")
    grid = SpendingGrid()
    loop = _loop(grid, ledger)
    grid.held = {12}
    loop._round(1, ZEROS, ConfigRecord())
    grid.release()
    loop.collect_late(1)
    assert [(e.node, e.event.round, e.status) for e in ledger.entries() if e.node == 12] == [(12, 1, "late")]


def test_receipts_ride_on_the_next_instruction_and_a_final_query_delivers_the_rest(tmp_path, flower_task_identity):
    _, ledger, anchorer = server_pieces(tmp_path / "run")
    transport = SpendingGrid()
    grid = ReceiptGrid(transport, ledger, anchorer.identity, anchorer.run)
    loop = _loop(grid, ledger)
    loop._round(1, ZEROS, ConfigRecord())
    assert all(RECEIPTS not in m.content for m in transport.received)  # nothing spent yet when round 1 went out
    assert grid.pending_nodes() == [11, 12, 13]
    transport.received.clear()
    loop._round(2, ZEROS, ConfigRecord())
    for msg in transport.received:  # each node got its own round-1 receipt, and only its own
        ((seq, text),) = read_receipts(msg.content)
        receipt = Receipt.from_json(text)
        assert receipt.fields["node"] == msg.metadata.dst_node_id and receipt.fields["round"] == 1
        assert receipt.fields["party"] == NODES[msg.metadata.dst_node_id] and receipt.fields["seq"] == seq
    transport.received.clear()
    grid.deliver(grid, 2, timeout=1.0)
    assert sorted(m.metadata.dst_node_id for m in transport.received) == [11, 12, 13]
    assert all(m.metadata.message_type == MessageType.QUERY for m in transport.received)
    assert [Receipt.from_json(t).fields["round"] for _, t in read_receipts(transport.received[0].content)] == [2]
    assert grid.pending_nodes() == []  # their replies acknowledged every receipt


@pytest.fixture
def signed(tmp_path):
    """A ledger with one spend of client-0 (node 11) and its signed receipt."""
    _, ledger, anchorer = server_pieces(tmp_path / "run")
    entry = ledger.append(spend("client-0", 1), node=11)
    return ledger, anchorer, sign_receipt(anchorer.identity, anchorer.run, entry)


def test_a_receipt_verifies_and_an_edited_one_does_not(signed):
    _, _, receipt = signed
    assert Receipt.from_json(receipt.to_json()).fields == receipt.fields
    stored = json.loads(receipt.to_json())
    stored["statement"] = stored["statement"].replace('"round":1', '"round":2')
    with pytest.raises(ReceiptError, match="signature does not verify"):
        Receipt.from_json(json.dumps(stored))


def test_check_receipts_flags_a_receipted_entry_the_ledger_no_longer_holds(signed):
    ledger, anchorer, receipt = signed
    key = fingerprint(anchorer.identity.public_key())
    entries = ledger.entries()
    assert check_receipts(entries, anchorer.run, [("here", receipt.to_json())], key) == []
    (finding,) = check_receipts(entries[:-1], anchorer.run, [("here", receipt.to_json())], key)
    assert (finding.severity, finding.code) == ("tampered", "receipt-not-in-run-ledger")
    (other,) = check_receipts(entries, anchorer.run, [("here", receipt.to_json())], "0" * 64)
    assert (other.severity, other.code) == ("unverified", "receipt-other-key")


def _client(tmp_path, node: int, pin: IdentityPin | None):
    cfg = RunConfig.from_flat({"task": "digits", "num-clients": 3, "run-dir": str(tmp_path / "run")})
    context = Context(
        run_id=1, node_id=node, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(), run_config={}
    )
    return cfg, context, ClientPolicy(sealing=False, pin=pin, refuse_replays=False)


def test_a_client_keeps_only_receipts_for_itself_signed_by_its_pinned_server(tmp_path, signed, flower_task_identity):
    ledger, anchorer, receipt = signed
    instruction = Message(with_receipts(RecordDict(), [(2, receipt.to_json())]), dst_node_id=11, message_type="train")
    node_ledger = NodeLedger(tmp_path / "run" / "node-ledger.sqlite")
    stranger = load_identity(generate_identity(tmp_path / "stranger").private_key)

    cfg, context, policy = _client(tmp_path, 12, None)  # another node: not its receipt
    assert keep_receipts(instruction, cfg, context, policy) == 0
    cfg, context, policy = _client(tmp_path, 11, IdentityPin(fingerprint(stranger.public_key())))
    assert keep_receipts(instruction, cfg, context, policy) == 0  # signed by a server it does not pin
    cfg, context, policy = _client(tmp_path, 11, IdentityPin(fingerprint(anchorer.identity.public_key())))
    assert keep_receipts(instruction, cfg, context, policy) == 1
    assert keep_receipts(instruction, cfg, context, policy) == 0  # the same receipt again: kept once
    assert node_ledger.receipts(anchorer.run, "client-0") == [receipt.to_json()]
