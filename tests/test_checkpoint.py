"""Checkpoint files: exact round trip, retention, damage detection, atomic writes."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdam

from fedvault.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
)
from fedvault.strategies.state import load_strategy_state, strategy_state


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # deliberately not in sorted order, mixed dtypes, a 0-d integer buffer
    return {
        "fc2.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "fc1.bias": rng.standard_normal(4).astype(np.float64),
        "bn.num_batches_tracked": np.array(seed, dtype=np.int64),
    }


def _ckpt(round_: int, **changes) -> Checkpoint:
    state = random.getstate()
    fields = dict(
        round=round_,
        arrays=_arrays(round_),
        strategy_state={"strategy": "some.Strategy", "c/fc1.bias": np.full(4, 0.5 * round_)},
        rng_state={"python": [state[0], list(state[1]), state[2]]},
        ledger_entries=3 * round_,
        extra={"exhausted": [7, 9], "nested": {"x": 1.5}},
    )
    fields.update(changes)
    return Checkpoint(**fields)


def test_round_trip_is_exact_and_keeps_array_order(tmp_path):
    saved = _ckpt(2)
    path = save_checkpoint(tmp_path, saved)
    assert path == tmp_path / "checkpoints" / "round-0002.npz"
    loaded = load_latest_checkpoint(tmp_path)
    assert list(loaded.arrays) == list(saved.arrays)
    for name, value in saved.arrays.items():
        assert loaded.arrays[name].dtype == value.dtype and loaded.arrays[name].shape == value.shape
        assert loaded.arrays[name].tobytes() == value.tobytes()
    assert str(loaded.strategy_state["strategy"]) == "some.Strategy"
    np.testing.assert_array_equal(loaded.strategy_state["c/fc1.bias"], saved.strategy_state["c/fc1.bias"])
    assert (loaded.round, loaded.ledger_entries, loaded.extra) == (2, 6, saved.extra)


def test_python_rng_state_restores_the_same_sampling(tmp_path):
    random.seed(1234)
    random.random()
    save_checkpoint(tmp_path, _ckpt(1))
    expected = random.sample(range(1000), 10)  # what Flower's sample_nodes would draw next
    random.seed(999)  # a restarted process has another state
    version, internal, gauss = load_latest_checkpoint(tmp_path).rng_state["python"]
    random.setstate((version, tuple(internal), gauss))
    assert random.sample(range(1000), 10) == expected


def test_real_strategy_state_survives_save_and_load(tmp_path):
    rng = np.random.default_rng(0)
    before = FedAdam()
    before.current_arrays = {"w": rng.standard_normal(5)}
    before.m_t = {"w": rng.standard_normal(5)}
    before.v_t = {"w": rng.random(5)}
    save_checkpoint(tmp_path, _ckpt(4, strategy_state=strategy_state(before)))
    after = FedAdam()
    load_strategy_state(after, load_latest_checkpoint(tmp_path).strategy_state)
    for attr in ("current_arrays", "m_t", "v_t"):
        np.testing.assert_array_equal(getattr(after, attr)["w"], getattr(before, attr)["w"])


def test_keeps_the_newest_k_and_loads_the_newest(tmp_path):
    for r in range(0, 6):
        save_checkpoint(tmp_path, _ckpt(r), keep=3)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [3, 4, 5]
    assert load_latest_checkpoint(tmp_path).round == 5
    save_checkpoint(tmp_path, _ckpt(10_000), keep=3)  # past four digits still sorts by number
    assert load_latest_checkpoint(tmp_path).round == 10_000


def test_no_checkpoint_gives_none(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".round-0001.npz.tmp123").write_bytes(b"partial")  # a killed write
    assert load_latest_checkpoint(tmp_path) is None


def test_flipped_byte_in_the_newest_is_an_error_naming_it_and_the_fallback(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1))
    newest = save_checkpoint(tmp_path, _ckpt(2))
    data = bytearray(newest.read_bytes())
    weights = _arrays(2)["fc2.weight"].tobytes()
    at = bytes(data).index(weights) + 5  # inside the stored model array
    data[at] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as caught:
        load_latest_checkpoint(tmp_path)
    message = str(caught.value)
    assert str(newest) in message and "round-0001.npz" in message
    os.replace(newest, tmp_path / "damaged.npz")  # the documented way out
    assert load_latest_checkpoint(tmp_path).round == 1


def test_truncated_only_checkpoint_is_an_error(tmp_path):
    path = save_checkpoint(tmp_path, _ckpt(1))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="round-0001.npz is damaged or incomplete"):
        load_latest_checkpoint(tmp_path)


def test_failed_write_leaves_the_previous_checkpoints_and_no_temp_file(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _ckpt(1))

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, _ckpt(2))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-0001.npz"]
    assert load_latest_checkpoint(tmp_path).round == 1


@pytest.mark.parametrize(
    "changes, what",
    [
        ({"arrays": {"w": np.array([object()])}}, "object array"),
        ({"extra": {"x": np.float32(1.0)}}, "not JSON-able"),
        ({"extra": {"x": float("nan")}}, "not JSON-able"),
    ],
)
def test_unstorable_content_is_refused_before_anything_is_written(tmp_path, changes, what):
    with pytest.raises(CheckpointError, match=what):
        save_checkpoint(tmp_path, _ckpt(1, **changes))
    assert not checkpoint_path(tmp_path, 1).exists()
