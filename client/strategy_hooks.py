"""Client-side parts of server strategies, as hooks the local trainer calls.

The trainer runs, per batch::

    optimizer.zero_grad()
    criterion(model(x), y).backward()
    for h in hooks: h.after_backward(model)      # under DP-SGD: after Opacus clipped and noised
    optimizer.step(); steps += 1

Hooks only add data-independent terms to the gradient (the global model, control variates derived
from earlier released updates), so under DP-SGD they edit the already-private gradient: post-
processing, no extra privacy cost.

and after training merges ``finish_hooks(hooks, model, steps, lr)`` into its reply. Which hooks
run is read from the train message (:func:`build_hooks`):

- FedProx (Li et al., MLSys 2020, arXiv 1812.06127): config ``"proximal-mu"`` > 0 adds the
  gradient of ``mu/2 * ||w - w_global||^2``, ``mu * (w - w_global)``, to each step's gradient.
- SCAFFOLD (Karimireddy et al., ICML 2020, arXiv 1910.06378): ArrayRecord ``"scaffold.c"``
  turns each gradient ``g`` into ``g - c_i + c``; ``c_i`` lives in the node state.
- FedNova (Wang et al., NeurIPS 2020, arXiv 2007.07481): config ``"fednova"`` makes the reply
  report ``tau_i`` (steps) and ``||a_i||_1``.

Build the hooks after the global arrays are loaded into ``model`` (they snapshot it) and, when
the optimizer uses momentum, send it in the train config as ``"momentum"`` so SCAFFOLD and
FedNova normalise by the right amount of local work.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedvault.strategies.fednova import A_NORM_KEY, CONFIG_FLAG as FEDNOVA_FLAG, TAU_KEY
from fedvault.strategies.scaffold import CLIENT_DELTA_KEY, SERVER_CONTROL_KEY
from fedvault.tasks.base import TrainingHook as StepHook

CONFIG_KEY = "config"
PROXIMAL_MU_KEY = "proximal-mu"
MOMENTUM_KEY = "momentum"
#: Node-state ArrayRecord holding this client's SCAFFOLD control variate ``c_i``.
CLIENT_CONTROL_KEY = "scaffold.c-i"
#: Prefix Opacus' GradSampleModule adds to parameter names.
_OPACUS_PREFIX = "_module."

Extras = tuple[dict[str, ArrayRecord], dict[str, float]]


class HookError(RuntimeError):
    """A strategy hook cannot run with the message or model it was given."""


class TrainingHook(StepHook, Protocol):
    """One strategy's client-side behaviour during local training."""

    def after_backward(self, model: torch.nn.Module) -> None: ...  # edit .grad in place before step

    def finish(self, model: torch.nn.Module, steps: int, lr: float) -> Extras:
        """Extra ArrayRecords for the reply RecordDict and extra metrics for its MetricRecord."""


def build_hooks(content: RecordDict, context_state: RecordDict, model: torch.nn.Module) -> list[TrainingHook]:
    """The hooks a train message asks for, in order FedProx, SCAFFOLD, FedNova."""
    config = content.config_records.get(CONFIG_KEY, ConfigRecord())
    momentum = float(config.get(MOMENTUM_KEY, 0.0))
    hooks: list[TrainingHook] = []
    mu = float(config.get(PROXIMAL_MU_KEY, 0.0))
    if mu > 0:
        hooks.append(ProximalHook(model, mu))
    if SERVER_CONTROL_KEY in content.array_records:
        hooks.append(ScaffoldHook(model, content.array_records[SERVER_CONTROL_KEY], context_state, momentum))
    if config.get(FEDNOVA_FLAG, False):
        hooks.append(FedNovaHook(momentum))
    return hooks


def finish_hooks(hooks: list[TrainingHook], model: torch.nn.Module, steps: int, lr: float) -> Extras:
    """Merge every hook's ``finish``; two hooks writing the same key is an error."""
    records: dict[str, ArrayRecord] = {}
    metrics: dict[str, float] = {}
    for hook in hooks:
        new_records, new_metrics = hook.finish(model, steps, lr)
        clash = (records.keys() & new_records.keys()) | (metrics.keys() & new_metrics.keys())
        if clash:
            raise HookError(f"hook {type(hook).__name__} writes reply keys already written: {sorted(clash)}")
        records.update(new_records)
        metrics.update(new_metrics)
    return records, metrics


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


