"""An optimizer wrapper that runs strategy client steps inside ``optimizer.step()``.

``Task.train`` only calls ``optimizer.step()``; this wrapper runs every hook's
``after_backward(model)`` first, then the wrapped optimizer's update, and counts the steps. So a
task's own loop carries FedProx, SCAFFOLD or FedNova without knowing them, and under AMP the hooks
see unscaled gradients (``GradScaler.step`` unscales before it calls ``step``). The DP-SGD wrapper
(:mod:`fedvault.privacy.dp_sgd`) subclasses it so the hooks run after Opacus clipped and noised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fedvault.tasks.base import TrainingHook


class HookedOptimizer(torch.optim.Optimizer):
    """``optimizer`` with ``hooks`` run on ``model``'s gradients before every update; ``steps`` counts updates.

    Like Opacus' ``DPOptimizer`` it delegates ``param_groups``, ``state`` and ``defaults`` to the
    optimizer it wraps instead of calling ``Optimizer.__init__``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, hooks: Sequence[TrainingHook] = ()) -> None:
        self.inner = optimizer
        self.model = model
        self.hooks = list(hooks)
        self.steps = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]  # read-only: delegated to the wrapped optimizer
        return self.inner.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]  # read-only: delegated to the wrapped optimizer
        return self.inner.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]  # read-only: delegated to the wrapped optimizer
        return self.inner.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def ready(self) -> bool:
        """Whether this call of ``step`` updates the weights (DP: False while a logical batch accumulates)."""
        return True

    def update(self) -> None:
        """The weight update itself, after the hooks."""
        self.inner.step()

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise TypeError("HookedOptimizer.step takes no closure")
        if not self.ready():
            return
        for hook in self.hooks:
            hook.after_backward(self.model)
        self.update()
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
