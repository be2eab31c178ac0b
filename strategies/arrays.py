"""NumPy views of Flower ``ArrayRecord``s, shared by fedvault's aggregation and state code.

Aggregation math runs in float64 on ``dict[str, np.ndarray]`` keyed like the model's
``state_dict``; results are cast back to the global model's dtypes (integers are rounded, so a
buffer such as BatchNorm's ``num_batches_tracked`` stays an integer).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

NDArrays = dict[str, np.ndarray]


def to_ndarrays(record: ArrayRecord) -> NDArrays:
    """``{key: ndarray}`` in the record's key order."""
    return {key: array.numpy() for key, array in record.items()}


def cast_like(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``value`` with the dtype of ``like``; integer dtypes are rounded, not truncated."""
    if np.issubdtype(like.dtype, np.integer):
        value = np.rint(value)
    return np.asarray(value, dtype=like.dtype)


def to_record(arrays: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray] | None = None) -> ArrayRecord:
    """An ``ArrayRecord`` of ``arrays``, each cast to the dtype of the same key in ``like``."""
    return ArrayRecord(
        {
            key: Array(cast_like(value, like[key]) if like is not None else np.asarray(value))
            for key, value in arrays.items()
        }
    )


def float_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Keys of the floating-point arrays (trainable weights; not integer counters)."""
    return [key for key, value in arrays.items() if np.issubdtype(value.dtype, np.floating)]


def pack(prefix: str, arrays: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Flatten a named group of arrays into ``{"prefix/key": array}`` (npz-friendly)."""
    return {} if arrays is None else {f"{prefix}/{key}": np.asarray(value) for key, value in arrays.items()}


def unpack(state: Mapping[str, object], prefix: str) -> NDArrays | None:
    """The group written by :func:`pack` (``None`` when absent), in stored order."""
    head = prefix + "/"
    group = {key[len(head) :]: np.asarray(value) for key, value in state.items() if key.startswith(head)}
    return group or None
