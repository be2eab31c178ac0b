"""fedvault's ClientApp: ``train`` and ``evaluate`` handlers on Flower's Message API.

Replies use Flower's usual keys (``"arrays"``; ``"metrics"`` with ``"num-examples"``) so stock
Flower strategies and ServerApps interoperate with fedvault clients. fedvault extras travel in
further records: ``"dp-event"`` (the DP spend of this reply, already in the node's ledger),
``"status"`` (``budget-exhausted`` when the client refused to train), and strategy records
such as SCAFFOLD's control-variate delta.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedvault.client.attacks import attack_update
from fedvault.client.node import DataSelection, client_data, is_update_attacker, task_and_model, training_data
from fedvault.client.private_training import BudgetExhausted, RoundAlreadySpent, node_ledger_path, run_key, train_private
from fedvault.client.sealing import ClientSealing
from fedvault.strategies.client_steps import build_client_steps as build_hooks
from fedvault.strategies.client_steps import finish_client_steps as finish_hooks
from fedvault.config import RunConfig
from fedvault.device import resolve_device
from fedvault.protocol import BUDGET_EXHAUSTED, ROUND_ALREADY_SPENT
from fedvault.privacy.node_ledger import NodeLedger
from fedvault.tasks import TrainSettings, make_loader
from flwr.clientapp import ClientApp

ConfigSource = Callable[[Context], RunConfig]


def config_from_context(context: Context) -> RunConfig:
    """The run config Flower hands the app (``flwr run``: pyproject plus ``--run-config``)."""
    return RunConfig.from_flat(dict(context.run_config))


def build_client_app(config: RunConfig | None = None) -> ClientApp:
    """A ClientApp using ``config``, or the Flower run config when ``config`` is None."""
    get_config: ConfigSource = (lambda _ctx: config) if config is not None else config_from_context
    deployed = config is None
    app = ClientApp()

    def sealer(cfg: RunConfig, msg: Message, context: Context) -> ClientSealing | None:
        """Verifies the server's signature first: nothing is trained for an unsigned or forged instruction."""
        return ClientSealing(cfg, msg, context) if cfg.sealing.enabled(deployed) else None

    def reply(msg: Message, content: RecordDict, sealing: ClientSealing | None, kind: str) -> Message:
        return Message(sealing.seal(content, kind) if sealing else content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = get_config(context)
        sealing = sealer(cfg, msg, context)
        sel = DataSelection.from_run(cfg, context.node_config)
        round_config = msg.content.config_records.get("config", ConfigRecord())
        server_round = int(round_config.get("server-round", 0))
        device = resolve_device(str(context.node_config.get("device", cfg.device)))
        global_state = msg.content["arrays"].to_torch_state_dict()
        start = time.perf_counter()
        records: dict = {}
        if cfg.privacy.sample_level:
            ledger = NodeLedger(node_ledger_path(cfg, context.node_config))
            try:
                done = train_private(cfg, sel, global_state, server_round, device, ledger, run_key(cfg, context.run_id),
                                     make_hooks=lambda model: build_hooks(msg.content, context.state, model))
            except (BudgetExhausted, RoundAlreadySpent) as exc:
                kind = BUDGET_EXHAUSTED if isinstance(exc, BudgetExhausted) else ROUND_ALREADY_SPENT
                status = ConfigRecord({"status": kind, "reason": str(exc)})
                return reply(msg, RecordDict({"metrics": MetricRecord({"num-examples": 0}), "status": status}), sealing, "train")
            state, loss, steps = done.result.state_dict, done.result.loss, done.result.steps
            records.update(done.hook_records)
            records["dp-event"] = ConfigRecord(done.event.to_dict())
            extra_metrics = {"dp_epsilon": done.epsilon, **done.hook_metrics}
        else:
            state, loss, steps, hook_records, extra_metrics = _train_plain(cfg, sel, msg, context, global_state, device)
            records.update(hook_records)
        if is_update_attacker(cfg, sel):
            state = _attacked(cfg, sel, global_state, state, server_round)

        metrics = MetricRecord({
            "train_loss": float(loss), "train_steps": int(steps), "train_seconds": time.perf_counter() - start,
            "num-examples": len(training_data(cfg, sel)), **extra_metrics,
        })
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in state.items()})
        return reply(msg, RecordDict({"arrays": arrays, "metrics": metrics, **records}), sealing, "train")

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = get_config(context)
        sealing = sealer(cfg, msg, context)
        device = resolve_device(str(context.node_config.get("device", cfg.device)))
        _, test_data = client_data(DataSelection.from_run(cfg, context.node_config))
        task, model = task_and_model(cfg.task, cfg.privacy.sample_level)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        result = task.evaluate(model.to(device), make_loader(test_data, 256, shuffle=False), device)
        metrics = MetricRecord(
            {"eval_loss": result["loss"], "eval_accuracy": result["accuracy"], "num-examples": len(test_data)}
        )
        return reply(msg, RecordDict({"metrics": metrics}), sealing, "evaluate")

    return app


def _train_plain(cfg: RunConfig, sel: DataSelection, msg: Message, context: Context, global_state: dict, device):
    """Non-private local training through the task, with the strategy's client-side hooks."""
    round_config = msg.content.config_records.get("config", ConfigRecord())
    task, model = task_and_model(cfg.task)
    model.load_state_dict(global_state)
    model.to(device)
    lr = float(round_config.get("lr", cfg.learning_rate))
    hooks = build_hooks(msg.content, context.state, model)
    loader = make_loader(training_data(cfg, sel), cfg.batch_size, shuffle=True,
                         seed=cfg.seed + int(round_config.get("server-round", 0)))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
    settings = TrainSettings(epochs=int(round_config.get("local-epochs", cfg.local_epochs)), device=device,
                             amp=cfg.amp, hooks=hooks)
    result = task.train(model, loader, optimizer, settings)
    hook_records, hook_metrics = finish_hooks(hooks, model, int(result["steps"]), lr)
    return model.state_dict(), result["loss"], result["steps"], hook_records, hook_metrics


def _attacked(cfg: RunConfig, sel: DataSelection, global_state: dict, state: dict, server_round: int) -> dict:
    """A malicious client's reply (robustness experiments only)."""
    to_np = lambda d: {k: v.detach().cpu().numpy() for k, v in d.items()}  # noqa: E731
    seed = int(np.random.SeedSequence([cfg.seed, sel.partition_id, server_round]).generate_state(1)[0])
    tampered = attack_update(cfg.attack.kind, to_np(global_state), to_np(state), cfg.attack.scale, seed)
    return {k: torch.as_tensor(v) for k, v in tampered.items()}


app = build_client_app()
