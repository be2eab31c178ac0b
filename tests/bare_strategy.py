"""A user's strategy that subclasses Flower's ``Strategy`` directly (not FedAvg), loaded as
'bare_strategy:MeanOfAll' in tests. Its instructions carry no ``server-round``: fedvault's round
loop must add it, or every DP client would record round 0 and refuse from round 2 on."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class MeanOfAll(Strategy):
    """Trains every connected node, averages their arrays weighted by examples; no evaluation."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": config["lr"]})})
        return [Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in grid.get_node_ids()]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error() and "arrays" in r.content.array_records]
        if not replies:
            return None, None
        weights = np.array([float(r.content["metrics"]["num-examples"]) for r in replies])
        weights /= weights.sum()
        keys = list(replies[0].content["arrays"].keys())
        mean = {k: sum(w * r.content["arrays"][k].numpy() for w, r in zip(weights, replies)) for k in keys}
        return ArrayRecord({k: Array(v.astype(np.float32)) for k, v in mean.items()}), MetricRecord(
            {"replies": len(replies)}
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        return None
