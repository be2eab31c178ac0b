"""SCAFFOLD: stochastic controlled averaging (Karimireddy et al., ICML 2020, arXiv 1910.06378).

Server state: global model ``x`` and server control variate ``c`` (zero at start). Each round
(Algorithm 1 of the paper) a sampled set ``S`` of the ``N`` clients receives ``(x, c)``; client
``i`` keeps its own control variate ``c_i`` across rounds and runs ``K`` local steps of
``y <- y - eta_l (g_i(y) - c_i + c)``, then (option II)
``c_i+ = c_i - c + (x - y_i) / (K eta_l)`` and replies ``y_i`` with ``delta_c_i = c_i+ - c_i``.
The server applies::

    x <- x + eta_g * (1/|S|) sum_i (y_i - x)
    c <- c + (|S|/N) * (1/|S|) sum_i delta_c_i

Wire format: ``c`` travels as an extra ArrayRecord ``"scaffold.c"`` next to ``"arrays"``; the
reply carries the trained model ``y_i`` in ``"arrays"`` (Flower's convention, so update
validation and client-level DP see an ordinary model) and ``delta_c_i`` as ArrayRecord
``"scaffold.delta-c"``. The client side is :class:`ScaffoldHook` below.
Averages are uniform over replies, as in the paper (its objective is the mean of client losses).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency
from flwr.supercore import log

from fedvault.strategies.arrays import NDArrays, float_keys, pack, to_ndarrays, to_record, unpack
from fedvault.strategies.hooks import Extras, HookError, as_array, local_work, snapshot, trainable_parameters

SERVER_CONTROL_KEY = "scaffold.c"
CLIENT_DELTA_KEY = "scaffold.delta-c"
#: Node-state ArrayRecord holding this client's control variate ``c_i``.
CLIENT_CONTROL_KEY = "scaffold.c-i"


def scaffold_server_update(
    x: NDArrays,
    c: NDArrays,
    models: Sequence[Mapping[str, np.ndarray]],
    delta_cs: Sequence[Mapping[str, np.ndarray]],
    num_clients: int,
    server_learning_rate: float = 1.0,
) -> tuple[NDArrays, NDArrays]:
    """One server step of SCAFFOLD: ``(x_new, c_new)`` from the replies' ``y_i`` and ``delta_c_i``."""
    sampled = len(models)
    if sampled == 0 or sampled != len(delta_cs):
        raise AggregationError(
            reason=f"SCAFFOLD needs one delta-c per reply, got {sampled} models and {len(delta_cs)} delta-c"
        )
    if num_clients < sampled:
        raise AggregationError(reason=f"SCAFFOLD got {sampled} replies but num_clients is {num_clients}")
    new_x = {
        key: x[key] + server_learning_rate * sum(np.asarray(y[key], np.float64) - x[key] for y in models) / sampled
        for key in x
    }
    new_c = {key: c[key] + sum(np.asarray(d[key], np.float64) for d in delta_cs) / num_clients for key in c}
    return new_x, new_c


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al., 2020): control variates correct client drift.

    Parameters
    ----------
    server_learning_rate : float (default: 1.0)
        Global step size ``eta_g``.
    num_clients : int | None (default: None)
        ``N``, the number of clients in the federation; ``None`` counts the nodes connected
        when each round is configured.
    **kwargs
        Any :class:`flwr.serverapp.strategy.FedAvg` argument (fraction_train, ...).
    """

    #: ArrayRecords a reply carries besides the model (for update validation).
    extra_reply_records = (CLIENT_DELTA_KEY,)

    def __init__(self, server_learning_rate: float = 1.0, num_clients: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate}")
        if num_clients is not None and num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.server_learning_rate = server_learning_rate
        self.num_clients = num_clients
        self.control: NDArrays | None = None
        self._global: NDArrays | None = None
        self._nodes_seen = 0

    def summary(self) -> None:
        """Log the SCAFFOLD settings, then FedAvg's."""
        log(INFO, "\t├──> SCAFFOLD settings:")
        log(INFO, "\t│\t├── Server learning rate: %s", self.server_learning_rate)
        log(INFO, "\t│\t└── Number of clients (N): %s", self.num_clients or "connected nodes")
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages, each also carrying the server control variate ``c``."""
        self._global = to_ndarrays(arrays)
        if self.control is None:
            self.control = {key: np.zeros_like(self._global[key], np.float64) for key in float_keys(self._global)}
        self._nodes_seen = len(list(grid.get_node_ids()))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = to_record(self.control, like=self._global)
        for message in messages:
            message.content[SERVER_CONTROL_KEY] = control
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Update ``x`` and ``c`` from the replies' models and control-variate deltas."""
        ok = [msg for msg in replies if not msg.has_error()]
        if not ok:
            return None, None
        if self._global is None or self.control is None:
            raise AggregationError(reason="SCAFFOLD: configure_train must run before aggregate_train")
        contents = [msg.content for msg in ok]
        validate_message_reply_consistency(contents, self.weighted_by_key, check_arrayrecord=False)
        models, deltas = [], []
        for msg in ok:
            models.append(self._reply_arrays(msg, self.arrayrecord_key, set(self._global)))
            deltas.append(self._reply_arrays(msg, CLIENT_DELTA_KEY, set(self.control)))
        new_x, self.control = scaffold_server_update(
            self._global, self.control, models, deltas, self._population(len(ok)), self.server_learning_rate
        )
        return to_record(new_x, like=self._global), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def _reply_arrays(self, msg: Message, record_key: str, expected: set[str]) -> NDArrays:
        node = msg.metadata.src_node_id
        if record_key not in msg.content.array_records:
            raise InconsistentMessageReplies(
                reason=f"SCAFFOLD: reply from node {node} has no ArrayRecord '{record_key}'"
            )
        arrays = to_ndarrays(msg.content.array_records[record_key])
        if set(arrays) != expected:
            raise InconsistentMessageReplies(
                reason=f"SCAFFOLD: ArrayRecord '{record_key}' from node {node} has keys {sorted(arrays)}, "
                f"expected {sorted(expected)}"
            )
        return arrays

    def _population(self, sampled: int) -> int:
        return self.num_clients if self.num_clients is not None else max(self._nodes_seen, sampled)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The server control variate ``c`` (npz-friendly)."""
        return pack("c", self.control)

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.control = unpack(state, "c")


# ---- client half ---------------------------------------------------------------------------


class ScaffoldHook:
    """SCAFFOLD client: gradient correction ``g - c_i + c`` and the option-II update of ``c_i``.

    After ``K`` steps with learning rate ``eta_l``:
    ``c_i+ = c_i - c + (x - y) / (eta_l ||a||_1)`` (``||a||_1 = K`` for plain SGD, see
    :func:`local_work`); the reply carries ``delta_c = c_i+ - c_i`` and the node state keeps
    ``c_i+``. Keys of ``c`` that are not trainable parameters (buffers) get ``delta_c = 0``.
    """

    def __init__(self, model: torch.nn.Module, control: ArrayRecord, state: RecordDict, momentum: float) -> None:
        self.state = state
        self.momentum = momentum
        self.c = {key: array.numpy() for key, array in control.items()}
        self.c_i = self._stored_control(state)
        params = trainable_parameters(model)
        self.names = [name for name in params if name in self.c]
        if not self.names:
            raise HookError(f"ArrayRecord '{SERVER_CONTROL_KEY}' names none of the model's parameters")
        self.anchor = snapshot({name: params[name] for name in self.names})
        self.correction = {
            name: torch.as_tensor(self.c[name] - self.c_i[name], dtype=params[name].dtype, device=params[name].device)
            for name in self.names
        }

    def _stored_control(self, state: RecordDict) -> dict[str, np.ndarray]:
        stored = state.array_records.get(CLIENT_CONTROL_KEY)
        if stored is not None:
            c_i = {key: array.numpy() for key, array in stored.items()}
            if c_i.keys() == self.c.keys() and all(c_i[k].shape == self.c[k].shape for k in c_i):
                return c_i
        return {key: np.zeros_like(value) for key, value in self.c.items()}

    def after_backward(self, model: torch.nn.Module) -> None:
        params = trainable_parameters(model)
        for name in self.names:
            p = params[name]
            if p.grad is None:  # unused in this batch: its gradient is zero
                p.grad = self.correction[name].clone()
            else:
                p.grad.add_(self.correction[name])

    def finish(self, model: torch.nn.Module, steps: int, lr: float) -> Extras:
        delta = {key: np.zeros_like(value) for key, value in self.c.items()}
        if steps > 0:
            params = trainable_parameters(model)
            scale = 1.0 / (lr * local_work(steps, self.momentum))
            for name in self.names:
                drift = (self.anchor[name] - params[name].detach()).cpu().numpy().astype(np.float64)
                delta[name] = (drift * scale - self.c[name]).astype(self.c[name].dtype)
        new_c_i = {key: (self.c_i[key] + delta[key]).astype(self.c[key].dtype) for key in self.c}
        self.state[CLIENT_CONTROL_KEY] = ArrayRecord({key: as_array(v) for key, v in new_c_i.items()})
        return {CLIENT_DELTA_KEY: ArrayRecord({key: as_array(v) for key, v in delta.items()})}, {}
