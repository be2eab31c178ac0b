"""Malicious client behaviours: each attack produces the update it is defined to, leaves integer
buffers alone, and attacker selection is deterministic under its seed."""

from __future__ import annotations

import numpy as np
import pytest

from fedvault.client.attacks import (
    AttackError,
    attack_update,
    flip_labels,
    gaussian_update,
    pick_attackers,
    scaled_update,
    sign_flip,
)
from fedvault.errors import ConfigError

X = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "steps": np.array(10, np.int64)}
Y = {"w": np.array([[1.5, 1.0], [3.0, 5.0]], np.float32), "steps": np.array(13, np.int64)}
UPDATE = Y["w"] - X["w"]


def test_sign_flip_reverses_and_scales_the_update():
    out = sign_flip(X, Y, scale=3.0)
    np.testing.assert_allclose(out["w"] - X["w"], -3.0 * UPDATE)
    assert out["w"].dtype == np.float32 and out["steps"] == Y["steps"]


def test_scaled_update_boosts_the_update():
    out = scaled_update(X, Y, scale=10.0)
    np.testing.assert_allclose(out["w"] - X["w"], 10.0 * UPDATE)
    assert out["steps"] == Y["steps"]


def test_gaussian_update_ignores_the_honest_update_and_is_seeded():
    a, b = gaussian_update(X, Y, std=2.0, seed=1), gaussian_update(X, Y, std=2.0, seed=1)
    np.testing.assert_array_equal(a["w"], b["w"])
    assert not np.array_equal(a["w"], gaussian_update(X, Y, std=2.0, seed=2)["w"])
    big = {"w": np.zeros(20_000, np.float32)}
    noise = gaussian_update(big, big, std=2.0, seed=0)["w"]
    assert noise.std() == pytest.approx(2.0, rel=0.05) and abs(noise.mean()) < 0.1


def test_attack_update_dispatches_by_config_kind():
    np.testing.assert_array_equal(attack_update("sign-flip", X, Y, 2.0, 0)["w"], sign_flip(X, Y, 2.0)["w"])
    np.testing.assert_array_equal(attack_update("scale", X, Y, 2.0, 0)["w"], scaled_update(X, Y, 2.0)["w"])
    np.testing.assert_array_equal(attack_update("gaussian", X, Y, 2.0, 5)["w"], gaussian_update(X, Y, 2.0, 5)["w"])
    with pytest.raises(ConfigError, match="'attack.kind': 'label-flip' is not an update attack"):
        attack_update("label-flip", X, Y, 1.0, 0)


def test_mismatched_models_are_refused():
    with pytest.raises(AttackError, match="model keys differ"):
        sign_flip(X, {"w": Y["w"]})


def test_label_flip_maps_y_to_c_minus_1_minus_y():
    labels = np.array([0, 1, 2, 9, 4], np.int64)
    flipped = flip_labels(labels, 10)
    np.testing.assert_array_equal(flipped, [9, 8, 7, 0, 5])
    np.testing.assert_array_equal(flip_labels(flipped, 10), labels)
    assert flipped.dtype == labels.dtype
    with pytest.raises(AttackError, match=r"labels must lie in \[0, 3\)"):
        flip_labels(labels, 3)


def test_pick_attackers_is_deterministic_and_sized_by_fraction():
    chosen = pick_attackers(20, 0.25, seed=3)
    assert chosen == pick_attackers(20, 0.25, seed=3)
    assert len(chosen) == 5 and all(0 <= i < 20 for i in chosen)
    assert len({pick_attackers(20, 0.25, seed=s) for s in range(10)}) > 1  # the seed matters
    assert pick_attackers(10, 0.0, seed=0) == frozenset()
    assert pick_attackers(10, 1.0, seed=0) == frozenset(range(10))
    assert len(pick_attackers(10, 0.15, seed=0)) == 2  # rounds half up
    with pytest.raises(ConfigError, match="'attack.fraction': 1.5"):
        pick_attackers(10, 1.5, seed=0)
