"""Malicious client behaviours for robustness scenarios (simulation only).

With global model ``x`` and honestly trained model ``y`` (update ``u = y - x``), an attacker
replies instead with:

- ``sign-flip``: ``x - s * u`` (reversed, scaled gradient ascent; Fang et al., USENIX Sec. 2020);
- ``scale``: ``x + s * u`` (boosted update, "model replacement"; Bagdasaryan et al., AISTATS 2020);
- ``gaussian``: ``x + N(0, s^2 I)`` (random update; Blanchard et al., NeurIPS 2017);
- ``label-flip``: honest training on labels ``y -> C - 1 - y`` (Tolpegin et al., ESORICS 2020).

Only floating-point arrays are attacked; integer buffers pass through unchanged. Attack noise is
seeded for reproducible experiments: it protects nothing, so it need not be a CSPRNG.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from fedvault.errors import ConfigError, FedvaultError

NDArrays = dict[str, np.ndarray]
UPDATE_ATTACKS = ("sign-flip", "scale", "gaussian")


class AttackError(FedvaultError, ValueError):
    """An attack cannot apply to the arrays or labels it was given."""


def sign_flip(
    global_arrays: Mapping[str, np.ndarray], local_arrays: Mapping[str, np.ndarray], scale: float = 1.0
) -> NDArrays:
    """``x - scale * (y - x)``."""
    return _on_floats(global_arrays, local_arrays, lambda x, y: x - scale * (y - x))


def scaled_update(
    global_arrays: Mapping[str, np.ndarray], local_arrays: Mapping[str, np.ndarray], scale: float
) -> NDArrays:
    """``x + scale * (y - x)``."""
    return _on_floats(global_arrays, local_arrays, lambda x, y: x + scale * (y - x))


def gaussian_update(
    global_arrays: Mapping[str, np.ndarray], local_arrays: Mapping[str, np.ndarray], std: float, seed: int
) -> NDArrays:
    """``x + N(0, std^2)``, ignoring the honest update."""
    rng = np.random.default_rng(seed)
    return _on_floats(global_arrays, local_arrays, lambda x, y: x + rng.normal(0.0, std, size=x.shape))


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``C - 1 - y`` for integer class labels in ``[0, C)``."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise AttackError(
            f"label-flip attack: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    return (num_classes - 1 - labels).astype(labels.dtype)


def attack_update(
    kind: str, global_arrays: Mapping[str, np.ndarray], local_arrays: Mapping[str, np.ndarray], scale: float, seed: int
) -> NDArrays:
    """Apply update attack ``kind`` (``attack.kind``) with strength ``scale`` (``attack.scale``)."""
    if kind == "sign-flip":
        return sign_flip(global_arrays, local_arrays, scale)
    if kind == "scale":
        return scaled_update(global_arrays, local_arrays, scale)
    if kind == "gaussian":
        return gaussian_update(global_arrays, local_arrays, scale, seed)
    raise ConfigError(
        f"invalid value for 'attack.kind': {kind!r} is not an update attack (choose one of {', '.join(UPDATE_ATTACKS)})"
    )


def pick_attackers(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """Partition ids of the ``round(fraction * num_clients)`` attackers, the same for every call."""
    if num_clients < 1:
        raise ConfigError(f"attack: num-clients must be >= 1, got {num_clients}")
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"invalid value for 'attack.fraction': {fraction} (must be between 0 and 1)")
    count = int(np.floor(fraction * num_clients + 0.5))
    chosen = np.random.default_rng(seed).choice(num_clients, size=count, replace=False)
    return frozenset(int(i) for i in chosen)


def _on_floats(
    global_arrays: Mapping[str, np.ndarray],
    local_arrays: Mapping[str, np.ndarray],
    attack: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> NDArrays:
    if global_arrays.keys() != local_arrays.keys():
        raise AttackError(f"attack: model keys differ: {sorted(global_arrays)} vs {sorted(local_arrays)}")
    out: NDArrays = {}
    for key, y in local_arrays.items():
        x = global_arrays[key]
        out[key] = (
            np.asarray(attack(x.astype(np.float64), y.astype(np.float64)), dtype=y.dtype) if y.dtype.kind == "f" else y
        )
    return out
