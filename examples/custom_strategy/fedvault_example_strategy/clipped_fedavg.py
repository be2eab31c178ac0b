"""FedAvg with norm-bounded client updates (Sun et al., 2019, arXiv 1911.07963).

Each client's update ``u_i = y_i - x`` is scaled to L2 norm at most ``max_update_norm``
(``u_i * min(1, C / ||u_i||)``) before the weighted average, so no single client can move the
global model by more than ``C``: a simple defence against boosted (model-replacement) updates.
It depends only on Flower's Message API and NumPy, like any user strategy would.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class ClippedFedAvg(FedAvg):
    """FedAvg over client updates clipped to L2 norm ``max_update_norm``.

    Parameters
    ----------
    max_update_norm : float (default: 1.0)
        Bound ``C`` on each client's update norm; must be > 0.
    **kwargs
        Any FedAvg argument (fraction_train, min_available_nodes, ...).
    """

    def __init__(self, max_update_norm: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if max_update_norm <= 0:
            raise ValueError(f"max_update_norm must be > 0, got {max_update_norm}")
        self.max_update_norm = max_update_norm
        self.global_arrays: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the updates are relative to, then act as FedAvg."""
        self.global_arrays = {key: array.numpy() for key, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted mean of clipped updates, added to the global model."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self.global_arrays is None:
            return None, None
        x = self.global_arrays
        total = sum(self._weight(msg) for msg in valid)
        step = {key: np.zeros(value.shape, np.float64) for key, value in x.items()}
        for msg in valid:
            y = {key: array.numpy() for key, array in msg.content[self.arrayrecord_key].items()}
            update = {key: y[key].astype(np.float64) - x[key] for key in x}
            norm = float(np.sqrt(sum(np.vdot(u, u) for u in update.values())))
            factor = min(1.0, self.max_update_norm / norm) if norm > 0 else 1.0
            for key in x:
                step[key] += self._weight(msg) / total * factor * update[key]
        arrays = ArrayRecord({key: Array(np.asarray(x[key] + step[key], dtype=x[key].dtype)) for key in x})
        metrics = self.train_metrics_aggr_fn([msg.content for msg in valid], self.weighted_by_key)
        return arrays, metrics

    def _weight(self, msg: Message) -> float:
        return float(next(iter(msg.content.metric_records.values()))[self.weighted_by_key])
