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
        RunConfig.from_sources(None, ["fraction-train=0.05"])


def test_flower_run_config_uses_the_same_keys():
    cfg = RunConfig.from_sources(None, [], run_config={"task": "digits", "local-epochs": 2})
    assert cfg.task == "digits" and cfg.local_epochs == 2


def test_pyproject_declares_every_key_with_its_default():
    """`flwr run --run-config` only accepts keys declared in [tool.flwr.app.config]."""
    from flwr.common.config import flatten_dict  # what Flower does to [tool.flwr.app.config]

    declared = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert RunConfig.from_flat(declared) == RunConfig()
    assert sorted(declared) == sorted(key for key, *_ in reference())
