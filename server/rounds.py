"""The server's round loop: Flower's ``Strategy.start`` made observable round by round.

It calls the strategy's own hooks (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``) exactly as ``Strategy.start`` does, and after
every round hands a record (metrics, timing, payload bytes, failures) to ``on_round`` so the run
directory and progress output are written as the run goes, not only at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

CentralEvaluate = Callable[[int, ArrayRecord], MetricRecord]
RoundRecord = dict[str, Any]


@dataclass
class RoundLoop:
    """Runs ``num_rounds`` of train (+ client evaluate) + centralized evaluate."""

    strategy: Strategy
    grid: Grid
    central_evaluate: CentralEvaluate
    on_round: Callable[[RoundRecord], None]
    timeout: float
    client_evaluate: bool = True

    def run(self, arrays: ArrayRecord, num_rounds: int, train_config: ConfigRecord) -> ArrayRecord:
        start = time.perf_counter()
        central = self.central_evaluate(0, arrays)
        self.on_round({"round": 0, "central": dict(central), "seconds": time.perf_counter() - start})
        for server_round in range(1, num_rounds + 1):
            arrays = self._round(server_round, arrays, ConfigRecord(dict(train_config)))
        return arrays

    def _round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> ArrayRecord:
        start = time.perf_counter()
        record: RoundRecord = {"round": server_round}

        sent = list(self.strategy.configure_train(server_round, arrays, config, self.grid))
        replies = list(self.grid.send_and_receive(sent, timeout=self.timeout))
        new_arrays, train_metrics = self.strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        record["train"] = dict(train_metrics or {})
        record["clients_sampled"] = len(sent)
        record["replies_ok"] = sum(1 for r in replies if not r.has_error())
        record["failed_nodes"] = sorted(_failed(sent, replies))
        bytes_sent, bytes_received = _payload_bytes(sent), _payload_bytes(replies)

        if self.client_evaluate:
            sent_eval = list(self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), self.grid))
            eval_replies = list(self.grid.send_and_receive(sent_eval, timeout=self.timeout))
            record["evaluate"] = dict(self.strategy.aggregate_evaluate(server_round, eval_replies) or {})
            bytes_sent += _payload_bytes(sent_eval)
            bytes_received += _payload_bytes(eval_replies)

        record["central"] = dict(self.central_evaluate(server_round, arrays))
        record["bytes_sent"], record["bytes_received"] = bytes_sent, bytes_received
        record["seconds"] = time.perf_counter() - start
        self.on_round(record)
        return arrays


def _payload_bytes(messages: Iterable[Message]) -> int:
    """Bytes of the arrays carried by ``messages`` (what dominates traffic)."""
    return sum(
        rec.count_bytes()
        for msg in messages
        if msg.has_content()
        for rec in msg.content.array_records.values()
    )


def _failed(sent: list[Message], replies: list[Message]) -> set[int]:
    """Nodes that replied with an error or did not reply before the timeout."""
    ok = {r.metadata.src_node_id for r in replies if not r.has_error()}
    return {m.metadata.dst_node_id for m in sent} - ok
