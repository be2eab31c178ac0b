"""What a strategy's client half is, and helpers the client halves share.

The local training loop (``Task.train``) runs, per batch::

    optimizer.zero_grad()
    criterion(model(x), y).backward()
    optimizer.step()            # hooks' after_backward(model) runs first, see HookedOptimizer

Under DP-SGD the hooks run after Opacus clipped and noised the gradient. Hooks only add
data-independent terms (the global model, control variates derived from earlier released
updates), so they edit the already-private gradient: post-processing, no extra privacy cost.
After training, ``finish(model, steps, lr)`` adds the strategy's records and metrics to the reply.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedvault.errors import FedvaultError
from fedvault.tasks.base import TrainingHook as StepHook

#: Prefix Opacus' GradSampleModule adds to parameter names.
_OPACUS_PREFIX = "_module."

Extras = tuple[dict[str, ArrayRecord], dict[str, float]]


class HookError(FedvaultError, RuntimeError):
    """A strategy hook cannot run with the message or model it was given."""


class ClientStep(StepHook, Protocol):
    """One strategy's client-side behaviour during local training."""

    def after_backward(self, model: torch.nn.Module) -> None: ...  # edit .grad in place before step

    def finish(self, model: torch.nn.Module, steps: int, lr: float) -> Extras:
        """Extra ArrayRecords for the reply RecordDict and extra metrics for its MetricRecord."""


def local_work(steps: int, momentum: float = 0.0) -> float:
    """``||a||_1`` of ``steps`` SGD steps with heavy-ball ``momentum`` (Wang et al. 2020, Sec. 4).

    ``x - y = lr * sum_j a_j g_j`` with ``a_j = (1 - rho^(tau-j)) / (1 - rho)``, so
    ``||a||_1 = (tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``; ``tau`` when ``rho = 0``.
    """
    if not 0.0 <= momentum < 1.0:
        raise HookError(f"momentum must be in [0, 1), got {momentum}")
    if momentum == 0.0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by ``state_dict`` name (Opacus' ``_module.`` prefix removed)."""
    return {name.removeprefix(_OPACUS_PREFIX): p for name, p in model.named_parameters() if p.requires_grad}


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def as_array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))
