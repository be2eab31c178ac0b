"""Strategy state survives save (npz, no pickle) and restore: a restored strategy aggregates the
third round exactly as the strategy that never stopped, and a fresh one does not."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg
from strategy_helpers import mlp, random_clients, run_round

from fedvault.strategies.registry import build_strategy
from fedvault.strategies.state import StrategyStateError, load_strategy_state, strategy_state

pytestmark = pytest.mark.timeout(60)
COMMON = {"min-available-nodes": 3, "min-train-nodes": 3, "client-learning-rate": 0.1}
STATEFUL = {
    "fedavgm": {"server-momentum": 0.9},
    "fedadam": {"eta": 0.05},
    "fedyogi": {"eta": 0.05},
    "fedadagrad": {"eta": 0.05},
    "scaffold": {},
}
STATELESS = ["fedavg", "fedprox", "fedmedian", "qfedavg", "fednova"]


def _save_and_load(state: dict, path) -> dict:
    np.savez(path, **state)
    with np.load(path, allow_pickle=False) as stored:
        return {key: stored[key] for key in stored.files}


def _round(strategy, arrays: ArrayRecord, clients, server_round: int) -> np.ndarray:
    random.seed(server_round)  # Flower samples (and so orders) nodes with `random`
    new, _ = run_round(strategy, arrays, clients, mlp(), server_round=server_round)
    return new


def _flat(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.numpy().ravel() for a in record.values()])


def _two_rounds_then_resume(name: str, params: dict, tmp_path, restore: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Round 3 from the strategy that ran rounds 1-2, and from a fresh one (restored or not)."""
    torch.manual_seed(0)
    original = build_strategy(name, params, COMMON)
    clients = random_clients(3, lr=0.3)
    arrays = ArrayRecord(mlp().state_dict())
    for server_round in (1, 2):
        arrays = _round(original, arrays, clients, server_round)
    resumed = build_strategy(name, params, COMMON)
    if restore:
        load_strategy_state(resumed, _save_and_load(strategy_state(original), tmp_path / "state.npz"))
    clients_copy = copy.deepcopy(clients)  # node state (SCAFFOLD's c_i) lives on the clients
    return _flat(_round(original, arrays, clients, 3)), _flat(_round(resumed, arrays, clients_copy, 3))


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_restored_state_gives_identical_third_round(name, tmp_path, flower_task_identity):
    continued, resumed = _two_rounds_then_resume(name, STATEFUL[name], tmp_path)
    np.testing.assert_array_equal(continued, resumed)


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_without_restore_the_third_round_differs(name, tmp_path, flower_task_identity):
    continued, fresh = _two_rounds_then_resume(name, STATEFUL[name], tmp_path, restore=False)
    assert not np.allclose(continued, fresh)


@pytest.mark.parametrize("name", STATELESS)
def test_stateless_strategies_save_only_their_class(name, tmp_path, flower_task_identity):
    continued, resumed = _two_rounds_then_resume(name, {}, tmp_path)
    np.testing.assert_array_equal(continued, resumed)
    assert list(strategy_state(build_strategy(name, {}, COMMON))) == ["strategy"]


class CountingFedAvg(FedAvg):
    """A plug-in with its own state: how many rounds it aggregated."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rounds = 0

    def aggregate_train(self, server_round, replies):
        self.rounds += 1
        return super().aggregate_train(server_round, replies)

    def state_dict(self) -> dict:
        return {"rounds": np.array(self.rounds)}

    def load_state_dict(self, state) -> None:
        self.rounds = int(state["rounds"])


def test_plugin_state_dict_is_used(tmp_path):
    strategy = CountingFedAvg()
    strategy.rounds = 4
    restored = CountingFedAvg()
    load_strategy_state(restored, _save_and_load(strategy_state(strategy), tmp_path / "s.npz"))
    assert restored.rounds == 4


def test_state_of_another_strategy_is_refused():
    state = strategy_state(build_strategy("fedadam"))
    with pytest.raises(StrategyStateError, match=r"saved strategy state is for '.*FedAdam', not '.*FedYogi'"):
        load_strategy_state(build_strategy("fedyogi"), state)


def test_non_array_plugin_state_is_refused():
    class Sloppy(FedAvg):
        def state_dict(self) -> dict:
            return {"history": [1, 2, 3]}

        def load_state_dict(self, state) -> None:
            pass

    with pytest.raises(StrategyStateError, match="state 'history' is a list; expected a numeric ndarray or a scalar"):
        strategy_state(Sloppy())
