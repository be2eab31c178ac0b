"""One training loop: the ClientApp runs the task's own ``Task.train`` with DP on and off, with the
round's learning rate and epochs, and AMP as configured; under DP it gets the wrapped objects."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedvault.client.app import build_client_app
from fedvault.config import RunConfig
from fedvault.privacy.dp_sgd import dp_compatible
from fedvault.tasks import TrainResult, load_task

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
CALLS: list[dict] = []


class CountingTask:
    """A user's task with its own loop (the digits task's, recorded); 'test_one_training_loop:CountingTask'."""

    name = "counting"

    def __init__(self) -> None:
        self.inner = load_task("digits")

    def load_data(self, seed):
        return self.inner.load_data(seed)

    def build_model(self):
        return self.inner.build_model()

    def criterion(self):
        return self.inner.criterion()

    def evaluate(self, model, loader, device):
        return self.inner.evaluate(model, loader, device)

    def train(self, model, loader, optimizer, settings) -> TrainResult:
        call = {
            "epochs": settings.epochs,
            "lr": optimizer.param_groups[0]["lr"],
            "amp": settings.amp,
            "model": type(model).__name__,
            "optimizer": type(optimizer).__name__,
            "batches": 0,
            "autocast": [],
        }
        original_forward = model.forward

        def forward(x, *args, **kwargs):
            call["batches"] += 1
            call["autocast"].append(torch.is_autocast_enabled("cuda"))
            assert len(x) > 0  # an empty Poisson batch never reaches the task's loop
            return original_forward(x, *args, **kwargs)

        model.forward = forward
        try:
            result = self.inner.train(model, loader, optimizer, settings)
        finally:
            del model.forward
        CALLS.append(call)
        return result


def _run(sample_level: bool, round_config: dict) -> Message:
    cfg = RunConfig.from_flat(
        {
            "task": "test_one_training_loop:CountingTask",
            "num-clients": 4,
            "local-epochs": 1,
            "batch-size": 64,
            "learning-rate": 0.05,
            "privacy.sample-level": sample_level,
            "privacy.grad-sample-mode": "hooks",
            "privacy.node-ledger": "",
        }
    )
    torch.manual_seed(0)
    model = load_task("digits").build_model()
    model = dp_compatible(model) if sample_level else model
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(round_config)})
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(), run_config={}
    )
    return build_client_app(cfg)(Message(content, dst_node_id=7, message_type="train"), context)


@pytest.mark.parametrize("sample_level", [False, True])
def test_the_tasks_own_loop_runs_with_the_rounds_lr_and_epochs(
    sample_level, monkeypatch, tmp_path, flower_task_identity
):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    monkeypatch.setenv("HOME", str(tmp_path))  # the DP node ledger defaults to ~/.fedvault
    CALLS.clear()
    reply = _run(sample_level, {"server-round": 1, "lr": 0.2, "local-epochs": 2})
    assert not reply.has_error() and "status" not in reply.content.config_records
    (call,) = CALLS
    assert call["epochs"] == 2 and call["lr"] == pytest.approx(0.2) and call["amp"] is True
    assert call["autocast"] and not any(call["autocast"])  # CPU: AMP applies on CUDA only
    metrics = reply.content["metrics"]
    if sample_level:
        assert call["model"] == "GradSampleModule" and call["optimizer"] == "_PrivateStep"
        assert "dp-event" in reply.content.config_records
        event = reply.content["dp-event"]
        assert event["steps"] == metrics["train_steps"] >= call["batches"]  # empty Poisson batches: noise-only steps
        assert event["round"] == 1
    else:
        assert call["model"] == "Sequential" and call["optimizer"] == "HookedOptimizer"
        assert metrics["train_steps"] == call["batches"]
