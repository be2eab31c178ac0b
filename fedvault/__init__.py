"""fedvault: federated, privacy-preserving training on Flower, PyTorch and Opacus.

The Python front door::

    from fedvault import RunConfig, simulate, audit

    result = simulate(RunConfig.create(task="digits", num_clients=3, num_server_rounds=2))
    print(result.final_accuracy, audit(result.path).parties)

Names are imported on first use, so ``import fedvault`` (and ``fedvault --help``) loads neither
torch nor Flower.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "RunConfig": "fedvault.config",
    "ConfigError": "fedvault.errors",
    "FedvaultError": "fedvault.errors",
    "simulate": "fedvault.simulations.harness",
    "SimulationResult": "fedvault.simulations.harness",
    "SimulationError": "fedvault.simulations.harness",
    "audit": "fedvault.server.run_audit",
    "PrivateTrainer": "fedvault.privacy.dp_sgd",
    "load_task": "fedvault.tasks",
    "show_progress": "fedvault.logs",
}

__all__ = [
    "ConfigError",
    "FedvaultError",
    "PrivateTrainer",
    "RunConfig",
    "SimulationError",
    "SimulationResult",
    "__version__",
    "audit",
    "load_task",
    "show_progress",
    "simulate",
]

if TYPE_CHECKING:
    from fedvault.config import RunConfig
    from fedvault.errors import ConfigError, FedvaultError
    from fedvault.logs import show_progress
    from fedvault.privacy.dp_sgd import PrivateTrainer
    from fedvault.server.run_audit import audit
    from fedvault.simulations.harness import SimulationError, SimulationResult, simulate
    from fedvault.tasks import load_task


def __getattr__(name: str) -> Any:
    """Import an exported name from its module on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedvault' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
