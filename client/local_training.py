"""One round of local training, the same loop with DP on and off, and what it hands the reply.

Both paths run the task's own ``Task.train`` with the strategy's client steps inside
``optimizer.step()`` (:class:`fedvault.step_hooks.HookedOptimizer`); sample-level DP wraps model,
optimizer and loader around that same call (:mod:`fedvault.client.private_training`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedvault.client.node import DataSelection, batch_size_for, task_and_model, training_data
from fedvault.config import RunConfig
from fedvault.protocol import RoundConfig
from fedvault.step_hooks import HookedOptimizer
from fedvault.strategies.client_steps import finish_client_steps
from fedvault.strategies.hooks import ClientStep
from fedvault.tasks import TrainResult, TrainSettings, make_loader

StepFactory = Callable[[torch.nn.Module], Sequence[ClientStep]]


@dataclass(frozen=True)
class LocalRound:
    """What a round of local training produced, for the reply: weights, loss and steps, and the
    records and metrics the strategy's client steps (and DP-SGD's event) add."""

    state_dict: dict[str, torch.Tensor]
    result: TrainResult
    records: dict[str, ArrayRecord | ConfigRecord] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def round_defaults(cfg: RunConfig) -> RoundConfig:
    """What the client uses for a round-config key the instruction does not carry."""
    return RoundConfig(
        server_round=0, learning_rate=cfg.learning_rate, local_epochs=cfg.local_epochs, momentum=cfg.momentum
    )


def train_plain(
    cfg: RunConfig,
    sel: DataSelection,
    rc: RoundConfig,
    global_state: dict,
    device: torch.device,
    make_steps: StepFactory,
) -> LocalRound:
    """Non-private local training through the task, with the strategy's client steps."""
    task, model = task_and_model(cfg.task)
    model.load_state_dict(global_state)
    model.to(device)
    steps = list(make_steps(model))
    data = training_data(cfg, sel)
    loader = make_loader(data, batch_size_for(cfg.batch_size, len(data)), shuffle=True, seed=cfg.seed + rc.server_round)
    optimizer = HookedOptimizer(
        torch.optim.SGD(model.parameters(), lr=rc.learning_rate, momentum=cfg.momentum), model, steps
    )
    result = task.train(model, loader, optimizer, TrainSettings(epochs=rc.local_epochs, device=device, amp=cfg.amp))
    result = TrainResult(loss=result.loss, steps=optimizer.steps)
    records, metrics = finish_client_steps(steps, model, result.steps, rc.learning_rate)
    return LocalRound(cpu_state(model), result, dict(records), metrics)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's weights, detached: what the reply carries."""
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
