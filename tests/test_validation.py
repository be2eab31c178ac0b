"""Update validation: each kind of bad train reply is dropped with a reason naming the problem,
good replies are kept untouched, and strategies declare their extra reply contract."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedvault.strategies.fednova import A_NORM_KEY, TAU_KEY, FedNova
from fedvault.strategies.scaffold import CLIENT_DELTA_KEY, Scaffold
from fedvault.strategies.validation import ValidationRules, filter_replies, validate_reply

RULES = ValidationRules(max_update_norm=1.0, max_payload_bytes=10_000)


def _reference() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
        "count": np.array(5, dtype=np.int64),
    }


REFERENCE = ArrayRecord({k: Array(v) for k, v in _reference().items()})


def _model(delta_norm: float = 0.5, **changes) -> dict[str, np.ndarray]:
    """Reference + an update of the given L2 norm over the float arrays; count moves by 100."""
    ref = _reference()
    direction = {k: np.ones_like(v) for k, v in ref.items() if v.dtype.kind == "f"}
    size = np.sqrt(sum(d.size for d in direction.values()))
    model = {
        k: (ref[k] + delta_norm / size * direction[k]).astype(ref[k].dtype)
        if k in direction
        else np.asarray(ref[k] + 100)
        for k in ref
    }
    model.update(changes)
    return {k: v for k, v in model.items() if v is not None}


def _content(model=None, metrics=None, **records) -> RecordDict:
    model = _model() if model is None else model
    metrics = {"num-examples": 10, "train_loss": 0.3} if metrics is None else metrics
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), **records})


def test_good_reply_passes():
    assert validate_reply(_content(), REFERENCE, RULES) is None


def test_norm_bound_counts_float_arrays_only_and_is_inclusive():
    assert validate_reply(_content(_model(delta_norm=0.999)), REFERENCE, RULES) is None  # count moved by 100: ignored
    reason = validate_reply(_content(_model(delta_norm=1.5)), REFERENCE, RULES)
    assert reason.startswith("update L2 norm 1.5") and "exceeds the bound 1" in reason
    assert validate_reply(_content(_model(delta_norm=50.0)), REFERENCE, ValidationRules()) is None  # no bound set


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (_model(b=None), "'arrays' is missing array key(s) ['b']"),
        (_model(extra=np.zeros(2, np.float32)), "'arrays' has unexpected array key(s) ['extra']"),
        (_model(w=np.zeros((4, 3), np.float32)), "array 'w' has shape (4, 3), expected (3, 4)"),
        (_model(w=np.zeros((3, 4), np.float64)), "array 'w' has dtype float64, expected float32"),
        (_model(b=np.array([0, np.nan, 0, 0], np.float32)), "array 'b' in 'arrays' contains NaN or Inf"),
        (_model(b=np.array([0, 0, -np.inf, 0], np.float32)), "array 'b' in 'arrays' contains NaN or Inf"),
    ],
)
def test_bad_arrays_are_named(model, expected):
    assert validate_reply(_content(model), REFERENCE, RULES) == expected


def test_undecodable_array_is_dropped():
    model = {k: Array(v) for k, v in _model().items()}
    model["w"] = Array(dtype="float32", shape=(3, 4), stype="numpy.ndarray", data=b"not an npy file")
    content = RecordDict({"arrays": ArrayRecord(model), "metrics": MetricRecord({"num-examples": 1})})
    assert validate_reply(content, REFERENCE, RULES).startswith("array 'w' in 'arrays' cannot be decoded")


def test_oversized_payload_is_dropped_before_decoding():
    big = _content()
    size = big["arrays"].count_bytes()
    assert validate_reply(big, REFERENCE, ValidationRules(max_payload_bytes=size)) is None
    assert validate_reply(big, REFERENCE, ValidationRules(max_payload_bytes=size - 1)) == (
        f"payload of {size} bytes exceeds the limit of {size - 1} bytes"
    )


def test_missing_or_unexpected_array_records():
    content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
    assert validate_reply(content, REFERENCE, RULES) == "missing ArrayRecord 'arrays'"
    extra = _content(**{"stolen": ArrayRecord({"x": Array(np.zeros(1))})})
    assert validate_reply(extra, REFERENCE, RULES) == "unexpected ArrayRecord(s) ['stolen']"


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"train_loss": 0.1}, "metric 'num-examples' must be a positive number, got None"),
        ({"num-examples": 0}, "metric 'num-examples' must be a positive number, got 0"),
        ({"num-examples": -3}, "metric 'num-examples' must be a positive number, got -3"),
        ({"num-examples": float("nan")}, "metric 'num-examples' must be a positive number, got nan"),
        ({"num-examples": [1, 2]}, "metric 'num-examples' must be a positive number, got [1, 2]"),
    ],
)
def test_bad_weight_metric_is_named(metrics, expected):
    assert validate_reply(_content(metrics=metrics), REFERENCE, RULES) == expected


def test_metric_record_count_and_required_metrics():
    no_metrics = RecordDict({"arrays": _content()["arrays"]})
    assert validate_reply(no_metrics, REFERENCE, RULES) == "expected exactly one MetricRecord, found 0 []"
    two = _content(**{"more": MetricRecord({"x": 1.0})})
    assert validate_reply(two, REFERENCE, RULES) == "expected exactly one MetricRecord, found 2 ['metrics', 'more']"
    rules = ValidationRules(required_metrics=("fednova.tau",))
    assert validate_reply(_content(), REFERENCE, rules) == "metric 'fednova.tau' must be a finite number, got None"
    assert validate_reply(_content(metrics={"num-examples": 3, "fednova.tau": 4.0}), REFERENCE, rules) is None


def test_rules_follow_the_strategy_contract():
    scaffold = ValidationRules.for_strategy(Scaffold(), max_update_norm=2.0)
    assert scaffold.extra_array_records == (CLIENT_DELTA_KEY,) and scaffold.max_update_norm == 2.0
    assert ValidationRules.for_strategy(FedNova()).required_metrics == (TAU_KEY, A_NORM_KEY)


def test_declared_extra_record_is_checked():
    rules = ValidationRules.for_strategy(Scaffold())
    delta = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}

    def with_delta(**arrays):
        return _content(**{CLIENT_DELTA_KEY: ArrayRecord({k: Array(v) for k, v in {**delta, **arrays}.items()})})

    assert validate_reply(with_delta(), REFERENCE, rules) is None
    assert validate_reply(_content(), REFERENCE, rules) == f"missing ArrayRecord '{CLIENT_DELTA_KEY}'"
    assert validate_reply(with_delta(b=np.full(4, np.inf, np.float32)), REFERENCE, rules) == (
        f"array 'b' in '{CLIENT_DELTA_KEY}' contains NaN or Inf"
    )
    assert "expected a float array of shape (3, 4)" in validate_reply(
        with_delta(w=np.zeros(12, np.float32)), REFERENCE, rules
    )
    assert validate_reply(with_delta(z=np.zeros(1, np.float32)), REFERENCE, rules) == (
        f"'{CLIENT_DELTA_KEY}' has array key(s) ['z'] that the model does not have"
    )


def test_filter_replies_keeps_good_and_drops_each_bad_one(flower_task_identity, caplog):
    def instruction(node: int) -> Message:
        return Message(
            RecordDict({"arrays": REFERENCE, "config": ConfigRecord()}), dst_node_id=node, message_type="train"
        )

    good_a = Message(_content(), reply_to=instruction(1))
    good_b = Message(_content(_model(delta_norm=0.2)), reply_to=instruction(2))
    too_far = Message(_content(_model(delta_norm=3.0)), reply_to=instruction(3))
    failed = Message(Error(code=5, reason="client crashed"), reply_to=instruction(4))
    duplicate = Message(_content(), reply_to=instruction(1))
    with caplog.at_level(logging.WARNING, logger="fedvault.strategies.validation"):
        kept, dropped = filter_replies([good_a, too_far, failed, good_b, duplicate], REFERENCE, RULES)
    assert kept == [good_a, good_b]
    assert [node for node, _ in dropped] == [3, 4, 1]
    reasons = [reason for _, reason in dropped]
    assert reasons[0].startswith("update L2 norm 3")
    assert reasons[1] == "error reply (code 5): client crashed"
    assert reasons[2] == "duplicate reply from the same node"
    assert sum("dropped update from node" in r.message for r in caplog.records) == 3
