import tomllib
from pathlib import Path

import pytest

from fedvault.config import RunConfig, reference
from fedvault.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_flat_round_trips():
    cfg = RunConfig()
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


def test_toml_file_then_set_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('task = "digits"\nnum-server-rounds = 4\npartitioner = "dirichlet"\ndirichlet-alpha = 0.1\n')
    cfg = RunConfig.from_sources(path, ["num-server-rounds=7", "learning-rate=1"])
    assert (cfg.task, cfg.num_server_rounds, cfg.partitioner, cfg.dirichlet_alpha) == ("digits", 7, "dirichlet", 0.1)
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("num-server-rounds=0", "invalid value for 'num-server-rounds': 0 (must be >= 1)"),
        ("dirichlet-alpha=0", "invalid value for 'dirichlet-alpha': 0.0 (must be > 0)"),
        ("dirichlet-alpha=-1.5", "invalid value for 'dirichlet-alpha': -1.5 (must be > 0)"),
        ("partitioner=zipf", "invalid value for 'partitioner': 'zipf' (choose one of iid, dirichlet, shards)"),
        ("num-clients=many", "invalid value for 'num-clients': 'many' (expected int)"),
        ("amp=1", "invalid value for 'amp': 1 (expected bool)"),
        ("num-rounds=3", "unknown config key 'num-rounds' (from --set); did you mean 'num-server-rounds'?"),
        ("justtext", "--set expects key=value, got 'justtext'"),
    ],
)
def test_invalid_values_name_key_and_value(override, expected):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_sources(None, [override])
    assert str(info.value).startswith(expected)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[privacyy]\nepsilon = 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'privacyy.epsilon' \(in .*bad.toml\)"):
        RunConfig.from_sources(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        RunConfig.from_sources(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("task = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        RunConfig.from_sources(bad)


def test_fraction_that_samples_nobody_is_rejected():
    with pytest.raises(ConfigError, match="'fraction-train': 0.05 samples no client out of num-clients=10"):
        RunConfig.from_sources(None, ["fraction-train=0.05", "num-clients=10"])


def test_flower_run_config_uses_the_same_keys():
    cfg = RunConfig.from_sources(None, [], run_config={"task": "digits", "local-epochs": 2})
    assert cfg.task == "digits" and cfg.local_epochs == 2


def test_pyproject_declares_every_key_with_its_default():
    """`flwr run --run-config` only accepts keys declared in [tool.flwr.app.config]."""
    from flwr.common.config import flatten_dict  # what Flower does to [tool.flwr.app.config]

    declared = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert RunConfig.from_flat(declared) == RunConfig()
    assert sorted(declared) == sorted(key for key, *_ in reference())


# ---- validation on construction and the keyword constructor ------------------------------------


@pytest.mark.parametrize(
    "kwargs, flat",
    [
        ({"num_clients": 0}, {"num-clients": 0}),
        ({"fraction_train": 7.0}, {"fraction-train": 7.0}),
        ({"partitioner": "zipf"}, {"partitioner": "zipf"}),
        ({"amp": 1}, {"amp": 1}),
        ({"num_clients": "4"}, {"num-clients": "4"}),
        ({"num_clients": 10, "fraction_train": 0.05}, {"num-clients": 10, "fraction-train": 0.05}),
    ],
)
def test_constructor_raises_what_from_flat_raises(kwargs, flat):
    with pytest.raises(ConfigError) as direct:
        RunConfig(**kwargs)
    with pytest.raises(ConfigError) as from_flat:
        RunConfig.from_flat(flat)
    assert str(direct.value) == str(from_flat.value)


def test_sections_validate_on_construction_naming_the_full_key():
    from fedvault.config import AttackConfig, PrivacyConfig, SealingConfig

    with pytest.raises(ConfigError, match=r"^invalid value for 'privacy.target-epsilon': -1.0 \(must be > 0\)$"):
        PrivacyConfig(target_epsilon=-1)
    with pytest.raises(ConfigError, match=r"^invalid value for 'attack.fraction': 2.0 \(must be between 0 and 1\)$"):
        AttackConfig(fraction=2.0)
    with pytest.raises(ConfigError, match=r"'sealing.mode': 'sometimes' \(choose one of auto, on, off\)"):
        SealingConfig(mode="sometimes")
    with pytest.raises(ConfigError, match=r"^invalid value for 'privacy': \{'target-epsilon': 3\} \(expected Privacy"):
        RunConfig(privacy={"target-epsilon": 3})
    coerced = PrivacyConfig(target_epsilon=3).target_epsilon
    assert coerced == 3.0 and isinstance(coerced, float)


def test_cross_key_rules_apply_to_every_construction():
    import dataclasses

    from fedvault.config import PrivacyConfig, StrategyConfig

    cfg = RunConfig(strategy=StrategyConfig("scaffold"))
    with pytest.raises(ConfigError, match=r"^invalid value for 'strategy.name': 'scaffold' \(client-level DP"):
        dataclasses.replace(cfg, privacy=PrivacyConfig(client_level=True))


def test_each_section_names_itself_by_its_field():
    import dataclasses

    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            assert f.default_factory.SECTION == f.name


def test_create_maps_python_names_to_keys():
    cfg = RunConfig.create(
        task="digits",
        num_clients=4,
        num_server_rounds=3,
        privacy_target_epsilon=3,
        privacy_client_level=False,
        attack_kind="sign-flip",
        sealing_mode="off",
        validation_max_update_norm=50,
        strategy="fedprox",
        strategy_params={"proximal_mu": 0.1},
    )
    expected = RunConfig.from_flat(
        {
            "task": "digits",
            "num-clients": 4,
            "num-server-rounds": 3,
            "privacy.target-epsilon": 3.0,
            "attack.kind": "sign-flip",
            "sealing.mode": "off",
            "validation.max-update-norm": 50.0,
            "strategy.name": "fedprox",
            "strategy.proximal-mu": 0.1,
        }
    )
    assert cfg == expected
    assert cfg.privacy.target_epsilon == 3.0 and cfg.strategy.name == "fedprox"
    assert cfg.to_flat()["strategy.proximal-mu"] == 0.1
    assert RunConfig.create(strategy_name="fedprox") == RunConfig.create(strategy="fedprox")
    assert RunConfig.create() == RunConfig()


def test_every_key_has_exactly_one_keyword():
    from fedvault.config import keywords

    names = keywords()
    assert sorted(k for n, k in names.items() if n != "strategy") == sorted(key for key, *_ in reference())
    for name, key in names.items():
        assert name.isidentifier()
        default = RunConfig().to_flat()[key]
        assert RunConfig.create(**{name: default}) == RunConfig()


def test_with_options_copies_and_merges_strategy_params():
    base = RunConfig.create(strategy="fedprox", strategy_params={"proximal-mu": 0.1})
    changed = base.with_options(num_clients=3, strategy_params={"extra-param": 1})
    assert (base.num_clients, changed.num_clients) == (RunConfig().num_clients, 3)
    assert changed.strategy_params == (("extra-param", 1), ("proximal-mu", 0.1))


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (
            {"num_client": 4},
            "unknown config keyword 'num_client' (keywords are keys with '_' for '-' and '.', "
            "e.g. privacy_target_epsilon); close matches: num_clients",
        ),
        ({"target_epsilon": 3}, "unknown config keyword 'target_epsilon'"),
        (
            {"privacy_target_epsilon": -1.0},
            "invalid value for 'privacy.target-epsilon': -1.0 (must be > 0) (from keyword privacy_target_epsilon)",
        ),
        ({"num_clients": 2.5}, "invalid value for 'num-clients': 2.5 (expected int) (from keyword num_clients)"),
        ({"strategy_params": {"name": "x"}}, "strategy_params cannot set 'strategy.name'; use the keyword 'strategy'"),
        ({"strategy_params": [1, 2]}, "invalid value for keyword 'strategy_params'"),
    ],
)
def test_create_rejects_bad_keywords(kwargs, expected):
    with pytest.raises(ConfigError) as info:
        RunConfig.create(**kwargs)
    assert str(info.value).startswith(expected)


def test_unknown_keyword_lists_close_matches():
    with pytest.raises(ConfigError, match=r"close matches: privacy_target_epsilon.*privacy_target_delta"):
        RunConfig.create(privacy_target_epsilom=3)


def test_strategy_params_are_sorted_hyphenated_scalars():
    params = RunConfig(strategy_params={"b_param": 1, "a-param": "x"}).strategy_params
    assert params == (("a-param", "x"), ("b-param", 1))
    for bad in ({"p": [1]}, {"": 1}, {"x_y": 1, "x-y": 2}, 5):
        with pytest.raises(ConfigError, match="invalid value for 'strategy_params'"):
            RunConfig(strategy_params=bad)


def test_qfedavg_is_refused_under_dp_sgd_whose_clients_withhold_their_train_loss():
    with pytest.raises(ConfigError, match=r"'qfedavg' \(it weights each client by its train loss, which a DP-SGD"):
        RunConfig.from_flat({"strategy.name": "qfedavg"})
    assert RunConfig.from_flat({"strategy.name": "qfedavg", "privacy.sample-level": False}).strategy.name == "qfedavg"
