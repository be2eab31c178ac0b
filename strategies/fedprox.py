"""FedProx client half (Li et al., MLSys 2020, arXiv 1812.06127).

The server half is Flower's ``FedProx``: it sets ``"proximal-mu"`` in the train config. The client
adds the gradient of ``mu/2 * ||w - w_global||^2``, that is ``mu * (w - w_global)``, to every
step's gradient (after clipping and noising under DP-SGD: the global model is public).
"""

from __future__ import annotations

import torch

from fedvault.strategies.hooks import Extras, snapshot, trainable_parameters

#: Train-config key Flower's FedProx sets.
PROXIMAL_MU_KEY = "proximal-mu"


class ProximalHook:
    """FedProx: the proximal term's gradient ``mu * (w - w_global)`` is added to each step's."""

    def __init__(self, model: torch.nn.Module, mu: float) -> None:
        self.mu = mu
        self.anchor = snapshot(trainable_parameters(model))

    @torch.no_grad()
    def after_backward(self, model: torch.nn.Module) -> None:
        for name, p in trainable_parameters(model).items():
            if p.grad is not None:
                p.grad.add_(p - self.anchor[name], alpha=self.mu)

    def finish(self, model: torch.nn.Module, steps: int, lr: float) -> Extras:
        return {}, {}
