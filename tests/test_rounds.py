"""The round loop's client wait: bounded by the round timeout, then sampling among who is there."""

from __future__ import annotations

import logging

import pytest
from flwr.serverapp.strategy import FedAvg

from fedvault.server.rounds import RoundLoop, RunStopped, minimums_at_most
from fedvault.strategies.validation import ValidationRules


class ChangingNodes:
    """Answers ``get_node_ids`` from a script of node lists (the last one repeats)."""

    def __init__(self, *lists: list[int]) -> None:
        self.lists, self.calls = list(lists), 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return list(self.lists[min(self.calls - 1, len(self.lists) - 1)])


def loop(grid, strategy, **kwargs) -> RoundLoop:
    return RoundLoop(strategy=strategy, grid=grid, central_evaluate=None, on_round=None, timeout=kwargs.pop("timeout", 0.3),
                     rules=ValidationRules(), poll_seconds=0.01, **kwargs)


def test_minimums_are_capped_for_the_block_and_restored_after():
    strategy = FedAvg(min_available_nodes=5, min_train_nodes=4, min_evaluate_nodes=1)
    with minimums_at_most(strategy, 3):
        assert (strategy.min_available_nodes, strategy.min_train_nodes, strategy.min_evaluate_nodes) == (3, 3, 1)
    assert (strategy.min_available_nodes, strategy.min_train_nodes, strategy.min_evaluate_nodes) == (5, 4, 1)


def test_waits_for_clients_that_are_still_connecting():
    grid = ChangingNodes([1], [1, 2], [1, 2, 3])
    eligible = loop(grid, FedAvg(min_available_nodes=3))._eligible_grid(1)
    assert eligible.get_node_ids() == [1, 2, 3]
    assert grid.calls == 3


def test_a_client_that_left_delays_the_round_by_at_most_the_timeout(caplog):
    grid = ChangingNodes([1, 3])
    with caplog.at_level(logging.WARNING, logger="fedvault"):
        eligible = loop(grid, FedAvg(min_available_nodes=3), timeout=0.2)._eligible_grid(4)
    assert eligible.get_node_ids() == [1, 3]
    assert "round 4: only 2 of 3 clients connected after 0.2 s; sampling among them" in caplog.text


def test_the_snapshot_is_what_the_strategy_samples_from():
    grid = ChangingNodes([1, 2, 3], [1, 2])  # node 3 leaves after the round started
    eligible = loop(grid, FedAvg(min_available_nodes=3))._eligible_grid(1)
    assert eligible.get_node_ids() == [1, 2, 3] == eligible.get_node_ids()


def test_exhausted_clients_are_not_eligible_and_too_few_stops_the_run():
    grid = ChangingNodes([1, 2, 3])
    rounds = loop(grid, FedAvg(min_available_nodes=3), exhausted={2})
    assert rounds._eligible_grid(2).get_node_ids() == [1, 3]
    rounds = loop(grid, FedAvg(min_available_nodes=3), exhausted={1, 3}, min_replies=2)
    with pytest.raises(RunStopped, match=r"round 5: 1 of 3 connected clients can train \(2 out of privacy budget\) "
                                         r"< min-replies=2; stopping after round 4"):
        rounds._eligible_grid(5)
