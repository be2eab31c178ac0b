"""Client profiles and the round clock: profile mixes, the virtual clock's arithmetic, and the
straggler policies (deadline, over-selection) with the privacy spend of every dropped client kept."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from strategy_helpers import InstantGrid, StaticGrid
from test_rounds import loop

from fedvault.client.simulated_device import SimulatedDevice, array_bytes
from fedvault.config import RunConfig
from fedvault.errors import ConfigError
from fedvault.privacy.events import DPEvent
from fedvault.privacy.ledger import Ledger
from fedvault.profiles import (
    BUILTIN_PROFILES,
    FAILURE_STREAM,
    ONLINE_STREAM,
    Profile,
    assign_profiles,
    draw,
    load_profile_file,
    parse_mix,
)
from fedvault.protocol import CLOCK, DP_EVENT, FAILED, OFFLINE, dp_event_record
from fedvault.server.clock import ClockedGrid
from fedvault.strategies.arrays import to_ndarrays, to_record

PHONE = BUILTIN_PROFILES["edge-phone"]


def test_a_mix_assigns_each_profile_its_share_of_the_clients_the_same_way_every_time():
    mix = parse_mix("datacenter-gpu:0.2,edge-phone:0.8", BUILTIN_PROFILES)
    profiles = assign_profiles(mix, 10, seed=3)
    assert sorted(p.name for p in profiles) == ["datacenter-gpu"] * 2 + ["edge-phone"] * 8
    assert assign_profiles(mix, 10, seed=3) == profiles and assign_profiles(mix, 10, seed=4) != profiles
    preset = [p.name for p in assign_profiles(parse_mix("mixed", BUILTIN_PROFILES), 7, seed=0)]
    assert (preset.count("datacenter-gpu"), preset.count("edge-laptop"), preset.count("edge-phone")) == (
        2,
        1,
        4,
    )  # a tie: the first


@pytest.mark.parametrize(
    "mix, message",
    [
        ("edge-phone:0.5", "fractions sum to 0.5, not 1"),
        ("tablet:1.0", "unknown profile 'tablet'"),
        ("edge-phone", "'edge-phone' is not NAME:FRACTION (presets: mixed, datacenter, edge)"),
        ("edge-phone:half", "fraction of 'edge-phone' is not a number: 'half'"),
    ],
)
def test_a_bad_mix_is_refused_naming_the_key_and_what_is_wrong(mix, message):
    with pytest.raises(ConfigError, match="federation.profiles") as caught:
        RunConfig.create(federation_profiles=mix)
    assert message in str(caught.value)


def test_user_defined_profiles_come_from_a_toml_file_and_a_bad_one_names_the_profile(tmp_path):
    path = tmp_path / "profiles.toml"
    path.write_text(
        "[tablet]\nexamples-per-second = 80.0\nuplink-mbps = 2.0\ndownlink-mbps = 20.0\navailability = 0.6\n"
    )
    (tablet,) = load_profile_file(path).values()
    assert tablet == Profile("tablet", 80.0, 2.0, 20.0, availability=0.6)
    path.write_text("[tablet]\nexamples-per-second = 80.0\nuplink-mbps = 0\ndownlink-mbps = 20.0\n")
    with pytest.raises(ConfigError, match="profile 'tablet': uplink-mbps must be > 0, got 0"):
        load_profile_file(path)
    path.write_text("[tablet]\nexamples-per-second = 80.0\nuplink = 2\ndownlink-mbps = 20.0\n")
    with pytest.raises(ConfigError, match=r"profile 'tablet': unknown keys \['uplink'\]"):
        load_profile_file(path)


def test_over_selection_is_refused_under_client_level_dp():
    with pytest.raises(ConfigError, match="federation.over-select"):
        RunConfig.create(privacy_sample_level=False, privacy_client_level=True, federation_over_select=0.3)


def test_the_virtual_clock_is_bytes_over_bandwidth_plus_examples_over_throughput(flower_task_identity):
    device = SimulatedDevice(PHONE, seed=1, partition=0)
    online_round = next(r for r in range(1, 100) if draw(1, 0, r, ONLINE_STREAM) < PHONE.availability)
    working_round = next(r for r in range(1, 100) if draw(1, 0, r, FAILURE_STREAM) >= PHONE.failure_rate)
    assert device.offline(online_round) is None
    instruction = RecordDict({"arrays": to_record({"w": np.zeros(1000, dtype=np.float32)})})  # 4000 bytes
    reply = RecordDict({"arrays": to_record({"w": np.zeros(250, dtype=np.float32)})})  # 1000 bytes
    clocked = device.finish(working_round, instruction, reply, examples=300)
    clock = clocked.config_records[CLOCK]
    down, up = array_bytes(instruction), array_bytes(reply)  # the arrays and their headers, as sent
    assert 4000 <= down < 4200 and 1000 <= up < 1200
    assert clock["download-s"] == pytest.approx(down * 8 / 30e6) and clock["upload-s"] == pytest.approx(up * 8 / 5e6)
    assert clock["compute-s"] == pytest.approx(300 / 150.0) and clock["profile"] == "edge-phone"
    assert clock["power-w"] == 3.0 and "arrays" in clocked.array_records


def test_an_offline_client_trains_nothing_and_a_failed_one_keeps_its_spend(flower_task_identity):
    device = SimulatedDevice(PHONE, seed=1, partition=0)
    offline_round = next(r for r in range(1, 100) if draw(1, 0, r, ONLINE_STREAM) >= PHONE.availability)
    offline = device.offline(offline_round)
    assert offline is not None and offline.config_records["status"]["status"] == OFFLINE
    failing_round = next(r for r in range(1, 100) if draw(1, 0, r, FAILURE_STREAM) < PHONE.failure_rate)
    paid = DPEvent.dp_sgd(noise_multiplier=1.1, sample_rate=0.1, steps=10, round=failing_round, party="client-0")
    reply = RecordDict({"arrays": to_record({"w": np.ones(4, dtype=np.float32)}), DP_EVENT: dp_event_record(paid)})
    failed = device.finish(failing_round, RecordDict(), reply, examples=10)
    assert failed.config_records["status"]["status"] == FAILED and not failed.array_records
    assert failed.config_records[DP_EVENT] is reply.config_records[DP_EVENT]
    assert failed.config_records[CLOCK]["upload-s"] == 0.0


class ProfiledGrid(InstantGrid):
    """Nodes whose replies carry a virtual clock of ``compute[node]`` seconds and a DP-SGD spend;
    a node in ``offline`` answers as an offline simulated device."""

    def __init__(self, compute: dict[int, float], offline: frozenset[int] = frozenset()) -> None:
        super().__init__(list(compute))
        self.compute, self.offline = compute, offline

    def answer(self, msg: Message) -> Message:
        from fedvault.protocol import refusal

        node = msg.metadata.dst_node_id
        if node in self.offline:
            return Message(refusal(OFFLINE, "edge-phone offline in round 1"), reply_to=msg)
        paid = DPEvent.dp_sgd(noise_multiplier=1.1, sample_rate=0.1, steps=10, round=1, party=f"client-{node}")
        clock = {"profile": "p", "download-s": 0.0, "compute-s": self.compute[node], "upload-s": 0.0, "power-w": 2.0}
        content = RecordDict(
            {
                "arrays": to_record({"w": np.full(3, float(node), dtype=np.float32)}),
                "metrics": MetricRecord({"num-examples": 10}),
                DP_EVENT: dp_event_record(paid),
                CLOCK: ConfigRecord(clock),
            }
        )
        return Message(content, reply_to=msg)


def one_round(tmp_path, grid: ClockedGrid, fraction: float = 1.0):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    records = []
    strategy = FedAvg(fraction_train=fraction, min_available_nodes=1, min_train_nodes=1, fraction_evaluate=0.0)
    round_loop = loop(grid, strategy, timeout=1.0, ledger=ledger)
    round_loop.central_evaluate = lambda server_round, arrays: {}
    round_loop.on_round = lambda record, arrays: records.append(record)
    arrays = round_loop._round(1, to_record({"w": np.zeros(3, dtype=np.float32)}), ConfigRecord())
    (record,) = records
    spends = sorted((e.node, e.status) for e in ledger.entries() if e.event is not None)
    return to_ndarrays(arrays)["w"], record, spends


def test_a_deadline_drops_exactly_the_clients_slower_than_it_and_records_their_spend(tmp_path, flower_task_identity):
    grid = ClockedGrid(ProfiledGrid({1: 2.0, 2: 9.0, 3: 10.5, 4: 30.0}), round_timeout=600, deadline=10.0, virtual=True)
    model, record, spends = one_round(tmp_path, grid)
    assert np.allclose(model, 1.5)  # the mean of nodes 1 and 2
    assert record["missed_deadline"] == [3, 4] and record["replies_ok"] == 2
    assert sorted(d["node"] for d in record["dropped"]) == [3, 4]
    assert all(d["reason"].startswith("missed the deadline: ") for d in record["dropped"])
    assert spends == [(1, "kept"), (2, "kept"), (3, "dropped"), (4, "dropped")]  # they trained: they paid
    assert record["round_clock_seconds"] == 10.0 and record["clock"] == "virtual"
    assert record["slowest_client"] == {"node": 4, "seconds": 30.0, "profile": "p"}
    assert record["energy_joules"] == pytest.approx(2.0 * (2.0 + 9.0 + 10.5 + 30.0))


def test_over_selection_aggregates_the_first_to_finish_and_the_round_ends_with_the_last_of_them(
    tmp_path, flower_task_identity
):
    times = {1: 5.0, 2: 1.0, 3: 7.0, 4: 3.0, 5: 4.0}
    grid = ClockedGrid(ProfiledGrid(times, offline=frozenset({5})), round_timeout=600, over_select=0.25, virtual=True)
    model, record, spends = one_round(tmp_path, grid)
    assert np.allclose(model, 2.5) and record["offline"] == [5]  # ceil(5 / 1.25) = 4: the four online ones
    assert record["over_selected"] == [] and record["round_clock_seconds"] == 7.0
    grid = ClockedGrid(ProfiledGrid(times), round_timeout=600, over_select=0.7, virtual=True)
    model, record, spends = one_round(tmp_path / "b", grid)
    assert np.allclose(model, np.mean([2, 4, 5]))  # ceil(5 / 1.7) = 3: the three fastest
    assert record["over_selected"] == [1, 3] and record["round_clock_seconds"] == 4.0
    assert spends == [(1, "dropped"), (2, "kept"), (3, "dropped"), (4, "kept"), (5, "kept")]


def test_wait_for_all_waits_for_the_round_timeout_when_a_sampled_client_is_offline(tmp_path, flower_task_identity):
    grid = ClockedGrid(ProfiledGrid({1: 2.0, 2: 3.0}, offline=frozenset({2})), round_timeout=120, virtual=True)
    model, record, _ = one_round(tmp_path, grid)
    assert np.allclose(model, 1.0) and record["offline"] == [2] and record["round_clock_seconds"] == 120
    grid = ClockedGrid(ProfiledGrid({1: 2.0, 2: 3.0}), round_timeout=120, virtual=True)
    _, record, _ = one_round(tmp_path / "b", grid)
    assert record["round_clock_seconds"] == 3.0 and record["offline"] == []


def test_a_deployed_server_times_replies_on_the_wall_clock_whatever_a_client_claims(tmp_path, flower_task_identity):
    grid = ClockedGrid(ProfiledGrid({1: 1e6, 2: 1e6}), round_timeout=600, deadline=60.0, virtual=False)
    model, record, _ = one_round(tmp_path, grid)
    assert record["clock"] == "wall" and record["missed_deadline"] == [] and np.allclose(model, 1.5)
    assert 0 <= record["slowest_client"]["seconds"] < 60 and "energy_joules" not in record


def test_an_adaptive_deadline_follows_the_round_before_and_survives_a_checkpoint(tmp_path, flower_task_identity):
    times = {1: 2.0, 2: 4.0, 3: 6.0, 4: 8.0}
    grid = ClockedGrid(ProfiledGrid(times), round_timeout=600, deadline_quantile=0.5, virtual=True)
    strategy = FedAvg(fraction_train=1.0, min_available_nodes=1, min_train_nodes=1, fraction_evaluate=0.0)
    records = []
    round_loop = loop(grid, strategy, timeout=1.0, ledger=Ledger(tmp_path / "ledger.jsonl"))
    round_loop.central_evaluate = lambda server_round, arrays: {}
    round_loop.on_round = lambda record, arrays: records.append(record)
    start = to_record({"w": np.zeros(3, dtype=np.float32)})
    round_loop._round(1, start, ConfigRecord())
    assert records[0]["deadline"] is None and records[0]["missed_deadline"] == []  # round 1: none given
    saved = round_loop.state_dict()
    assert saved["grid"] == {"deadline": 5.0}  # the median of 2, 4, 6, 8
    resumed = loop(ClockedGrid(ProfiledGrid(times), round_timeout=600, deadline_quantile=0.5, virtual=True), strategy)
    resumed.load_state_dict(saved)
    resumed.ledger, resumed.timeout = Ledger(tmp_path / "ledger.jsonl"), 1.0
    resumed.central_evaluate = lambda server_round, arrays: {}
    resumed.on_round = lambda record, arrays: records.append(record)
    resumed._round(2, start, ConfigRecord())
    assert records[1]["deadline"] == 5.0 and records[1]["missed_deadline"] == [3, 4]


def test_fedbuff_steps_with_the_first_updates_to_finish_weighting_stale_ones_down(tmp_path, flower_task_identity):
    """Four clients train at once; each step applies the two that finish first on the round clock. Round 2
    restarts the two that finished (at clock 2): node 1 (finishes at 3, fresh) and node 3 (finishes at 3,
    started a step earlier: weight 1/sqrt(2)) are applied; nodes 2 and 4 stay in the buffer."""
    from fedvault.server.fedbuff import FedBuff, staleness_weight

    assert staleness_weight(0) == 1.0 and staleness_weight(3) == 0.5
    fedbuff = FedBuff(FedAvg(fraction_evaluate=0.0), buffer_size=2, concurrency=4)
    grid = ClockedGrid(
        ProfiledGrid({1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}), 600, virtual=True, round_clock=fedbuff.take_advance
    )
    records = []
    round_loop = loop(grid, fedbuff, timeout=1.0, ledger=Ledger(tmp_path / "ledger.jsonl"))
    round_loop.central_evaluate = lambda server_round, arrays: {}
    round_loop.on_round = lambda record, arrays: records.append(record)
    model = round_loop._round(1, to_record({"w": np.zeros(3, dtype=np.float32)}), ConfigRecord())
    assert np.allclose(to_ndarrays(model)["w"], 1.5)  # nodes 1 and 2: deltas 1 and 2, equal weights
    assert records[0]["round_clock_seconds"] == 2.0 and records[0]["train"]["fedbuff_held"] == 2
    model = round_loop._round(2, model, ConfigRecord())
    assert records[1]["clients_sampled"] == 2  # the two free slots
    expected = 1.5 + (10 * (1.0 - 1.5) + 10 * 3.0 * staleness_weight(1)) / 20
    assert np.allclose(to_ndarrays(model)["w"], expected)
    assert records[1]["round_clock_seconds"] == 1.0 and records[1]["train"]["fedbuff_max_staleness"] == 1
    restored = FedBuff(FedAvg(fraction_evaluate=0.0), buffer_size=2, concurrency=4)
    restored.load_state_dict(fedbuff.state_dict())
    assert (restored.step, restored.clock) == (2, 3.0)
    assert [(u.finish, u.node, u.step) for u in restored.held] == [(4.0, 2, 1), (4.0, 4, 0)]
    assert all(np.array_equal(a.delta["w"], b.delta["w"]) for a, b in zip(restored.held, fedbuff.held))


def test_fedbuff_sends_to_the_grids_own_64_bit_node_ids(flower_task_identity):
    """Flower's node ids use all 64 bits; sampling must not round them through a float."""
    from fedvault.server.fedbuff import FedBuff

    ids = [2**64 - 1, 2**63 + 1, 14256342947120070656, 3]
    fedbuff = FedBuff(FedAvg(fraction_evaluate=0.0), buffer_size=2, concurrency=3, seed=7)
    messages = list(fedbuff.configure_train(1, to_record({"w": np.zeros(3)}), ConfigRecord(), StaticGrid(ids)))
    sent = [m.metadata.dst_node_id for m in messages]
    assert len(sent) == 3 and set(sent) <= set(ids) and len(set(sent)) == 3


def test_fedbuff_needs_the_virtual_clock_and_takes_no_synchronous_policy():
    with pytest.raises(ConfigError, match="set federation.profiles"):
        RunConfig.create(federation_fedbuff_buffer=2)
    with pytest.raises(ConfigError, match="no deadline or over-selection"):
        RunConfig.create(federation_profiles="mixed", federation_fedbuff_buffer=2, federation_deadline=3.0)
