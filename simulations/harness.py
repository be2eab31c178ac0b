"""``fedvault simulate``: many clients on this machine through Flower's Simulation Engine.

Uses ``flwr.simulation.run_simulation`` (Ray backend): it starts in-process in seconds, where
``flwr run`` with a managed local SuperLink costs about a minute per run on 2 cores
(see shared notes). The ServerApp and ClientApp are fedvault's own, built with the resolved
config baked in, so every simulated node sees the same config.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch

from fedvault.client.app import build_client_app
from fedvault.config import RunConfig
from fedvault.partition import partition
from fedvault.rundir import RunDirectory, default_run_dir
from fedvault.security.identity import fingerprint, load_identity_public_key
from fedvault.server.app import build_server_app, make_strategy
from fedvault.server.sealing import server_identity_path
from fedvault.tasks import load_task_data

log = logging.getLogger("fedvault")


def preflight(cfg: RunConfig) -> None:
    """Fail fast, before Ray starts: the task loads and its data splits as configured."""
    make_strategy(cfg)  # unknown strategy or bad strategy.<param> fails here, not in a Ray worker
    data = load_task_data(cfg.task, cfg.seed)
    partition(data.train.y, cfg.num_clients, cfg.partitioner, cfg.seed,
              alpha=cfg.dirichlet_alpha, shards_per_client=cfg.shards_per_client)


def client_gpus(cfg: RunConfig) -> float:
    """``client-gpus=-1`` (auto): share one GPU among the clients the CPUs allow at once."""
    if cfg.client_gpus >= 0:
        return cfg.client_gpus
    if not torch.cuda.is_available():
        return 0.0
    concurrent = max(1, int((os.cpu_count() or 1) // cfg.client_cpus))
    return round(1.0 / concurrent, 3)


def with_simulation_identity(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """``sealing.mode = "on"`` in a simulation: a server identity in the run dir, pinned by every client."""
    path = server_identity_path(cfg, run_dir)
    pin = fingerprint(load_identity_public_key(path.with_suffix(".pub")))
    sealing = dataclasses.replace(cfg.sealing, identity_key=str(path), server_identity=cfg.sealing.server_identity or pin)
    return dataclasses.replace(cfg, sealing=sealing)


def backend_config(cfg: RunConfig, verbose: bool) -> dict:
    return {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": client_gpus(cfg)},
        "init_args": {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose},
    }


def simulate(cfg: RunConfig, verbose: bool = False) -> Path:
    """Run the configured simulation; returns the run directory."""
    from flwr.simulation import run_simulation

    preflight(cfg)
    run_dir = RunDirectory(cfg.run_dir or default_run_dir(cfg.task))
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir.path))
    if cfg.sealing.enabled(deployed=False):
        cfg = with_simulation_identity(cfg, run_dir.path)
    run_dir.create(cfg.to_flat())
    _quiet_flower(verbose)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    log.info("simulating %d clients x %d rounds of %s -> %s", cfg.num_clients, cfg.num_server_rounds, cfg.task, run_dir.path)
    started = time.perf_counter()
    run_simulation(
        server_app=build_server_app(cfg),
        client_app=build_client_app(cfg),
        num_supernodes=cfg.num_clients,
        backend_config=backend_config(cfg, verbose),
    )
    if not (run_dir.path / "summary.json").exists():
        raise RuntimeError(f"the simulation ended without finishing its rounds; see {run_dir.path}")
    summary = run_dir.summary()
    summary["wall_seconds"] = time.perf_counter() - started
    run_dir.write_summary(summary)
    return run_dir.path


class _DropDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecated" not in record.getMessage().lower()


def _quiet_flower(verbose: bool) -> None:
    """Flower logs every message at INFO; fedvault prints its own one line per round."""
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.INFO if verbose else logging.WARNING)
    if not any(isinstance(f, _DropDeprecation) for f in flwr_log.filters):
        flwr_log.addFilter(_DropDeprecation())
