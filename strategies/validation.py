"""Check every train reply before any strategy aggregates it; drop bad ones with a reason.

A reply is kept only if it is not an error reply and, in this order (cheap checks first):

1. its ArrayRecords weigh at most ``max_payload_bytes`` (sizes read without decoding);
2. it carries the model ArrayRecord (``arrays_key``) and no ArrayRecord other than
   ``extra_array_records`` (e.g. SCAFFOLD's ``"scaffold.delta-c"``);
3. the model has exactly the reference's keys, each a NumPy-serialised array with the
   reference's shape and dtype, all finite (no NaN/Inf);
4. the update norm ``||reply - reference||_2`` over all floating-point arrays (integer
   counters such as ``num_batches_tracked`` excluded) is at most ``max_update_norm``;
5. each extra ArrayRecord holds finite float arrays under reference keys with matching shapes;
6. it has exactly one MetricRecord, whose ``weight_key`` (``"num-examples"``) is a finite
   positive number, and which holds every ``required_metrics`` key as a finite number.

Decoding is one ``np.load`` per array; the finiteness test and the norm are vectorised passes
(difference in at least float32, squares summed in float64).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from fedvault.protocol import ARRAYS, NUM_EXAMPLES
from fedvault.strategies.arrays import NDArrays, to_ndarrays

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationRules:
    """What a train reply must satisfy; ``None`` disables a bound."""

    max_update_norm: float | None = None
    max_payload_bytes: int | None = None
    arrays_key: str = ARRAYS
    weight_key: str = NUM_EXAMPLES
    required_metrics: tuple[str, ...] = ()
    extra_array_records: tuple[str, ...] = ()

    @classmethod
    def for_strategy(cls, strategy: object, **overrides: Any) -> ValidationRules:
        """Rules matching a strategy's reply contract (record keys, extra records, metrics)."""
        rules = cls(
            arrays_key=getattr(strategy, "arrayrecord_key", cls.arrays_key),
            weight_key=getattr(strategy, "weighted_by_key", cls.weight_key),
            required_metrics=tuple(getattr(strategy, "required_reply_metrics", ())),
            extra_array_records=tuple(getattr(strategy, "extra_reply_records", ())),
        )
        return replace(rules, **overrides)


def validate_reply(content: RecordDict, reference: ArrayRecord, rules: ValidationRules) -> str | None:
    """``None`` if ``content`` is an acceptable train reply against global ``reference``, else why not."""
    return _validate(content, to_ndarrays(reference), rules)


def filter_replies(
    replies: Iterable[Message], reference: ArrayRecord, rules: ValidationRules
) -> tuple[list[Message], list[tuple[int, str]]]:
    """``(kept, dropped)``: replies that pass, and ``(node_id, reason)`` for the rest (logged)."""
    ref = to_ndarrays(reference)
    kept: list[Message] = []
    dropped: list[tuple[int, str]] = []
    seen: set[int] = set()
    for msg in replies:
        node = msg.metadata.src_node_id
        reason: str | None
        if msg.has_error():
            reason = f"error reply (code {msg.error.code}): {msg.error.reason}"
        elif node in seen:
            reason = "duplicate reply from the same node"
        else:
            reason = _validate(msg.content, ref, rules)
        seen.add(node)
        if reason is None:
            kept.append(msg)
        else:
            logger.warning("dropped update from node %s: %s", node, reason)
            dropped.append((node, reason))
    return kept, dropped


def _validate(content: RecordDict, ref: NDArrays, rules: ValidationRules) -> str | None:
    records = content.array_records
    if rules.max_payload_bytes is not None:
        size = sum(record.count_bytes() for record in records.values())
        if size > rules.max_payload_bytes:
            return f"payload of {size} bytes exceeds the limit of {rules.max_payload_bytes} bytes"
    if rules.arrays_key not in records:
        return f"missing ArrayRecord '{rules.arrays_key}'"
    unexpected = sorted(set(records) - {rules.arrays_key, *rules.extra_array_records})
    if unexpected:
        return f"unexpected ArrayRecord(s) {unexpected}"
    return (
        _check_model(records[rules.arrays_key], ref, rules)
        or _check_extras(content, ref, rules)
        or _check_metrics(content, rules)
    )


def _decode(record: ArrayRecord, key: str, record_name: str) -> np.ndarray | str:
    """The array under ``key``, or a reason it cannot be used."""
    try:
        value = record[key].numpy()
    except Exception as exc:  # noqa: BLE001 - malformed bytes can fail inside np.load in many ways
        return f"array '{key}' in '{record_name}' cannot be decoded: {type(exc).__name__}: {exc}"
    if value.dtype.kind in "fc" and not np.isfinite(value).all():
        return f"array '{key}' in '{record_name}' contains NaN or Inf"
    return value


def _key_mismatch(got: Iterable[str], expected: Iterable[str], record_name: str) -> str | None:
    got, expected = set(got), set(expected)
    missing, extra = sorted(expected - got), sorted(got - expected)
    if missing:
        return f"'{record_name}' is missing array key(s) {missing}"
    if extra:
        return f"'{record_name}' has unexpected array key(s) {extra}"
    return None


def _check_model(record: ArrayRecord, ref: NDArrays, rules: ValidationRules) -> str | None:
    name = rules.arrays_key
    if reason := _key_mismatch(record.keys(), ref.keys(), name):
        return reason
    squared = 0.0
    for key, expected in ref.items():
        value = _decode(record, key, name)
        if isinstance(value, str):
            return value
        if value.shape != expected.shape:
            return f"array '{key}' has shape {value.shape}, expected {expected.shape}"
        if value.dtype != expected.dtype:
            return f"array '{key}' has dtype {value.dtype}, expected {expected.dtype}"
        if rules.max_update_norm is not None and value.dtype.kind == "f":
            diff = np.subtract(value, expected, dtype=np.promote_types(value.dtype, np.float32))
            np.square(diff, out=diff)
            squared += float(diff.sum(dtype=np.float64))
    if rules.max_update_norm is not None:
        norm = math.sqrt(squared)
        if not norm <= rules.max_update_norm:
            return f"update L2 norm {norm:.6g} exceeds the bound {rules.max_update_norm:.6g}"
    return None


def _check_extras(content: RecordDict, ref: NDArrays, rules: ValidationRules) -> str | None:
    for name in rules.extra_array_records:
        if name not in content.array_records:
            return f"missing ArrayRecord '{name}'"
        record = content.array_records[name]
        if unknown := sorted(set(record.keys()) - set(ref)):
            return f"'{name}' has array key(s) {unknown} that the model does not have"
        for key in record.keys():
            value = _decode(record, key, name)
            if isinstance(value, str):
                return value
            if value.dtype.kind != "f" or value.shape != ref[key].shape:
                return (
                    f"array '{key}' in '{name}' is {value.dtype}{list(value.shape)}, "
                    f"expected a float array of shape {ref[key].shape}"
                )
    return None


def _check_metrics(content: RecordDict, rules: ValidationRules) -> str | None:
    metric_records = content.metric_records
    if len(metric_records) != 1:
        return f"expected exactly one MetricRecord, found {len(metric_records)} {sorted(metric_records)}"
    metrics: Mapping[str, Any] = next(iter(metric_records.values()))
    weight = metrics.get(rules.weight_key)
    if not _is_number(weight) or weight <= 0:
        return f"metric '{rules.weight_key}' must be a positive number, got {weight!r}"
    for key in rules.required_metrics:
        if not _is_number(metrics.get(key)):
            return f"metric '{key}' must be a finite number, got {metrics.get(key)!r}"
    return None


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
