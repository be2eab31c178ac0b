"""ClientLevelDP wraps a strategy: Poisson sampling, budget check, DP-FedAvg, the ledger before release."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedMedian, FedProx, FedYogi, Krum
from waits import seconds

from fedvault.config import RunConfig
from fedvault.errors import ConfigError
from fedvault.privacy.budget import Budget
from fedvault.privacy.client_level import DPFedAvgAggregator
from fedvault.privacy.events import SERVER_PARTY, DPEvent
from fedvault.privacy.ledger import Ledger, LedgerError
from fedvault.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, TRAIN_LOSS, train_config
from fedvault.server.checkpoint import Checkpoint, load_latest_checkpoint, save_checkpoint
from fedvault.server.client_level_dp import ClientLevelDP
from fedvault.server.rounds import EligibleGrid, RunStopped
from fedvault.strategies.arrays import to_ndarrays, to_record
from fedvault.strategies.fednova import FedNova
from fedvault.strategies.scaffold import Scaffold
from fedvault.strategies.state import load_strategy_state, strategy_state

NODES = list(range(1, 11))  # N = 10 enrolled clients
Q = 0.5


def wrapper(inner, ledger, z=1.3, clip=0.7, epsilon=1e6, adaptive=False) -> ClientLevelDP:
    aggregator = DPFedAvgAggregator(z, clip, expected_clients=Q * len(NODES), adaptive=adaptive)
    return ClientLevelDP(inner, aggregator=aggregator, sample_rate=Q, budget=Budget(epsilon, 1e-5), ledger=ledger)


def global_model(size: int = 40_000) -> ArrayRecord:
    return to_record({"w": np.zeros((size // 100, 100), np.float32), "b": np.zeros(100, np.float32)})


def replies_to(sent: list[Message], arrays: ArrayRecord) -> list[Message]:
    """Each sampled client sends ``arrays`` back (what the loop hands over after validation)."""
    replies = []
    for msg in sent:
        msg.metadata.__dict__["_message_id"] = f"ins-{msg.metadata.dst_node_id}"
        content = RecordDict({ARRAYS: arrays, METRICS: MetricRecord({NUM_EXAMPLES: 10, TRAIN_LOSS: 0.25})})
        replies.append(Message(content, reply_to=msg))
    return replies


def spy_on_release(dp: ClientLevelDP, ledger: Ledger) -> list[tuple[int, dict]]:
    """Record (ledger entries, the arrays) each time the wrapped strategy is handed the release."""
    seen, inner_aggregate = [], dp.strategy.aggregate_train

    def aggregate_train(server_round, replies):
        replies = list(replies)
        assert len(replies) == 1  # the noised mean is the sole reply
        seen.append((len(ledger.entries()), to_ndarrays(replies[0].content[ARRAYS])))
        return inner_aggregate(server_round, replies)

    dp.strategy.aggregate_train = aggregate_train  # on the instance: the class is what the wrapper checks
    return seen


def a_round(dp: ClientLevelDP, server_round: int, arrays: ArrayRecord, updated: ArrayRecord | None = None):
    sent = list(dp.configure_train(server_round, arrays, train_config(0.1, 1, 0.0), EligibleGrid(None, NODES)))
    return dp.aggregate_train(server_round, replies_to(sent, updated or arrays)), sent


def test_fedprox_under_client_level_dp_records_one_event_per_round_before_release(tmp_path, flower_task_identity):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    dp = wrapper(FedProx(proximal_mu=0.1, fraction_train=Q, min_available_nodes=1, min_train_nodes=1), ledger)
    seen = spy_on_release(dp, ledger)
    arrays, noise = global_model(), []
    for server_round in (1, 2, 3):
        (new_arrays, metrics), _ = a_round(dp, server_round, arrays)  # zero updates: the change is pure noise
        assert len(ledger.entries()) == server_round and seen[-1][0] == server_round  # recorded, then released
        noise += [(v - to_ndarrays(arrays)[k]).ravel() for k, v in to_ndarrays(new_arrays).items()]
        assert metrics is None  # the clients' train loss (0.25 in every reply) is not released
    events = [entry.event for entry in ledger.entries()]
    assert events == [DPEvent.dp_fedavg(noise_multiplier=1.3, sample_rate=Q, round=r) for r in (1, 2, 3)]
    assert all(e.party == SERVER_PARTY and e.kind == "client" and e.sampling == "poisson" for e in events)
    # N(0, (zC)^2) on the sum, divided by the fixed qN (McMahan et al. 2018): std z*C/(qN) on the mean
    assert np.concatenate(noise).std() == pytest.approx(1.3 * 0.7 / (Q * len(NODES)), rel=0.02)


def test_no_ledger_entry_no_release(tmp_path, flower_task_identity):
    class Refusing(Ledger):
        def append(self, event):
            raise LedgerError("disk full")

    ledger = Refusing(tmp_path / "ledger.jsonl")
    dp = wrapper(FedProx(fraction_train=Q, min_available_nodes=1, min_train_nodes=1), ledger)
    seen = spy_on_release(dp, ledger)
    with pytest.raises(LedgerError, match="disk full"):
        a_round(dp, 1, global_model(1000))
    assert seen == []


def test_fedavgm_momentum_steps_on_the_noised_mean(tmp_path, flower_task_identity):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    inner = FedAvgM(
        server_learning_rate=1.0, server_momentum=0.5, fraction_train=Q, min_available_nodes=1, min_train_nodes=1
    )
    dp = wrapper(inner, ledger)
    seen = spy_on_release(dp, ledger)
    g0 = global_model(1000)
    (g1, _), _ = a_round(dp, 1, g0, updated=to_record({k: v + 0.01 for k, v in to_ndarrays(g0).items()}))
    (g2, _), _ = a_round(dp, 2, g1, updated=to_record({k: v - 0.02 for k, v in to_ndarrays(g1).items()}))
    (_, m1), (_, m2) = seen
    old0, old1 = to_ndarrays(g0), to_ndarrays(g1)
    for k in old0:
        pg1, pg2 = old0[k] - m1[k], old1[k] - m2[k]  # pseudo-gradients from the private releases only
        np.testing.assert_allclose(old1[k], old0[k] - pg1, atol=1e-7)
        np.testing.assert_allclose(to_ndarrays(g2)[k], old1[k] - (0.5 * pg1 + pg2), atol=1e-6)
    assert [e.event.round for e in ledger.entries()] == [1, 2]


def test_poisson_sample_of_the_eligible_nodes_carries_the_inner_strategys_instruction(tmp_path, flower_task_identity):
    dp = wrapper(
        FedProx(proximal_mu=0.3, fraction_train=Q, min_available_nodes=1, min_train_nodes=1),
        Ledger(tmp_path / "ledger.jsonl"),
    )
    sizes = []
    for server_round in range(1, 41):
        sent = list(
            dp.configure_train(server_round, global_model(100), ConfigRecord({"lr": 0.1}), EligibleGrid(None, NODES))
        )
        assert {m.metadata.dst_node_id for m in sent} <= set(NODES)
        assert len({id(m.content) for m in sent}) <= 1  # one instruction for the whole sample
        for m in sent:
            assert m.content[CONFIG]["proximal-mu"] == 0.3 and m.metadata.message_type == "train"
        sizes.append(len(sent))
    assert len(set(sizes)) > 1  # Binomial(N, q), not Flower's fixed int(q N)


def test_the_server_budget_is_checked_before_the_round(tmp_path, flower_task_identity):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    dp = wrapper(FedProx(fraction_train=Q, min_available_nodes=1, min_train_nodes=1), ledger, z=1.0, epsilon=6.0)
    done = 0
    with pytest.raises(RunStopped) as stopped:
        for server_round in range(1, 50):
            a_round(dp, server_round, global_model(100))
            done = server_round
    assert 1 <= done < 49 and len(ledger.entries()) == done
    message = str(stopped.value)
    assert message.startswith(f"client-level privacy budget: round {done + 1} would spend epsilon ")
    assert message.endswith(f"> cap 6.000 (privacy.client-level-target-epsilon); stopping after round {done}")


def test_sampling_minimums_reach_the_wrapped_strategy(tmp_path):
    inner = FedProx(min_available_nodes=10, min_train_nodes=5)
    dp = wrapper(inner, Ledger(tmp_path / "ledger.jsonl"))
    dp.min_available_nodes = 3
    assert inner.min_available_nodes == 3 == dp.min_available_nodes and dp.min_train_nodes == 5


@pytest.mark.parametrize("inner", [FedAdam(), FedYogi(), FedAvgM(), FedProx()])
def test_weighted_mean_strategies_are_accepted(inner, tmp_path):
    assert wrapper(inner, Ledger(tmp_path / "ledger.jsonl")).strategy is inner


@pytest.mark.parametrize("inner", [Scaffold(), FedNova(), FedMedian(), Krum()])
def test_strategies_needing_individual_updates_are_refused_by_name(inner, tmp_path):
    with pytest.raises(ConfigError, match=f"client-level DP cannot wrap strategy {type(inner).__name__}"):
        wrapper(inner, Ledger(tmp_path / "ledger.jsonl"))


def test_config_accepts_weighted_means_and_refuses_the_rest():
    for name in ("fedavg", "fedprox", "fedavgm", "fedadam"):
        RunConfig.from_flat({"privacy.client-level": True, "strategy.name": name})
    with pytest.raises(ConfigError, match="'scaffold' .*needs every client's control-variate update"):
        RunConfig.from_flat({"privacy.client-level": True, "strategy.name": "scaffold"})


def test_state_dict_holds_the_inner_state_and_the_clip_norm(tmp_path, flower_task_identity):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    inner = FedAvgM(server_momentum=0.9, fraction_train=Q, min_available_nodes=1, min_train_nodes=1)
    dp = wrapper(inner, ledger, z=0.3, adaptive=True)
    arrays = global_model(1000)
    for server_round in (1, 2):
        (arrays, _), _ = a_round(dp, server_round, arrays)
    assert dp.aggregator.clip_norm != 0.7
    ckpt = Checkpoint(round=2, arrays={}, strategy_state=strategy_state(dp), rng_state={}, ledger_entries=2)
    save_checkpoint(tmp_path, ckpt)
    fresh = wrapper(FedAvgM(server_momentum=0.9), ledger, z=0.3, adaptive=True)
    load_strategy_state(fresh, load_latest_checkpoint(tmp_path).strategy_state)
    assert fresh.aggregator.clip_norm == dp.aggregator.clip_norm
    for before, after in zip(inner.momentum_vector, fresh.strategy.momentum_vector):
        assert before.tobytes() == after.tobytes()


@pytest.mark.integration
def test_fedavgm_under_client_level_dp_with_sealing_on_the_simulation_engine(tmp_path):
    """Both wrappers composed by run_server on Flower's real engine: sealed replies, one server event a round."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedvault.cli", "simulate", "--out", str(out)]
    # q = 0.75 of 4 clients: an empty Poisson sample (which fails a round) has probability 1/256 a round
    for item in (
        "task=digits",
        "batch-size=32",
        "learning-rate=0.05",
        "num-clients=4",
        "num-server-rounds=2",
        "fraction-train=0.75",
        "fraction-evaluate=0.0",
        "privacy.sample-level=false",
        "privacy.client-level=true",
        "privacy.client-noise-multiplier=1.0",
        "strategy.name=fedavgm",
        "strategy.server-momentum=0.5",
        "sealing.mode=on",
    ):
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds(420))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # the run directory keeps only the server's own figures: no client statistics or participation
    assert all(sorted(r) == ["central", "round", "seconds", "train_config"] for r in rounds[1:])
    assert "dropped reply" not in proc.stdout + proc.stderr  # every sealed reply opened (the operator's log)
    header, *spends = [json.loads(line) for line in (out / "privacy_ledger.jsonl").read_text().splitlines()]
    assert "header" in header  # delta and caps, then the spends
    ledger = [entry["event"] for entry in spends]
    assert ledger == [DPEvent.dp_fedavg(noise_multiplier=1.0, sample_rate=0.75, round=r).to_dict() for r in (1, 2)]
