"""Which client halves a train message asks for: FedProx, SCAFFOLD and FedNova, in that order.

Build them after the global arrays are loaded into the model (they snapshot it). When the local
optimizer uses momentum the server sends it as ``"momentum"`` in the train config, so SCAFFOLD and
FedNova normalise by the right amount of local work.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedvault.protocol import config_float
from fedvault.strategies.fednova import CONFIG_FLAG as FEDNOVA_FLAG
from fedvault.strategies.fednova import FedNovaHook
from fedvault.strategies.fedprox import PROXIMAL_MU_KEY, ProximalHook
from fedvault.strategies.hooks import ClientStep, Extras, HookError
from fedvault.strategies.scaffold import SERVER_CONTROL_KEY, ScaffoldHook

CONFIG_KEY = "config"
MOMENTUM_KEY = "momentum"


def build_client_steps(content: RecordDict, context_state: RecordDict, model: torch.nn.Module) -> list[ClientStep]:
    """The client halves a train message asks for, in order FedProx, SCAFFOLD, FedNova."""
    config = content.config_records.get(CONFIG_KEY, ConfigRecord())
    momentum = config_float(config, MOMENTUM_KEY, 0.0)
    steps: list[ClientStep] = []
    mu = config_float(config, PROXIMAL_MU_KEY, 0.0)
    if mu > 0:
        steps.append(ProximalHook(model, mu))
    if SERVER_CONTROL_KEY in content.array_records:
        steps.append(ScaffoldHook(model, content.array_records[SERVER_CONTROL_KEY], context_state, momentum))
    if config.get(FEDNOVA_FLAG, False):
        steps.append(FedNovaHook(momentum))
    return steps


def finish_client_steps(steps: list[ClientStep], model: torch.nn.Module, num_steps: int, lr: float) -> Extras:
    """Merge every client half's ``finish``; two writing the same key is an error."""
    records: dict[str, ArrayRecord] = {}
    metrics: dict[str, float] = {}
    for step in steps:
        new_records, new_metrics = step.finish(model, num_steps, lr)
        clash = (records.keys() & new_records.keys()) | (metrics.keys() & new_metrics.keys())
        if clash:
            raise HookError(f"hook {type(step).__name__} writes reply keys already written: {sorted(clash)}")
        records.update(new_records)
        metrics.update(new_metrics)
    return records, metrics
