"""Strategy registry: built-ins build from config (each also runs a round on Flower's engine in
tests/test_strategies_engine.py); parameters are checked against constructor signatures;
plug-ins load by module:Class and by entry point, and each way a plug-in can be wrong fails with
a clear StrategyError."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from strategy_helpers import StaticGrid, client_reply, mlp, random_clients, run_round

from fedvault.strategies.registry import (
    REQUIRED,
    StrategyError,
    build_strategy,
    builtin_strategies,
    format_strategies,
    list_strategies,
)

pytestmark = pytest.mark.timeout(60)  # Flower's node sampling waits forever for missing nodes

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "custom_strategy"
EXAMPLE_CLASS = "fedvault_example_strategy.clipped_fedavg:ClippedFedAvg"
NUM_CLIENTS = 4
COMMON = {
    "fraction-train": 1.0,
    "fraction-evaluate": 0.5,
    "min-train-nodes": NUM_CLIENTS,
    "min-available-nodes": NUM_CLIENTS,
    "num-clients": NUM_CLIENTS,
    "client-learning-rate": 0.1,
}


@pytest.fixture
def example_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))


def _flat(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.numpy().ravel().astype(np.float64) for a in record.values()])


def test_builtins_cover_flower_and_fedvault_strategies():
    assert set(builtin_strategies()) == {
        "fedavg",
        "fedavgm",
        "fedprox",
        "fedadagrad",
        "fedadam",
        "fedyogi",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "multikrum",
        "bulyan",
        "qfedavg",
        "scaffold",
        "fednova",
    }


def test_fedavg_from_config_is_the_example_weighted_mean(flower_task_identity):
    strategy = build_strategy("FedAvg", {}, COMMON)
    model, clients = mlp(), random_clients(NUM_CLIENTS)
    initial = ArrayRecord(model.state_dict())
    messages = strategy.configure_train(1, initial, ConfigRecord(), StaticGrid(clients))
    replies = [
        client_reply(m, clients[m.metadata.dst_node_id], model, torch.nn.functional.cross_entropy) for m in messages
    ]
    weights = np.array([float(r.content["metrics"]["num-examples"]) for r in replies])
    expected = sum(w * _flat(r.content["arrays"]) for w, r in zip(weights / weights.sum(), replies))
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(_flat(arrays), expected, rtol=1e-6)


def test_names_are_case_insensitive_and_params_hyphenated():
    strategy = build_strategy("FedAdam", {"eta-l": 0.05, "beta-1": 0.8, "eta": 1}, COMMON)
    assert type(strategy).__name__ == "FedAdam"
    assert (strategy.eta_l, strategy.beta_1) == (0.05, 0.8)
    assert isinstance(strategy.eta, float) and strategy.eta == 1.0  # int widened to float


def test_common_values_go_only_where_accepted():
    fedavg = build_strategy("fedavg", {}, {"fraction-train": 0.5, "num-clients": 7})
    scaffold = build_strategy("scaffold", {}, {"fraction-train": 0.5, "num-clients": 7})
    assert fedavg.fraction_train == 0.5 and not hasattr(fedavg, "num_clients")
    assert scaffold.fraction_train == 0.5 and scaffold.num_clients == 7


def test_strategy_params_override_common():
    strategy = build_strategy("fedprox", {"fraction-train": 0.25, "proximal-mu": 0.1}, {"fraction-train": 0.5})
    assert strategy.fraction_train == 0.25 and strategy.proximal_mu == 0.1


def test_unknown_parameter_names_it_and_lists_valid_ones():
    with pytest.raises(StrategyError) as err:
        build_strategy("fedavgm", {"server-momentun": 0.9})
    message = str(err.value)
    assert "'server-momentun'" in message and "server-momentum" in message and "server-learning-rate" in message


def test_wrong_type_names_param_value_and_expected_type():
    with pytest.raises(StrategyError, match=r"parameter 'beta-2' got 'high' \(str\), expected float"):
        build_strategy("fedyogi", {"beta-2": "high"})
    with pytest.raises(StrategyError, match=r"parameter 'num-malicious-nodes' got 1.5 \(float\), expected int"):
        build_strategy("krum", {"num-malicious-nodes": 1.5})
    with pytest.raises(StrategyError, match=r"parameter 'eta' got True \(bool\), expected float"):
        build_strategy("fedadagrad", {"eta": True})


def test_callable_parameters_cannot_be_set_from_config():
    with pytest.raises(StrategyError, match="'train-metrics-aggr-fn' takes Callable"):
        build_strategy("fedavg", {"train-metrics-aggr-fn": "mean"})


def test_missing_required_parameter_is_named():
    with pytest.raises(StrategyError, match="'qfedavg' needs parameter.*client-learning-rate"):
        build_strategy("qfedavg", {})


def test_unknown_name_lists_choices():
    with pytest.raises(StrategyError, match=r"unknown strategy 'fedsgd' \(choose one of .*fedavg.*scaffold"):
        build_strategy("fedsgd")


def test_builtin_rejecting_a_value_is_a_strategy_error():
    with pytest.raises(StrategyError, match=r"'fednova' rejected its parameters \{server-learning-rate=0.0\}"):
        build_strategy("fednova", {"server-learning-rate": 0.0})


def test_listing_shows_params_defaults_and_doc():
    infos = {info.name: info for info in list_strategies()}
    assert set(builtin_strategies()) <= set(infos)
    qfedavg = {p.name: p.default for p in infos["qfedavg"].params}
    assert qfedavg["client-learning-rate"] is REQUIRED and qfedavg["q"] == 0.1
    scaffold = {p.name: p.default for p in infos["scaffold"].params}
    assert scaffold["server-learning-rate"] == 1.0 and scaffold["fraction-train"] == 1.0  # inherited via **kwargs
    assert "SCAFFOLD" in infos["scaffold"].doc
    assert "strategy.eta-l = 0.1" in format_strategies([infos["fedadam"]])


# ---- plug-ins ------------------------------------------------------------------------------


def test_module_class_plugin_aggregates_real_messages_and_clips(example_on_path, flower_task_identity):
    bound = 0.05
    plugin = build_strategy(EXAMPLE_CLASS, {"max-update-norm": bound}, COMMON)
    fedavg = build_strategy("fedavg", {}, COMMON)
    model = mlp()
    initial = ArrayRecord(model.state_dict())
    clipped, metrics = run_round(plugin, initial, random_clients(NUM_CLIENTS, lr=0.5), model)
    plain, _ = run_round(fedavg, initial, random_clients(NUM_CLIENTS, lr=0.5), model)
    assert np.linalg.norm(_flat(plain) - _flat(initial)) > bound  # the bound binds in this setup
    assert np.linalg.norm(_flat(clipped) - _flat(initial)) <= bound * (1 + 1e-6)
    assert "train_loss" in metrics


def test_plugin_import_failure_is_clear():
    with pytest.raises(StrategyError, match="cannot import module 'no_such_pkg.strategies'"):
        build_strategy("no_such_pkg.strategies:Mine")


def test_plugin_missing_attribute_is_clear(example_on_path):
    with pytest.raises(StrategyError, match="has no attribute 'Nope'"):
        build_strategy("fedvault_example_strategy.clipped_fedavg:Nope")


def test_plugin_that_is_not_a_strategy_is_clear(tmp_path, monkeypatch):
    (tmp_path / "not_strategies.py").write_text("class Plain:\n    pass\n\ndef make():\n    return 42\n\nVALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(StrategyError, match="is class Plain, not a subclass of flwr.serverapp.strategy.Strategy"):
        build_strategy("not_strategies:Plain")
    with pytest.raises(StrategyError, match="built a int, not a flwr.serverapp.strategy.Strategy"):
        build_strategy("not_strategies:make")
    with pytest.raises(StrategyError, match="is a int, not a Strategy class or factory"):
        build_strategy("not_strategies:VALUE")


def test_plugin_rejecting_parameters_is_clear(example_on_path):
    with pytest.raises(
        StrategyError, match=r"rejected its parameters \{max-update-norm=0.0\}: max_update_norm must be > 0"
    ):
        build_strategy(EXAMPLE_CLASS, {"max-update-norm": 0})
    with pytest.raises(StrategyError, match="has no parameter 'clip'"):
        build_strategy(EXAMPLE_CLASS, {"clip": 1.0})


def _register_entry_points(root: Path, lines: str) -> None:
    """A real installed-distribution record (dist-info) declaring entry points."""
    dist = root / "fedvault_test_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fedvault-test-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedvault.strategies]\n" + lines)


def test_entry_point_plugin_builds_and_is_listed(tmp_path, example_on_path, monkeypatch, flower_task_identity):
    _register_entry_points(tmp_path, f"clipped-fedavg = {EXAMPLE_CLASS}\nbroken = no_such_module_xyz:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    strategy = build_strategy("Clipped-FedAvg", {"max-update-norm": 2.0}, COMMON)
    assert type(strategy).__name__ == "ClippedFedAvg" and strategy.max_update_norm == 2.0
    model = mlp()
    arrays, _ = run_round(strategy, ArrayRecord(model.state_dict()), random_clients(NUM_CLIENTS), model)
    assert arrays is not None and math.isfinite(float(np.sum(_flat(arrays))))

    infos = {info.name: info for info in list_strategies()}
    assert [p.name for p in infos["clipped-fedavg"].params][0] == "max-update-norm"
    assert infos["clipped-fedavg"].source == f"entry point {EXAMPLE_CLASS}"
    assert infos["broken"].doc.startswith("cannot load:") and "no_such_module_xyz" in infos["broken"].doc
    with pytest.raises(StrategyError, match="entry point 'broken' in group 'fedvault.strategies' failed to load"):
        build_strategy("broken")


def test_the_short_listing_shows_only_what_a_config_sets_and_the_details_say_where_the_rest_comes_from():
    from fedvault.config import RunConfig
    from fedvault.server.app import make_strategy
    from fedvault.strategies.registry import RECORD_KEYS, RUN_SETTINGS, format_strategy

    infos = {info.name: info for info in list_strategies()}
    short = format_strategies(list(infos.values()))
    assert "strategy.server-momentum = 0.0" in short and "fraction-train" not in short and "arrayrecord" not in short
    assert len(short.splitlines()) < 60
    detail = format_strategy(infos["fedavgm"])
    assert "min-available-nodes: set from the run config (num-clients)" in detail
    assert "weighted-by-key: Flower's default 'num-examples'" in detail
    built = make_strategy(RunConfig.from_flat({"strategy.name": "fedavgm", "num-clients": 6, "fraction-train": 0.5}))
    assert built.min_available_nodes == 6 and built.min_train_nodes == 3  # the values RUN_SETTINGS describes
    assert RUN_SETTINGS.keys().isdisjoint(RECORD_KEYS)
