"""What a DP client's replies and a private run's directory release (fedvault.privacy.release).

The membership test of the review, rebuilt: two neighbouring local datasets (one record replaced
by a target record), a server-chosen model, the real ClientApp. Under DP-SGD every scalar of the
reply must be identical in both worlds (only the noised update, which the epsilon covers, may
differ); the non-private control shows the same test does see the target through ``train_loss``.
"""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedvault.client import private_training
from fedvault.client.app import build_client_app
from fedvault.client.node import client_data, training_data
from fedvault.config import RunConfig
from fedvault.privacy.dp_sgd import DPSGDError, PrivateTrainer, dp_compatible
from fedvault.privacy.release import client_level_round_record
from fedvault.tasks import load_task, load_task_data, make_loader


def _worlds(tmp_path) -> tuple[str, str]:
    """Two .npz datasets of 200 digits that differ in one record: a target with a wrong label."""
    pool = load_task_data("digits", 0).train
    x, y = pool.x[:200].copy(), pool.y[:200].copy()
    paths = []
    for name, (record_x, record_y) in {"without": (x[0], y[0]), "with": (x[1], (y[1] + 5) % 10)}.items():
        x[0], y[0] = record_x, record_y
        paths.append(str(tmp_path / f"{name}.npz"))
        np.savez(paths[-1], x=x, y=y)
    return paths[0], paths[1]


def _config(tmp_path, world: str, sample_level: bool) -> RunConfig:
    return RunConfig.from_flat(
        {
            "task": "digits",
            "batch-size": 32,
            "learning-rate": 0.05,
            "num-clients": 1,
            "num-server-rounds": 4,
            "local-epochs": 1,
            "run-dir": str(tmp_path / world),
            "privacy.sample-level": sample_level,
            "privacy.grad-sample-mode": "hooks",
        }
    )


def _reply(cfg: RunConfig, data_path: str, kind: str, server_round: int = 1) -> Message:
    torch.manual_seed(0)  # the server-chosen model: the same in both worlds
    model = dp_compatible(load_task("digits").build_model())
    config = ConfigRecord({"server-round": server_round})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    ctx = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 1, "data-path": data_path},
        state=RecordDict(),
        run_config={},
    )
    return build_client_app(cfg)(Message(content, dst_node_id=7, message_type=kind), ctx)


def _scalars(reply: Message) -> dict:
    """Every non-array value of the reply: metrics and config records (the DP event included)."""
    out = {f"metrics.{k}": v for name, rec in reply.content.metric_records.items() for k, v in rec.items()}
    out.update({f"{name}.{k}": v for name, rec in reply.content.config_records.items() for k, v in rec.items()})
    return out


@pytest.fixture(autouse=True)
def _fresh_caches():
    yield
    private_training.private_trainer.cache_clear()
    client_data.cache_clear()
    training_data.cache_clear()


def test_a_dp_clients_train_reply_carries_nothing_that_separates_a_target_record(tmp_path, flower_task_identity):
    without, with_target = _worlds(tmp_path)
    replies = {}
    for world, path in (("without", without), ("with", with_target)):
        replies[world] = [_reply(_config(tmp_path, world, True), path, "train", r) for r in (1, 2)]
    for a, b in zip(replies["without"], replies["with"]):
        assert not a.has_error() and not b.has_error()
        assert _scalars(a) == _scalars(b)  # metrics and DP event: functions of public quantities only
        assert {"train_loss", "train_seconds"}.isdisjoint(a.content["metrics"].keys())
        assert a.content["metrics"]["num-examples"] == 160 and a.content["metrics"]["train_steps"] > 0


def test_the_same_test_sees_the_target_without_dp(tmp_path, flower_task_identity):
    """Control: without DP the reply's train loss differs between the worlds (what the review exploited)."""
    without, with_target = _worlds(tmp_path)
    losses = [
        _reply(_config(tmp_path, world, False), path, "train").content["metrics"]["train_loss"]
        for world, path in (("without", without), ("with", with_target))
    ]
    assert losses[0] != losses[1]


def test_a_dp_client_withholds_local_evaluation(tmp_path, flower_task_identity):
    without, _ = _worlds(tmp_path)
    reply = _reply(_config(tmp_path, "without", True), without, "evaluate")
    assert dict(reply.content["metrics"]) == {"num-examples": 40}
    plain = _reply(_config(tmp_path, "plain", False), without, "evaluate")
    assert {"eval_loss", "eval_accuracy", "num-examples"} == set(plain.content["metrics"].keys())


def test_a_client_level_run_directory_keeps_only_the_servers_own_figures():
    record = {
        "round": 3,
        "train_config": {"lr": 0.1},
        "central": {"accuracy": 0.8},
        "seconds": 1.5,
        "train": {"train_loss": 0.3},
        "evaluate": {"eval_accuracy": 0.7},
        "clients_sampled": 4,
        "replies_ok": 3,
        "failed_nodes": [11],
        "dropped": [{"node": 12, "reason": "norm"}],
        "budget_exhausted": 0,
        "bytes_sent": 10,
        "bytes_received": 10,
    }
    assert client_level_round_record(record) == {
        "round": 3,
        "train_config": {"lr": 0.1},
        "central": {"accuracy": 0.8},
        "seconds": 1.5,
    }


def test_secure_mode_without_torchcsprng_is_a_clear_error():
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchcsprng is installed here: secure mode runs")
    data = load_task_data("digits", 0).train.subset(np.arange(64))
    task = load_task("digits")
    with pytest.raises(DPSGDError, match="privacy.secure-mode = true needs the torchcsprng package"):
        PrivateTrainer(
            task.build_model(),
            lambda params: torch.optim.SGD(params, lr=0.1),
            make_loader(data, 16, shuffle=False),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            criterion=task.criterion(),
            secure_mode=True,
        )
