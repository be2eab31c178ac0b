"""The ClientApp's handlers, called with real Flower Messages and Contexts."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedvault.client.app import build_client_app
from fedvault.client.node import DataSelection, client_data
from fedvault.config import RunConfig
from fedvault.tasks import load_task

CFG = RunConfig.from_flat(
    {
        "task": "digits",
        "num-clients": 4,
        "local-epochs": 1,
        "batch-size": 32,
        "learning-rate": 0.05,
        "privacy.sample-level": False,
    }
)


def _context(partition_id: int) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": partition_id, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )


def _message(kind: str, model: torch.nn.Module) -> Message:
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    return Message(content, dst_node_id=7, message_type=kind)


def test_train_reply_uses_flower_keys_and_changes_weights(flower_task_identity):
    torch.manual_seed(0)
    model = load_task("digits").build_model()
    msg = _message("train", model)
    reply = build_client_app(CFG)(msg, _context(0))
    assert not reply.has_error()
    assert set(reply.content.array_records) == {"arrays"} and set(reply.content.metric_records) == {"metrics"}
    metrics = reply.content["metrics"]
    train, _ = client_data(DataSelection.from_run(CFG, {"partition-id": 0, "num-partitions": 4}))
    assert metrics["num-examples"] == len(train) > 0
    assert metrics["train_steps"] > 0 and metrics["train_loss"] > 0
    new = reply.content["arrays"].to_torch_state_dict()
    assert new.keys() == model.state_dict().keys()
    assert any(not torch.equal(new[k], v) for k, v in model.state_dict().items())
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id


def test_evaluate_reply_reports_local_test_metrics(flower_task_identity):
    model = load_task("digits").build_model()
    reply = build_client_app(CFG)(_message("evaluate", model), _context(1))
    metrics = reply.content["metrics"]
    _, test = client_data(DataSelection.from_run(CFG, {"partition-id": 1, "num-partitions": 4}))
    assert metrics["num-examples"] == len(test) > 0
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_loss"] > 0


def test_partitions_of_different_nodes_differ_and_load_once():
    a = client_data(DataSelection.from_run(CFG, {"partition-id": 0, "num-partitions": 4}))
    b = client_data(DataSelection.from_run(CFG, {"partition-id": 1, "num-partitions": 4}))
    assert not (len(a[0]) == len(b[0]) and (a[0].y == b[0].y).all() and (a[0].x == b[0].x).all())
    again = client_data(DataSelection.from_run(CFG, {"partition-id": 0, "num-partitions": 4}))
    assert again is a  # cached per process: a node loads its partition once


def test_app_reads_flower_run_config_when_none_is_baked_in(flower_task_identity):
    model = load_task("digits").build_model()
    ctx = _context(2)
    ctx.node_config["sealing"] = "off"  # the node's own policy (tests/test_client_policy.py): an unsealed experiment
    ctx.run_config = {"task": "digits", "num-clients": 4, "privacy.sample-level": False}
    reply = build_client_app()(_message("train", model), ctx)
    assert reply.content["metrics"]["num-examples"] > 0


def test_node_with_its_own_data_file_trains_on_it(tmp_path, flower_task_identity):
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", x=rng.normal(size=(50, 64)).astype(np.float32), y=rng.integers(0, 10, 50))
    ctx = _context(0)
    ctx.node_config = {"partition-id": 0, "num-partitions": 4, "data-path": str(tmp_path / "mine.npz"), "device": "cpu"}
    reply = build_client_app(CFG)(_message("train", load_task("digits").build_model()), ctx)
    assert reply.content["metrics"]["num-examples"] == 40  # 50 rows minus the 20 % local test split
