"""Split a labelled training set across clients: IID, Dirichlet label skew, pathological shards.

Written in numpy rather than with flwr-datasets' partitioners: those need the Hugging Face
``datasets`` stack (about 790 MB with pyarrow and pandas, ~6 s to import) in every simulated
client process, for what is a few lines each. The algorithms are the standard ones:

- ``iid``: a seeded permutation cut into near-equal parts.
- ``dirichlet``: for every class, client shares ~ Dir(alpha) (Hsu, Qi & Brown 2019,
  arXiv 1909.06335; the NIID-Bench protocol of Li et al., ICDE 2022); redrawn until every client
  has ``min_size`` samples, as flwr-datasets' ``DirichletPartitioner`` does.
- ``shards``: sort by label, cut into ``num_clients * k`` equal shards, deal ``k`` shards to each
  client (McMahan et al., AISTATS 2017, "pathological non-IID").

Every function is deterministic under its seed.
"""

from __future__ import annotations

import numpy as np

from fedvault.errors import PartitionError

DIRICHLET_TRIES = 100


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    seed: int,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Indices into ``labels`` for each client, by ``scheme`` (iid, dirichlet or shards)."""
    n = len(labels)
    if num_clients > n:
        raise PartitionError(f"num-clients={num_clients} is more than the {n} training samples")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]
    if scheme == "dirichlet":
        return _dirichlet(labels, num_clients, alpha, min_size, rng)
    if scheme == "shards":
        return _shards(labels, num_clients, shards_per_client, rng)
    raise PartitionError(f"unknown partitioner '{scheme}' (choose iid, dirichlet or shards)")


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, piece in enumerate(np.split(idx, cuts)):
                parts[client].append(piece)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= min_size:
            return result
    raise PartitionError(
        f"dirichlet-alpha={alpha} left a client with fewer than {min_size} samples in "
        f"{DIRICHLET_TRIES} draws; raise dirichlet-alpha or lower num-clients={num_clients}"
    )


def _shards(labels: np.ndarray, num_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    num_shards = num_clients * k
    if num_shards > len(labels):
        raise PartitionError(
            f"num-clients={num_clients} x shards-per-client={k} is more shards than the {len(labels)} training samples"
        )
    # Shuffle first so ties within a class are broken by the seed, then sort stably by label.
    shuffled = rng.permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, k)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in dealt]


def train_test_split(
    indices: np.ndarray, test_fraction: float, seed: int, client: int
) -> tuple[np.ndarray, np.ndarray]:
    """A client's own train/test split of its partition, deterministic per (seed, client)."""
    rng = np.random.default_rng([seed, client])
    shuffled = rng.permutation(indices)
    n_test = min(int(round(len(indices) * test_fraction)), len(indices) - 1)
    return np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])
