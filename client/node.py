"""What a client node keeps for the life of its process: its data partition and its model.

Flower starts one ClientApp process (deployment) or reuses one Ray actor (simulation) for
many messages; everything here is cached per process so a node loads and partitions its data
once, not once per round.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from torch import nn

from fedvault.client.attacks import UPDATE_ATTACKS, flip_labels, pick_attackers
from fedvault.config import RunConfig
from fedvault.errors import PartitionError
from fedvault.partition import partition, train_test_split
from fedvault.tasks import ArrayDataset, Task, load_task, load_task_data

log = logging.getLogger("fedvault")
AUTO_BATCH_RANGE = (16, 4096)


@cache
def batch_size_for(configured: int, num_examples: int) -> int:
    """The local logical batch: ``configured``, or for 0 (auto) ``10 * sqrt(N)`` rounded to a multiple of 16
    and clamped to 16..4096 (logged once per size). Under DP-SGD a larger batch averages the noise over
    more examples (noise std z*C/B on the mean) while ``sqrt`` keeps enough steps per epoch on small data."""
    if configured:
        return configured
    low, high = AUTO_BATCH_RANGE
    chosen = max(low, min(high, 16 * round(10 * math.sqrt(num_examples) / 16), num_examples))
    log.info("batch-size auto: %d local examples -> logical batch %d (10*sqrt(N))", num_examples, chosen)
    return chosen


@dataclass(frozen=True)
class DataSelection:
    """Which slice of a task's data this node holds (from Flower's node config)."""

    task: str
    seed: int
    scheme: str
    alpha: float
    shards_per_client: int
    num_partitions: int
    partition_id: int
    test_fraction: float
    data_path: str = ""

    @classmethod
    def from_run(cls, config: RunConfig, node_config: dict) -> DataSelection:
        return cls(
            task=config.task,
            seed=config.seed,
            scheme=config.partitioner,
            alpha=config.dirichlet_alpha,
            shards_per_client=config.shards_per_client,
            num_partitions=int(node_config.get("num-partitions", config.num_clients)),
            partition_id=int(node_config["partition-id"]),
            test_fraction=config.test_fraction,
            data_path=str(node_config.get("data-path", "")),
        )


@lru_cache(maxsize=8)
def _partitions(
    task: str, seed: int, scheme: str, alpha: float, shards: int, num_partitions: int
) -> tuple[np.ndarray, ...]:
    labels = load_task_data(task, seed).train.y
    return tuple(partition(labels, num_partitions, scheme, seed, alpha=alpha, shards_per_client=shards))


@cache
def client_data(sel: DataSelection) -> tuple[ArrayDataset, ArrayDataset]:
    """This node's (train, local test) datasets: its partition of the task's data, or its own
    ``.npz`` file (arrays ``x`` and ``y``) when node config ``data-path`` names one."""
    if sel.data_path:
        return _local_file_data(sel)
    parts = _partitions(sel.task, sel.seed, sel.scheme, sel.alpha, sel.shards_per_client, sel.num_partitions)
    train_idx, test_idx = train_test_split(parts[sel.partition_id], sel.test_fraction, sel.seed, sel.partition_id)
    pool = load_task_data(sel.task, sel.seed).train
    return pool.subset(train_idx), pool.subset(test_idx)


def _local_file_data(sel: DataSelection) -> tuple[ArrayDataset, ArrayDataset]:
    try:
        with np.load(sel.data_path, allow_pickle=False) as data:
            own = ArrayDataset(data["x"].astype(np.float32), data["y"].astype(np.int64))
    except (OSError, KeyError, ValueError) as exc:
        raise PartitionError(
            f"data-path {sel.data_path}: cannot read arrays 'x' and 'y' from an .npz ({exc})"
        ) from None
    train_idx, test_idx = train_test_split(np.arange(len(own)), sel.test_fraction, sel.seed, sel.partition_id)
    return own.subset(train_idx), own.subset(test_idx)


@cache
def training_data(config: RunConfig, sel: DataSelection) -> ArrayDataset:
    """The node's training split, with labels flipped when the run makes it a label-flip attacker."""
    train, _ = client_data(sel)
    attack = config.attack
    if attack.kind == "label-flip" and sel.partition_id in pick_attackers(
        sel.num_partitions, attack.fraction, config.seed
    ):
        num_classes = load_task_data(sel.task, sel.seed).num_classes
        return ArrayDataset(train.x, flip_labels(train.y, num_classes))
    return train


def is_update_attacker(config: RunConfig, sel: DataSelection) -> bool:
    """Whether this node tampers with its update (sign-flip, scale, gaussian)."""
    attack = config.attack
    return attack.kind in UPDATE_ATTACKS and sel.partition_id in pick_attackers(
        sel.num_partitions, attack.fraction, config.seed
    )


@lru_cache(maxsize=4)
def task_and_model(task_name: str) -> tuple[Task, nn.Module]:
    """The task and one model instance per process; each message loads its weights into it."""
    task = load_task(task_name)
    return task, task.build_model()


def client_party(sel: DataSelection) -> str:
    """The party name this client's spends are recorded under, in both ledgers."""
    return f"client-{sel.partition_id}"


def node_ledger_path(cfg: RunConfig, node_config: dict) -> Path:
    """Node config ``ledger-path``, else ``privacy.node-ledger``, else beside the run, else ~/.fedvault."""
    chosen = node_config.get("ledger-path") or cfg.privacy.node_ledger
    if chosen:
        return Path(str(chosen))
    if cfg.run_dir:
        return Path(cfg.run_dir) / "node-ledger.sqlite"
    return Path.home() / ".fedvault" / "node-ledger.sqlite"
