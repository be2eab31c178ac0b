"""The round loop's client wait (bounded by the round timeout, then sampling among who is there) and its state."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM
from strategy_helpers import InstantGrid

from fedvault.privacy.budget import Budget
from fedvault.privacy.client_level import DPFedAvgAggregator
from fedvault.privacy.ledger import Ledger
from fedvault.rundir import RunDirectory
from fedvault.server.client_level_dp import ClientLevelDP
from fedvault.server.resume import checkpoint_round, restore
from fedvault.server.rounds import RoundLoop, RunStopped, minimums_at_most
from fedvault.strategies.arrays import to_ndarrays, to_record
from fedvault.strategies.validation import ValidationRules


class ChangingNodes:
    """Answers ``get_node_ids`` from a script of node lists (the last one repeats)."""

    def __init__(self, *lists: list[int]) -> None:
        self.lists, self.calls = list(lists), 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return list(self.lists[min(self.calls - 1, len(self.lists) - 1)])


def loop(grid, strategy, **kwargs) -> RoundLoop:
    return RoundLoop(
        strategy=strategy,
        grid=grid,
        central_evaluate=None,
        on_round=None,
        timeout=kwargs.pop("timeout", 0.3),
        rules=ValidationRules(),
        poll_seconds=0.01,
        **kwargs,
    )


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
    with pytest.raises(
        RunStopped,
        match=r"round 5: 1 of 3 connected clients can train \(2 out of privacy budget\) "
        r"< min-replies=2; stopping after round 4",
    ):
        rounds._eligible_grid(5)


def test_state_dict_round_trips_through_a_checkpoint_bitwise(tmp_path):
    """Strategy state (the client-level DP wrapper's: inner FedAvgM momentum + clip norm) and the exhausted set."""
    rng = np.random.default_rng(3)
    arrays = to_record({"w": rng.standard_normal((4, 3)).astype(np.float32)})

    def wrapped() -> ClientLevelDP:
        return ClientLevelDP(
            FedAvgM(server_momentum=0.9),
            aggregator=DPFedAvgAggregator(1.0, 1.0, expected_clients=2),
            sample_rate=0.5,
            budget=Budget(10.0, 1e-5),
            ledger=Ledger(tmp_path / "ledger.jsonl"),
        )

    before = loop(ChangingNodes([1]), wrapped(), exhausted={4, 2})
    before.strategy.strategy.current_arrays = arrays
    before.strategy.strategy.momentum_vector = [rng.standard_normal((4, 3))]
    before.strategy.aggregator.load_state_dict({"clip_norm": 0.1 + 0.2})
    checkpoint_round(tmp_path, before, 3, arrays)

    after = loop(ChangingNodes([1]), wrapped())
    restored, first_round = restore(RunDirectory(tmp_path), after, arrays)
    assert first_round == 4 and restored["w"].numpy().tobytes() == arrays["w"].numpy().tobytes()
    assert after.exhausted == {2, 4} and after.strategy.aggregator.clip_norm == 0.1 + 0.2
    assert after.strategy.strategy.momentum_vector[0].tobytes() == before.strategy.strategy.momentum_vector[0].tobytes()
    assert to_ndarrays(after.strategy.strategy.current_arrays)["w"].tobytes() == arrays["w"].numpy().tobytes()
    assert set(after.state_dict()["strategy"]) == set(before.state_dict()["strategy"])


def test_state_dict_of_an_unwrapped_strategy():
    strategy = FedAdam()
    strategy.m_t, strategy.v_t, strategy.current_arrays = {"w": np.ones(3)}, {"w": np.full(3, 2.0)}, {"w": np.zeros(3)}
    state = loop(ChangingNodes([1]), strategy, exhausted={5}).state_dict()
    assert state["exhausted"] == [5] and str(state["strategy"]["strategy"]).endswith("FedAdam")
    fresh = loop(ChangingNodes([1]), FedAdam())
    fresh.load_state_dict(state)
    assert fresh.exhausted == {5} and fresh.strategy.v_t["w"].tolist() == [2.0, 2.0, 2.0]


class RefusingGrid(InstantGrid):
    """Node 11 refuses the round as already spent; nodes 12 and 13 send an ordinary update."""

    def __init__(self) -> None:
        super().__init__([11, 12, 13])

    def answer(self, msg):
        from flwr.app import Message, MetricRecord, RecordDict

        from fedvault.protocol import ROUND_ALREADY_SPENT, refusal

        if msg.metadata.dst_node_id == 11:
            content = refusal(ROUND_ALREADY_SPENT, "round 1 was already trained and paid for")
        else:
            update = to_record({"w": np.ones(3, dtype=np.float32)})
            content = RecordDict({"arrays": update, "metrics": MetricRecord({"num-examples": 10})})
        return Message(content, reply_to=msg)


def test_a_refusal_is_recorded_as_what_it_is_not_as_a_malformed_update(flower_task_identity):
    records = []
    strategy = FedAvg(fraction_train=1.0, min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0)
    round_loop = loop(RefusingGrid(), strategy, timeout=1.0)
    round_loop.central_evaluate = lambda server_round, arrays: {}
    round_loop.on_round = lambda record, arrays: records.append(record)
    arrays = round_loop._round(1, to_record({"w": np.zeros(3, dtype=np.float32)}), ConfigRecord())
    (record,) = records
    assert record["replies_ok"] == 2 and np.allclose(to_ndarrays(arrays)["w"], 1.0)
    assert record["dropped"] == [
        {"node": 11, "reason": "refused ('round-already-spent'): 'round 1 was already trained and paid for'"}
    ]


class PaidBeforeGrid(InstantGrid):
    """Every node refuses round 2 as already spent (a resumed run re-running the round it was
    killed in), reporting the DP event it paid then."""

    def answer(self, msg):
        from flwr.app import Message

        from fedvault.privacy.events import DPEvent
        from fedvault.protocol import ROUND_ALREADY_SPENT, refusal

        node = msg.metadata.dst_node_id
        paid = DPEvent.dp_sgd(noise_multiplier=1.1, sample_rate=0.1, steps=10, round=2, party=f"client-{node}")
        return Message(refusal(ROUND_ALREADY_SPENT, "round 2 was already trained and paid for", paid), reply_to=msg)


def test_a_round_every_client_paid_for_before_an_interruption_is_lost_recorded_and_passed(
    tmp_path, caplog, flower_task_identity
):
    from fedvault.privacy.events import DPEvent

    ledger = Ledger(tmp_path / "ledger.jsonl")
    received_before = DPEvent.dp_sgd(noise_multiplier=1.1, sample_rate=0.1, steps=10, round=2, party="client-11")
    ledger.append(received_before, node=11)  # the server had recorded node 11's reply before it died
    records = []
    strategy = FedAvg(fraction_train=1.0, min_available_nodes=2, min_train_nodes=2, fraction_evaluate=0.0)
    round_loop = loop(PaidBeforeGrid([11, 12]), strategy, timeout=1.0, ledger=ledger)
    round_loop.central_evaluate = lambda server_round, arrays: {}
    round_loop.on_round = lambda record, arrays: records.append(record)
    start = to_record({"w": np.full(3, 0.5, dtype=np.float32)})
    with caplog.at_level(logging.WARNING, logger="fedvault"):
        arrays = round_loop._round(2, start, ConfigRecord())
    (record,) = records
    assert np.array_equal(to_ndarrays(arrays)["w"], to_ndarrays(start)["w"]) and record["replies_ok"] == 0
    assert record["lost"].startswith("round 2 lost: 2 sampled clients paid for it before an interruption")
    assert "round 2 lost" in caplog.text and sorted(d["node"] for d in record["dropped"]) == [11, 12]
    spent = [(e.node, e.status, e.event.party) for e in ledger.entries() if e.event is not None]
    assert spent == [(11, "kept", "client-11"), (12, "dropped", "client-12")]  # node 11's spend is not counted twice


def test_an_empty_poisson_sample_is_a_round_that_releases_noise_alone(tmp_path, flower_task_identity):
    """Client-level DP samples each client with probability q, so a round may sample nobody: the
    accountant counts it as a release (noise / qN), and the run goes on instead of stopping."""
    ledger = Ledger(tmp_path / "ledger.jsonl")
    strategy = ClientLevelDP(
        FedAvg(fraction_evaluate=0.0),
        aggregator=DPFedAvgAggregator(1.0, 1.0, expected_clients=2),
        sample_rate=1e-12,  # nobody, in practice
        budget=Budget(10.0, 1e-5),
        ledger=ledger,
    )
    records = []
    round_loop = loop(InstantGrid([11, 12]), strategy)
    round_loop.central_evaluate = lambda server_round, arrays: {}
    round_loop.on_round = lambda record, arrays: records.append(record)
    start = to_record({"w": np.zeros(1000, dtype=np.float32)})
    arrays = round_loop._round(1, start, ConfigRecord())
    (record,) = records
    assert record["round"] == 1 and "lost" not in record
    noise = to_ndarrays(arrays)["w"]
    assert 0.4 < float(noise.std()) < 0.6  # z * C / (q N) = 1 * 1 / 2
    assert [e.event.round for e in ledger.entries() if e.event is not None] == [1]