def _snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


class ProximalHook:
    """FedProx: the proximal term's gradient ``mu * (w - w_global)`` is added to each step's."""

    def __init__(self, model: torch.nn.Module, mu: float) -> None:
        self.mu = mu
        self.anchor = _snapshot(trainable_parameters(model))

    @torch.no_grad()
    def after_backward(self, model: torch.nn.Module) -> None:
        for name, p in trainable_parameters(model).items():
            if p.grad is not None:
                p.grad.add_(p - self.anchor[name], alpha=self.mu)

    def finish(self, model: torch.nn.Module, steps: int, lr: float) -> Extras:
        return {}, {}


class ScaffoldHook:
    """SCAFFOLD client: gradient correction ``g - c_i + c`` and the option-II update of ``c_i``.

    After ``K`` steps with learning rate ``eta_l``:
    ``c_i+ = c_i - c + (x - y) / (eta_l ||a||_1)`` (``||a||_1 = K`` for plain SGD, see
    :func:`local_work`); the reply carries ``delta_c = c_i+ - c_i`` and the node state keeps
    ``c_i+``. Keys of ``c`` that are not trainable parameters (buffers) get ``delta_c = 0``.
    """

    def __init__(self, model: torch.nn.Module, control: ArrayRecord, state: RecordDict, momentum: float) -> None:
        self.state = state
        self.momentum = momentum
        self.c = {key: array.numpy() for key, array in control.items()}
        self.c_i = self._stored_control(state)
        params = trainable_parameters(model)
        self.names = [name for name in params if name in self.c]
        if not self.names:
            raise HookError(f"ArrayRecord '{SERVER_CONTROL_KEY}' names none of the model's parameters")
        self.anchor = _snapshot({name: params[name] for name in self.names})
        self.correction = {
            name: torch.as_tensor(self.c[name] - self.c_i[name], dtype=params[name].dtype, device=params[name].device)
            for name in self.names
        }

    def _stored_control(self, state: RecordDict) -> dict[str, np.ndarray]:
        stored = state.array_records.get(CLIENT_CONTROL_KEY)
        if stored is not None:
            c_i = {key: array.numpy() for key, array in stored.items()}
            if c_i.keys() == self.c.keys() and all(c_i[k].shape == self.c[k].shape for k in c_i):
                return c_i
        return {key: np.zeros_like(value) for key, value in self.c.items()}


    def after_backward(self, model: torch.nn.Module) -> None:
        params = trainable_parameters(model)
        for name in self.names:
            p = params[name]
            if p.grad is None:  # unused in this batch: its gradient is zero
                p.grad = self.correction[name].clone()
            else:
                p.grad.add_(self.correction[name])

    def finish(self, model: torch.nn.Module, steps: int, lr: float) -> Extras:
        delta = {key: np.zeros_like(value) for key, value in self.c.items()}
        if steps > 0:
            params = trainable_parameters(model)
            scale = 1.0 / (lr * local_work(steps, self.momentum))
            for name in self.names:
                drift = (self.anchor[name] - params[name].detach()).cpu().numpy().astype(np.float64)
                delta[name] = (drift * scale - self.c[name]).astype(self.c[name].dtype)
        new_c_i = {key: (self.c_i[key] + delta[key]).astype(self.c[key].dtype) for key in self.c}
        self.state[CLIENT_CONTROL_KEY] = ArrayRecord({key: _array(v) for key, v in new_c_i.items()})
        return {CLIENT_DELTA_KEY: ArrayRecord({key: _array(v) for key, v in delta.items()})}, {}


class FedNovaHook:
    """FedNova client: reports local steps ``tau`` and ``||a||_1`` (see :func:`local_work`)."""

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum


    def after_backward(self, model: torch.nn.Module) -> None:
        return None

    def finish(self, model: torch.nn.Module, steps: int, lr: float) -> Extras:
        if steps < 1:
            raise HookError("FedNova: local training took no steps, so there is no update to normalise")
        return {}, {TAU_KEY: float(steps), A_NORM_KEY: local_work(steps, self.momentum)}


def _array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))
