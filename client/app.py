"""fedvault's ClientApp: ``train`` and ``evaluate`` handlers on Flower's Message API.

Replies use Flower's usual keys (``"arrays"``; ``"metrics"`` with ``"num-examples"``) so stock
Flower strategies and ServerApps interoperate with fedvault clients.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedvault.client.node import DataSelection, client_data, task_and_model
from fedvault.config import RunConfig
from fedvault.device import resolve_device
from fedvault.tasks import TrainSettings, make_loader

ConfigSource = Callable[[Context], RunConfig]


def config_from_context(context: Context) -> RunConfig:
    """The run config Flower hands the app (``flwr run``: pyproject plus ``--run-config``)."""
    return RunConfig.from_flat(dict(context.run_config))


def build_client_app(config: RunConfig | None = None) -> ClientApp:
    """A ClientApp using ``config``, or the Flower run config when ``config`` is None."""
    get_config: ConfigSource = (lambda _ctx: config) if config is not None else config_from_context
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = get_config(context)
        round_config = msg.content.config_records.get("config", ConfigRecord())
        device = resolve_device(cfg.device)
        train_data, _ = client_data(DataSelection.from_run(cfg, context.node_config))
        task, model = _model_with_weights(cfg, msg.content["arrays"], device)

        start = time.perf_counter()
        loader = make_loader(train_data, cfg.batch_size, shuffle=True, seed=cfg.seed + int(round_config.get("server-round", 0)))
        optimizer = torch.optim.SGD(model.parameters(), lr=float(round_config.get("lr", cfg.learning_rate)), momentum=cfg.momentum)
        settings = TrainSettings(epochs=int(round_config.get("local-epochs", cfg.local_epochs)), device=device, amp=cfg.amp)
        result = task.train(model, loader, optimizer, settings)

        metrics = MetricRecord(
            {
                "train_loss": float(result["loss"]),
                "train_steps": int(result["steps"]),
                "train_seconds": time.perf_counter() - start,
                "num-examples": len(train_data),
            }
        )
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = get_config(context)
        device = resolve_device(cfg.device)
        _, test_data = client_data(DataSelection.from_run(cfg, context.node_config))
        task, model = _model_with_weights(cfg, msg.content["arrays"], device)
        result = task.evaluate(model, make_loader(test_data, 256, shuffle=False), device)
        metrics = MetricRecord(
            {"eval_loss": result["loss"], "eval_accuracy": result["accuracy"], "num-examples": len(test_data)}
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _model_with_weights(cfg: RunConfig, arrays: ArrayRecord, device: torch.device):
    task, model = task_and_model(cfg.task)
    model.load_state_dict(arrays.to_torch_state_dict())
    return task, model.to(device)


app = build_client_app()
