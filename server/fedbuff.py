"""Buffered asynchronous aggregation on the round clock: FedBuff (Nguyen et al., "Federated Learning
with Buffered Asynchronous Aggregation", AISTATS 2022, arXiv 2106.06639), as a strategy wrapper.

Up to ``concurrency`` clients train at once, each on the global model of the step it started in.
The server does not wait for a cohort: once ``buffer_size`` updates have *finished* (on the virtual
clock of :mod:`fedvault.profiles`) it applies them and the
clients that finished start again on the new model; the others keep training on the model they
have. It runs in simulation, on the virtual clock of client profiles (``federation.profiles``). One
loop round is one server step:

1. ``configure_train`` sends the current model to as many new clients as there are free slots,
   drawn from those not training by a generator seeded with ``(seed, round)``;
2. their updates come back within the round (a simulation trains them at once); each is held as
   ``delta = update - (the model it started from)`` with its finish time ``start + its time``;
3. ``aggregate_train`` takes the ``buffer_size`` held updates that finish first, and steps
   ``x += sum_i n_i s(tau_i) delta_i / sum_i n_i``, with ``n_i`` the client's examples and staleness
   weight ``s(tau) = 1 / sqrt(1 + tau)``, ``tau`` the server steps since the client started (the
   paper's polynomial weighting); the clock moves to the last of them to finish.

A client that does not answer (offline, failed) frees its slot. The held updates, the step count
and the clock are in ``state_dict``, so a resumed run goes on with the same buffer. The privacy
spend of every update is recorded when it arrives, like any other (the loop's ledger): one a run
ends with still in the buffer was paid for and never applied. The wrapped strategy builds the
instruction (its config keys) and does the evaluation; its own aggregation is not used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedvault.errors import FedvaultError
from fedvault.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, config_int
from fedvault.server.clock import ClientTime
from fedvault.server.rounds import StrategyWrapper
from fedvault.strategies.arrays import NDArrays, float_keys, pack, to_ndarrays, to_record, unpack
from fedvault.strategies.state import load_strategy_state, strategy_state

_INNER, _HELD = "inner/", "held"


@dataclass(frozen=True)
class HeldUpdate:
    """An update that has come in but, on the round clock, is still training until ``finish``."""

    finish: float
    node: int
    step: int  # the server step whose model it started from
    examples: int
    delta: NDArrays


def staleness_weight(staleness: int) -> float:
    """FedBuff's polynomial staleness weight ``1 / sqrt(1 + tau)``."""
    return 1.0 / math.sqrt(1.0 + staleness)


class FedBuff(StrategyWrapper):
    """Asynchronous buffered aggregation around ``strategy`` (which builds instructions and evaluates)."""

    def __init__(self, strategy: Strategy, buffer_size: int, concurrency: int, seed: int = 0) -> None:
        if not 1 <= buffer_size <= concurrency:
            raise FedvaultError(f"FedBuff: need 1 <= buffer size ({buffer_size}) <= concurrency ({concurrency})")
        super().__init__(strategy)
        self.buffer_size, self.concurrency, self.seed = buffer_size, concurrency, seed
        self.step, self.clock = 0, 0.0
        self.held: list[HeldUpdate] = []
        self._started: dict[int, float] = {}  # node -> clock when this round's instruction left
        self._model: NDArrays = {}
        self._advance = 0.0

    def __repr__(self) -> str:
        return f"FedBuff({self.strategy!r}, buffer_size={self.buffer_size}, concurrency={self.concurrency})"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The current model to new clients, one per free slot, sampled from those not training."""
        self._model = to_ndarrays(arrays)
        busy = {update.node for update in self.held}
        free = sorted(set(grid.get_node_ids()) - busy)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, server_round]))  # a resume draws the same
        starting = [free[i] for i in rng.permutation(len(free))[: max(0, self.concurrency - len(busy))]]
        self._started = dict.fromkeys(starting, self.clock)
        contents = [m.content for m in self.strategy.configure_train(server_round, arrays, config, grid)]
        content = contents[0] if contents else RecordDict({ARRAYS: arrays, CONFIG: config})
        return [Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in starting]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hold the round's updates, then apply the ``buffer_size`` that finish first."""
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() or node not in self._started:
                continue
            spent = ClientTime.of(reply, 0.0, 0.0, virtual=True).seconds
            update = to_ndarrays(reply.content.array_records[ARRAYS])
            delta = {key: update[key] - self._model[key] for key in float_keys(self._model)}
            examples = config_int(reply.content.metric_records[METRICS], NUM_EXAMPLES, 1)
            self.held.append(HeldUpdate(self._started[node] + spent, node, self.step, examples, delta))
        self._started = {}
        self.held.sort(key=lambda update: (update.finish, update.node))
        applied, self.held = self.held[: self.buffer_size], self.held[self.buffer_size :]
        if not applied:
            self._advance = 0.0
            return None, MetricRecord({"fedbuff_applied": 0, "fedbuff_held": len(self.held)})
        total = sum(update.examples for update in applied)
        new = dict(self._model)
        for key in float_keys(self._model):
            step = sum(u.examples * staleness_weight(self.step - u.step) * u.delta[key] for u in applied) / total
            new[key] = self._model[key] + step
        finished = max(update.finish for update in applied)
        self._advance, self.clock = max(0.0, finished - self.clock), max(self.clock, finished)
        staleness = [self.step - update.step for update in applied]
        self.step += 1
        metrics = MetricRecord(
            {
                "fedbuff_applied": len(applied),
                "fedbuff_held": len(self.held),
                "fedbuff_max_staleness": max(staleness),
                "fedbuff_clock": self.clock,
            }
        )
        return to_record(new, like=self._model), metrics

    def take_advance(self) -> float:
        """How far the last step moved the clock (the round's time, :class:`fedvault.server.clock.ClockedGrid`)."""
        advance, self._advance = self._advance, 0.0
        return advance

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The step, the clock and the held updates (npz-friendly), and the wrapped strategy's under ``inner/``."""
        state: dict[str, Any] = {_INNER + k: v for k, v in strategy_state(self.strategy).items()}
        state["step"], state["clock"] = self.step, self.clock
        state[f"{_HELD}/meta"] = np.array(
            [[u.finish, u.node, u.step, u.examples] for u in self.held], dtype=np.float64
        ).reshape(-1, 4)
        state[f"{_HELD}/nodes"] = np.array([u.node for u in self.held], dtype=np.uint64)  # exact: ids are 64-bit
        for i, update in enumerate(self.held):
            state.update(pack(f"{_HELD}/{i}", update.delta))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_strategy_state(self.strategy, {k[len(_INNER) :]: v for k, v in state.items() if k.startswith(_INNER)})
        self.step, self.clock = int(np.asarray(state["step"])), float(np.asarray(state["clock"]))
        meta, nodes = np.asarray(state[f"{_HELD}/meta"]), np.asarray(state[f"{_HELD}/nodes"])
        self.held = [
            HeldUpdate(float(row[0]), int(node), int(row[2]), int(row[3]), unpack(state, f"{_HELD}/{i}") or {})
            for i, (row, node) in enumerate(zip(meta, nodes))
        ]
