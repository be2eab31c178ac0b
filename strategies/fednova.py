"""FedNova: normalized averaging (Wang et al., NeurIPS 2020, arXiv 2007.07481).

Clients that run different numbers of local steps ``tau_i`` pull FedAvg towards the optimum of
a mis-weighted objective ("objective inconsistency"). FedNova normalises each client's change
by the L1 norm of its aggregation vector ``a_i`` (``||a_i||_1 = tau_i`` for plain SGD; for
heavy-ball momentum ``rho``: ``(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``)::

    d_i     = (x - y_i) / ||a_i||_1                (eta_l times the normalised gradient)
    tau_eff = sum_i p_i ||a_i||_1,   p_i = n_i / sum_j n_j
    x      <- x - eta_g * tau_eff * sum_i p_i d_i

With equal ``||a_i||_1`` this is exactly FedAvg. The server asks for FedNova replies with config
flag ``"fednova" = True``; clients (:class:`FedNovaHook` below) add
metrics ``"fednova.tau"`` and ``"fednova.a-norm"`` to their reply.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedvault.protocol import record_scalar
from fedvault.strategies.arrays import NDArrays, to_ndarrays, to_record
from fedvault.strategies.hooks import Extras, HookError, local_work

CONFIG_FLAG = "fednova"
TAU_KEY = "fednova.tau"
A_NORM_KEY = "fednova.a-norm"


def fednova_update(
    x: NDArrays,
    models: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    a_norms: Sequence[float],
    server_learning_rate: float = 1.0,
) -> NDArrays:
    """One FedNova server step: the new global arrays (float64)."""
    p = np.asarray(weights, np.float64) / float(np.sum(weights))
    a = np.asarray(a_norms, np.float64)
    tau_eff = float(p @ a)
    step = {
        key: sum(pi / ai * (x[key] - np.asarray(y[key], np.float64)) for pi, ai, y in zip(p, a, models)) for key in x
    }
    return {key: x[key] - server_learning_rate * tau_eff * step[key] for key in x}


class FedNova(FedAvg):
    """FedNova (Wang et al., 2020): FedAvg with updates normalised by local work.

    Parameters
    ----------
    server_learning_rate : float (default: 1.0)
        Global step size ``eta_g``.
    **kwargs
        Any :class:`flwr.serverapp.strategy.FedAvg` argument (fraction_train, ...).
    """

    #: Metrics every train reply must carry (for update validation).
    required_reply_metrics = (TAU_KEY, A_NORM_KEY)

    def __init__(self, server_learning_rate: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate}")
        self.server_learning_rate = server_learning_rate
        self._global: NDArrays | None = None

    def summary(self) -> None:
        """Log the FedNova settings, then FedAvg's."""
        log(INFO, "\t├──> FedNova settings:")
        log(INFO, "\t│\t└── Server learning rate: %s", self.server_learning_rate)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages with ``config["fednova"] = True``."""
        self._global = to_ndarrays(arrays)
        config[CONFIG_FLAG] = True
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Normalised averaging of the replies' models."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self._global is None:
            raise AggregationError(reason="FedNova: configure_train must run before aggregate_train")
        contents = [msg.content for msg in valid]
        models, weights, a_norms = [], [], []
        for msg in valid:
            metrics = next(iter(msg.content.metric_records.values()))
            model = to_ndarrays(next(iter(msg.content.array_records.values())))
            if set(model) != set(self._global):
                raise InconsistentMessageReplies(
                    reason=f"FedNova: reply from node {msg.metadata.src_node_id} has array keys {sorted(model)}, "
                    f"expected {sorted(self._global)}"
                )
            models.append(model)
            weights.append(float(record_scalar(metrics[self.weighted_by_key], self.weighted_by_key)))
            a_norms.append(_positive(metrics.get(A_NORM_KEY), msg.metadata.src_node_id))
        new_x = fednova_update(self._global, models, weights, a_norms, self.server_learning_rate)
        return to_record(new_x, like=self._global), self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def _positive(value: object, node: int) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise InconsistentMessageReplies(
            reason=f"FedNova: reply from node {node} has metric '{A_NORM_KEY}'={value!r}, expected a positive number"
        )
    return float(value)


# ---- client half ---------------------------------------------------------------------------


class FedNovaHook:
    """FedNova client: reports local steps ``tau`` and ``||a||_1`` (see :func:`local_work`)."""

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum

    def after_backward(self, model: torch.nn.Module) -> None:
        return None

    def finish(self, model: torch.nn.Module, steps: int, lr: float) -> Extras:
        if steps < 1:
            raise HookError("FedNova: local training took no steps, so there is no update to normalise")
        return {}, {TAU_KEY: float(steps), A_NORM_KEY: local_work(steps, self.momentum)}
