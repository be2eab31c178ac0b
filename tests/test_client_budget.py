"""Sample-level DP in the ClientApp: budget checked before training, spend recorded before the
reply, and a restarted client continues its epsilon instead of starting over."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedvault.client import private_training
from fedvault.client.app import build_client_app
from fedvault.config import RunConfig
from fedvault.privacy.accountants import epsilon
from fedvault.privacy.dp_sgd import dp_compatible
from fedvault.privacy.node_ledger import NodeLedger
from fedvault.protocol import BUDGET_EXHAUSTED, ROUND_ALREADY_SPENT
from fedvault.tasks import load_task


def _config(tmp_path) -> RunConfig:
    return RunConfig.from_flat(
        {
            "task": "digits",
            "batch-size": 32,
            "learning-rate": 0.05,
            "num-clients": 4,
            "num-server-rounds": 2,
            "local-epochs": 1,
            "run-dir": str(tmp_path / "run"),
            "privacy.target-epsilon": 2.0,
            "privacy.grad-sample-mode": "hooks",
        }
    )


def _train(app, server_round: int) -> Message:
    torch.manual_seed(0)
    model = dp_compatible(load_task("digits").build_model())
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": server_round})}
    )
    ctx = Context(
        run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 4}, state=RecordDict(), run_config={}
    )
    return app(Message(content, dst_node_id=7, message_type="train"), ctx)


def _restart_process():
    """What a new client process starts with: no cached Opacus engine."""
    private_training.private_trainer.cache_clear()


def test_spend_is_recorded_and_travels_in_the_reply(tmp_path, flower_task_identity):
    cfg = _config(tmp_path)
    reply = _train(build_client_app(cfg), 1)
    event = dict(reply.content["dp-event"])
    assert event["party"] == "client-1" and event["round"] == 1 and event["steps"] > 0
    stored = NodeLedger(tmp_path / "run" / "node-ledger.sqlite").events("run", "client-1")
    assert [e.to_dict() for e in stored] == [event]


def test_no_client_passes_its_cap_even_across_a_restart(tmp_path, flower_task_identity):
    cfg = _config(tmp_path)
    ledger = NodeLedger(tmp_path / "run" / "node-ledger.sqlite")
    for server_round in (1, 2):  # the planned rounds fit the cap exactly
        _restart_process()
        assert "arrays" in _train(build_client_app(cfg), server_round).content
    spent = epsilon(ledger.events("run", "client-1"), 1e-5)
    assert 1.8 < spent <= 2.0
    _restart_process()  # a restarted client must not start its epsilon over
    refused = _train(build_client_app(cfg), 3)
    assert refused.content["status"]["status"] == BUDGET_EXHAUSTED
    assert "arrays" not in refused.content and "dp-event" not in refused.content
    replayed = _train(build_client_app(cfg), 2)  # a round already paid for is never trained twice
    assert replayed.content["status"]["status"] == ROUND_ALREADY_SPENT
    assert len(ledger.events("run", "client-1")) == 2
    assert epsilon(ledger.events("run", "client-1"), 1e-5) == spent


def test_scaffold_and_fednova_client_steps_run_under_dp_sgd(tmp_path, flower_task_identity):
    """The strategies' client parts reply as without DP, and the spend is still recorded first."""
    from fedvault.strategies.fednova import A_NORM_KEY, TAU_KEY
    from fedvault.strategies.scaffold import CLIENT_DELTA_KEY, SERVER_CONTROL_KEY

    torch.manual_seed(0)
    model = dp_compatible(load_task("digits").build_model())
    control = ArrayRecord({k: torch.full_like(v, 0.01) for k, v in model.state_dict().items()})
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            SERVER_CONTROL_KEY: control,
            "config": ConfigRecord({"server-round": 1, "fednova": True, "momentum": 0.9}),
        }
    )
    ctx = Context(
        run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 4}, state=RecordDict(), run_config={}
    )
    reply = build_client_app(_config(tmp_path))(Message(content, dst_node_id=7, message_type="train"), ctx)
    assert not reply.has_error() and "dp-event" in reply.content.config_records
    metrics = reply.content["metrics"]
    assert metrics[TAU_KEY] == metrics["train_steps"] == dict(reply.content["dp-event"])["steps"]
    assert metrics[A_NORM_KEY] > metrics[TAU_KEY]  # heavy-ball momentum does more work per step
    delta = reply.content[CLIENT_DELTA_KEY].to_torch_state_dict()
    assert delta.keys() == {n for n, p in model.named_parameters()}
    assert "scaffold.c-i" in ctx.state.array_records  # c_i kept on the node for the next round
