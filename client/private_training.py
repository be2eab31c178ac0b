"""Sample-level DP-SGD on a client: calibrate once, check the budget, train, record, then reply.

Order matters (conservative accounting): the budget is checked BEFORE training with the event
this round would add, and the spend is committed to the node's SQLite ledger BEFORE the update
leaves the client. The ledger is keyed by run and client, so a restarted client continues its
epsilon instead of starting over (Flower issue #2216). A ledger whose rows fail their hash chain
or count (rows removed: :class:`~fedvault.privacy.node_ledger.NodeLedgerTamperedError`) cannot
tell the client what it spent, so it refuses to train (:class:`LedgerInvalid`).
"""

from __future__ import annotations

from functools import cache

import torch

from fedvault.client.local_training import LocalRound, StepFactory, cpu_state
from fedvault.client.node import DataSelection, batch_size_for, client_party, task_and_model, training_data
from fedvault.config import RunConfig
from fedvault.privacy.budget import Budget, projected_epsilon
from fedvault.privacy.dp_sgd import PrivateTrainer
from fedvault.privacy.events import DPEvent
from fedvault.privacy.node_ledger import NodeLedger, NodeLedgerTamperedError
from fedvault.protocol import (
    BUDGET_EXHAUSTED,
    DP_EPSILON,
    DP_EVENT,
    LEDGER_INVALID,
    ROUND_ALREADY_SPENT,
    RoundConfig,
    dp_event_record,
)
from fedvault.strategies.client_steps import finish_client_steps
from fedvault.strategies.hooks import ClientStep
from fedvault.tasks import SupervisedTask, make_loader


class BudgetExhausted(Exception):
    """Training this round would take the client past its epsilon cap (nothing was trained)."""

    status = BUDGET_EXHAUSTED

    def __init__(self, party: str, projected: float, cap: float) -> None:
        super().__init__(f"{party}: this round would spend epsilon to {projected:.3f} > cap {cap:.3f}")
        self.projected, self.cap = projected, cap


class RoundAlreadySpent(Exception):
    """This round was trained (and recorded) before; releasing a second update would spend twice.
    ``event`` is the recorded spend: the refusal reports it, so a server that never received the
    round's reply (it was interrupted) records what was paid."""

    status = ROUND_ALREADY_SPENT

    def __init__(self, message: str, event: DPEvent) -> None:
        super().__init__(message)
        self.event = event


class LedgerInvalid(Exception):
    """The client's node ledger fails its check (rows removed or edited): nothing is trained on it."""

    status = LEDGER_INVALID


#: Every way a client refuses to train; each carries its reply ``status``.
REFUSALS = (BudgetExhausted, RoundAlreadySpent, LedgerInvalid)


@cache
def private_trainer(cfg: RunConfig, sel: DataSelection, device_type: str) -> PrivateTrainer:
    """One Opacus engine per (node, config) for the life of the process, noise calibrated once
    to the per-client target over all planned rounds x local steps (PLD accountant)."""
    task, _ = task_and_model(cfg.task)
    data = training_data(cfg, sel)
    torch.manual_seed(cfg.seed)
    return PrivateTrainer.with_budget(
        task.build_model(),
        lambda params: torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum),
        make_loader(data, batch_size_for(cfg.batch_size, len(data)), shuffle=False),
        target_epsilon=cfg.privacy.target_epsilon,
        target_delta=cfg.privacy.target_delta,
        epochs=cfg.local_epochs,
        rounds=cfg.num_server_rounds,
        max_grad_norm=cfg.privacy.max_grad_norm,
        criterion=task.criterion(),
        device=torch.device(device_type),
        grad_sample_mode=cfg.privacy.grad_sample_mode,
        max_physical_batch_size=cfg.privacy.max_physical_batch_size or None,
        secure_mode=cfg.privacy.secure_mode,
        criterion_honoured=type(task).train is SupervisedTask.train,  # the built-in loop: ghost is safe
    )


def train_private(
    cfg: RunConfig,
    sel: DataSelection,
    rc: RoundConfig,
    global_state: dict,
    device: torch.device,
    ledger: NodeLedger,
    key: str,
    make_steps: StepFactory,
) -> LocalRound:
    """Check the budget, run the task's training loop under DP-SGD, record the spend; raises
    :class:`BudgetExhausted`, :class:`RoundAlreadySpent` or :class:`LedgerInvalid` before anything is trained.

    ``make_steps(model)`` builds the strategy's client steps on the trainer's model once it holds
    ``global_state``; they run on the private gradient (post-processing)."""
    party = client_party(sel)
    trainer = private_trainer(cfg, sel, device.type)
    planned = DPEvent.dp_sgd(
        noise_multiplier=trainer.noise_multiplier,
        sample_rate=trainer.sample_rate,
        steps=trainer.steps_per_epoch * rc.local_epochs,
        round=rc.server_round,
        party=party,
    )
    budget = Budget(cfg.privacy.target_epsilon, cfg.privacy.target_delta)
    try:
        history = ledger.events(key, party)
    except NodeLedgerTamperedError as exc:
        raise LedgerInvalid(f"{party}: refusing to train: {exc}") from None
    paid = next((e for e in history if e.round == rc.server_round), None)
    if paid is not None:
        raise RoundAlreadySpent(
            f"{party}: round {rc.server_round} was already trained and paid for (a re-run after "
            "a server restart); a second update for it is never released",
            paid,
        )
    projected = projected_epsilon(history, planned, budget)
    if projected > budget.epsilon:
        raise BudgetExhausted(party, projected, budget.epsilon)
    steps: list[ClientStep] = []  # kept to finish them once training is done

    def build_steps(model: torch.nn.Module) -> list[ClientStep]:
        steps.extend(make_steps(model))
        return steps

    task, _ = task_and_model(cfg.task)
    before = trainer.accounted_steps()
    result = trainer.train(
        task,
        rc.local_epochs,
        global_state=global_state,
        learning_rate=rc.learning_rate,
        make_hooks=build_steps,
        amp=cfg.amp,
    )
    event = DPEvent.dp_sgd(
        noise_multiplier=trainer.noise_multiplier,
        sample_rate=trainer.sample_rate,
        steps=trainer.accounted_steps() - before,
        round=rc.server_round,
        party=party,
    )
    try:
        ledger.record(key, party, event)  # before anything of this round leaves the client
    except NodeLedgerTamperedError as exc:  # rows removed while it trained: release nothing
        raise LedgerInvalid(f"{party}: not releasing the update: {exc}") from None
    records, metrics = finish_client_steps(steps, trainer.model, result.steps, rc.learning_rate)
    state = cpu_state(trainer.model)
    return LocalRound(
        state,
        result,
        {**records, DP_EVENT: dp_event_record(event)},
        {DP_EPSILON: projected_epsilon(history, event, budget), **metrics},
    )
