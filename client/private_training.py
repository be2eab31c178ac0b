"""Sample-level DP-SGD on a client: calibrate once, check the budget, train, record, then reply.

Order matters (conservative accounting): the budget is checked BEFORE training with the event
this round would add, and the spend is committed to the node's SQLite ledger BEFORE the update
leaves the client. The ledger is keyed by run and client, so a restarted client continues its
epsilon instead of starting over (Flower issue #2216).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from fedvault.client.node import DataSelection, task_and_model, training_data
from fedvault.strategies.client_steps import finish_client_steps as finish_hooks
from fedvault.config import RunConfig
from fedvault.privacy.accountants import calibrate_noise_multiplier
from fedvault.privacy.budget import Budget, projected_epsilon
from fedvault.privacy.dp_sgd import LocalTrainResult, PrivateTrainer, planned_steps, poisson_sample_rate
from fedvault.privacy.events import DPEvent
from fedvault.privacy.node_ledger import NodeLedger
from fedvault.tasks import make_loader
from fedvault.tasks.base import TrainingHook

HookFactory = Callable[[torch.nn.Module], list[TrainingHook]]


@dataclass(frozen=True)
class PrivateRound:
    """What a DP round produced: the result and the event already recorded for it."""

    result: LocalTrainResult
    event: DPEvent
    epsilon: float
    hook_records: dict[str, ArrayRecord]  # what the strategy's client steps add to the reply
    hook_metrics: dict[str, float]


class BudgetExhausted(Exception):
    """Training this round would take the client past its epsilon cap (nothing was trained)."""

    def __init__(self, party: str, projected: float, cap: float) -> None:
        super().__init__(f"{party}: this round would spend epsilon to {projected:.3f} > cap {cap:.3f}")
        self.projected, self.cap = projected, cap


class RoundAlreadySpent(Exception):
    """This round was trained (and recorded) before; releasing a second update would spend twice."""


def node_ledger_path(cfg: RunConfig, node_config: dict) -> Path:
    """Node config ``ledger-path``, else ``privacy.node-ledger``, else beside the run, else ~/.fedvault."""
    chosen = node_config.get("ledger-path") or cfg.privacy.node_ledger
    if chosen:
        return Path(str(chosen))
    if cfg.run_dir:
        return Path(cfg.run_dir) / "node-ledger.sqlite"
    return Path.home() / ".fedvault" / "node-ledger.sqlite"


def run_key(cfg: RunConfig, run_id: int) -> str:
    """Stable across restarts and resumes: the run directory's name when there is one."""
    return Path(cfg.run_dir).name if cfg.run_dir else f"flower-run-{run_id}"


@lru_cache(maxsize=None)
def private_trainer(cfg: RunConfig, sel: DataSelection, device_type: str) -> PrivateTrainer:
    """One Opacus engine per (node, config) for the life of the process, noise calibrated once
    to the per-client target over all planned rounds x local steps (PLD accountant)."""
    task, _ = task_and_model(cfg.task)
    train = training_data(cfg, sel)
    q = poisson_sample_rate(len(train), cfg.batch_size)
    steps = planned_steps(len(train), cfg.batch_size, cfg.local_epochs) * cfg.num_server_rounds
    sigma = calibrate_noise_multiplier(cfg.privacy.target_epsilon, cfg.privacy.target_delta, q, steps)
    torch.manual_seed(cfg.seed)
    return PrivateTrainer(
        task.build_model(),
        lambda params: torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum),
        make_loader(train, cfg.batch_size, shuffle=False),
        noise_multiplier=sigma,
        max_grad_norm=cfg.privacy.max_grad_norm,
        criterion=task.criterion(),
        device=torch.device(device_type),
        grad_sample_mode=cfg.privacy.grad_sample_mode,
    )


def train_private(
    cfg: RunConfig, sel: DataSelection, global_state: dict, server_round: int,
    device: torch.device, ledger: NodeLedger, key: str, make_hooks: HookFactory = lambda model: [],
) -> PrivateRound:
    """Check the budget, train one round with DP-SGD, record the spend; raises BudgetExhausted.

    ``make_hooks(model)`` builds the strategy's client steps on the trainer's model once it holds
    ``global_state``; they run on the private gradient (:func:`fedvault.privacy.dp_sgd.train_step`)."""
    party = f"client-{sel.partition_id}"
    trainer = private_trainer(cfg, sel, device.type)
    planned = DPEvent(kind="sample", noise_multiplier=trainer.noise_multiplier, sample_rate=trainer.sample_rate,
                      steps=trainer.steps_per_epoch * cfg.local_epochs, sampling="poisson",
                      round=server_round, party=party)
    budget = Budget(cfg.privacy.target_epsilon, cfg.privacy.target_delta)
    history = ledger.events(key, party)
    if any(e.round == server_round for e in history):
        raise RoundAlreadySpent(f"{party}: round {server_round} was already trained and paid for (a re-run after a "
                                "server restart); a second update for it is never released")
    projected = projected_epsilon(history, planned, budget)
    if projected > budget.epsilon:
        raise BudgetExhausted(party, projected, budget.epsilon)
    hooks: list[TrainingHook] = []  # kept to finish them once training is done

    def build_hooks(model: torch.nn.Module) -> list[TrainingHook]:
        hooks.extend(make_hooks(model))
        return hooks

    result = trainer.train_round(global_state, cfg.local_epochs, build_hooks)
    event = DPEvent(kind="sample", noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate,
                    steps=result.steps, sampling="poisson", round=server_round, party=party)
    ledger.record(key, party, event)
    hook_records, hook_metrics = finish_hooks(hooks, trainer.model, result.steps, trainer.learning_rate)
    return PrivateRound(result=result, event=event, epsilon=projected_epsilon(history, event, budget),
                        hook_records=hook_records, hook_metrics=hook_metrics)


