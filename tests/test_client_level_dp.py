"""Client-level DP-FedAvg (fedvault.privacy.client_level) and Poisson client sampling."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from fedvault.privacy.client_level import (
    ClientLevelDPError,
    DPFedAvgAggregator,
    adaptive_update_noise_multiplier,
    clip_update,
    update_norm,
)
from fedvault.privacy.sampling import SamplingError, poisson_sample

rng = np.random.default_rng(7)  # test data only; the mechanisms draw their own noise


def model_arrays(scale: float = 1.0) -> list[np.ndarray]:
    return [rng.normal(0, scale, (30, 20)).astype(np.float32), rng.normal(0, scale, (20,)).astype(np.float32)]


def with_update(global_arrays, update):
    return [g.astype(np.float64) + u for g, u in zip(global_arrays, update)]


def delta_sum(result_arrays, global_arrays, expected_clients):
    """The noised sum of clipped updates, recovered from the new global model."""
    return [(r.astype(np.float64) - g) * expected_clients for r, g in zip(result_arrays, global_arrays)]


def test_clip_update_bounds_the_flat_norm_and_keeps_direction():
    update = [np.full((3, 4), 2.0), np.full(5, -1.0)]
    clipped, norm = clip_update(update, 1.5)
    assert norm == pytest.approx(math.sqrt(12 * 4 + 5))
    assert update_norm(clipped) == pytest.approx(1.5, rel=1e-12)
    for c, u in zip(clipped, update):
        np.testing.assert_allclose(c, u * 1.5 / norm)
    small = [np.array([0.3, 0.4])]
    kept, small_norm = clip_update(small, 1.0)
    assert small_norm == pytest.approx(0.5) and np.array_equal(kept[0], small[0])
    zero, zero_norm = clip_update([np.zeros(3)], 1.0)
    assert zero_norm == 0.0 and not zero[0].any()
    with pytest.raises(ClientLevelDPError, match="non-finite"):
        clip_update([np.array([1.0, np.nan])], 1.0)


def test_each_client_moves_the_sum_by_at_most_the_clip_norm():
    global_arrays = model_arrays()
    aggregator = DPFedAvgAggregator(noise_multiplier=0.0, clip_norm=1.0, expected_clients=1)
    huge = [rng.normal(0, 100, a.shape) for a in global_arrays]
    result = aggregator.aggregate(global_arrays, [with_update(global_arrays, huge)])
    moved = delta_sum(result.arrays, global_arrays, 1)
    assert update_norm(moved) == pytest.approx(1.0, rel=1e-5)
    assert all(r.dtype == np.float32 for r in result.arrays)


def test_denominator_is_the_expected_count_not_the_realised_one():
    global_arrays = model_arrays()
    updates = [[rng.normal(0, 0.01, a.shape) for a in global_arrays] for _ in range(3)]
    assert all(update_norm(u) < 1.0 for u in updates)  # no clipping involved
    aggregator = DPFedAvgAggregator(noise_multiplier=0.0, clip_norm=1.0, expected_clients=10)
    result = aggregator.aggregate(global_arrays, [with_update(global_arrays, u) for u in updates])
    for i, (got, g) in enumerate(zip(result.arrays, global_arrays)):
        expected = g.astype(np.float64) + sum(u[i] for u in updates) / 10
        np.testing.assert_allclose(got, expected.astype(np.float32), rtol=0, atol=1e-6)
    assert result.num_clients == 3


def test_noise_on_the_sum_has_std_z_times_c():
    z, clip, expected_clients = 1.3, 0.7, 10
    global_arrays = [np.zeros(50_000), np.zeros((100, 100))]
    aggregator = DPFedAvgAggregator(noise_multiplier=z, clip_norm=clip, expected_clients=expected_clients)
    clients = [[a.copy() for a in global_arrays] for _ in range(4)]  # zero updates: the sum is pure noise
    draws = []
    for _ in range(4):
        result = aggregator.aggregate(global_arrays, clients)
        draws += [d.ravel() for d in delta_sum(result.arrays, global_arrays, expected_clients)]
    noise = np.concatenate(draws)
    assert noise.std() == pytest.approx(z * clip, rel=0.02)
    assert abs(noise.mean()) < 4 * z * clip / math.sqrt(noise.size)
    assert result.noise_multiplier == z and result.update_noise_stddev == pytest.approx(z * clip)


def test_an_empty_round_is_still_noised():
    global_arrays = [np.zeros(10_000)]
    result = DPFedAvgAggregator(1.0, 1.0, expected_clients=5).aggregate(global_arrays, [])
    assert result.num_clients == 0
    assert np.std(result.arrays[0] * 5) == pytest.approx(1.0, rel=0.05)


def test_adaptive_update_noise_keeps_the_joint_multiplier():
    z, sigma_b = 1.0, 5.0
    z_delta = adaptive_update_noise_multiplier(z, sigma_b)
    assert z_delta > z
    assert (z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)  # Andrew et al., Thm. 1
    with pytest.raises(ClientLevelDPError, match="too small"):
        adaptive_update_noise_multiplier(2.0, 1.0)

    clip, expected_clients = 0.5, 100
    aggregator = DPFedAvgAggregator(z, clip, expected_clients, adaptive=True, clipped_count_stddev=sigma_b, clip_lr=0.0)
    assert aggregator.update_noise_multiplier == z_delta
    global_arrays = [np.zeros(100_000)]
    result = aggregator.aggregate(global_arrays, [[np.zeros(100_000)]])
    assert result.noise_multiplier == z  # what the accountant records
    noise = delta_sum(result.arrays, global_arrays, expected_clients)[0]
    assert noise.std() == pytest.approx(z_delta * clip, rel=0.02)


@pytest.mark.parametrize("start", [0.1, 50.0])
def test_adaptive_clip_norm_tracks_the_target_quantile(start):
    # Update norms ~ Uniform(1, 3): the median is 2, the 0.8-quantile is 2.6.
    for target, true_quantile in ((0.5, 2.0), (0.8, 2.6)):
        clients, dim = 100, 4
        aggregator = DPFedAvgAggregator(1.0, start, expected_clients=clients, adaptive=True, target_quantile=target)
        global_arrays, fractions = [np.zeros(dim)], []
        for _ in range(150):
            directions = rng.normal(size=(clients, dim))
            norms = rng.uniform(1, 3, clients)
            updates = directions / np.linalg.norm(directions, axis=1, keepdims=True) * norms[:, None]
            fractions.append(aggregator.aggregate(global_arrays, [[u] for u in updates]).unclipped_fraction)
        assert aggregator.clip_norm == pytest.approx(true_quantile, rel=0.1), (start, target)
        assert np.mean(fractions[-50:]) == pytest.approx(target, abs=0.05)  # noised, so averaged


def test_state_dict_resumes_the_clip_norm():
    aggregator = DPFedAvgAggregator(1.0, 1.0, expected_clients=20, adaptive=True)
    for _ in range(5):
        aggregator.aggregate([np.zeros(3)], [[np.full(3, 0.01)] for _ in range(20)])
    assert aggregator.clip_norm < 1.0  # every update was unclipped, so C shrinks
    resumed = DPFedAvgAggregator(1.0, 1.0, expected_clients=20, adaptive=True)
    resumed.load_state_dict(aggregator.state_dict())
    assert resumed.clip_norm == aggregator.clip_norm
    with pytest.raises(ClientLevelDPError, match="clip_norm"):
        resumed.load_state_dict({})
    with pytest.raises(ClientLevelDPError, match="clip_norm"):
        resumed.load_state_dict({"clip_norm": -1.0})


def test_bad_updates_are_refused_with_client_and_array_named():
    global_arrays = [np.zeros((2, 2)), np.zeros(3)]
    aggregator = DPFedAvgAggregator(1.0, 1.0, expected_clients=2)
    with pytest.raises(ClientLevelDPError, match="client 1 array 1 has shape"):
        aggregator.aggregate(global_arrays, [[np.zeros((2, 2)), np.zeros(3)], [np.zeros((2, 2)), np.zeros(4)]])
    with pytest.raises(ClientLevelDPError, match="client 0 array 0 contains non-finite"):
        aggregator.aggregate(global_arrays, [[np.full((2, 2), np.inf), np.zeros(3)]])
    with pytest.raises(ClientLevelDPError, match="client 0 sent 1 arrays"):
        aggregator.aggregate(global_arrays, [[np.zeros((2, 2))]])
    with pytest.raises(ClientLevelDPError, match="dtype int64"):
        aggregator.aggregate([np.zeros(2, dtype=np.int64)], [])
    with pytest.raises(ClientLevelDPError, match="expected_clients"):
        DPFedAvgAggregator(1.0, 1.0, expected_clients=0)


def test_poisson_sampling_includes_each_member_with_probability_q():
    population, q, trials = list(range(200)), 0.1, 500
    counts = np.zeros(len(population))
    sizes = []
    for _ in range(trials):
        chosen = poisson_sample(population, q)
        assert chosen == sorted(set(chosen))
        counts[chosen] += 1
        sizes.append(len(chosen))
    frequency = counts / trials
    assert frequency.mean() == pytest.approx(q, abs=5 * math.sqrt(q * (1 - q) / (len(population) * trials)))
    assert np.abs(frequency - q).max() < 6 * math.sqrt(q * (1 - q) / trials)
    # Independent inclusion: the sample size varies like Binomial(N, q), unlike fixed-size sampling.
    assert np.var(sizes) == pytest.approx(len(population) * q * (1 - q), rel=0.35)


def test_poisson_sampling_edges_and_errors():
    assert poisson_sample([1, 2, 3], 0.0) == []
    assert poisson_sample([1, 2, 3], 1.0) == [1, 2, 3]
    members = [5, 6, 7, 8]
    assert poisson_sample(members, 0.5, rng=random.Random(3)) == poisson_sample(members, 0.5, rng=random.Random(3))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(SamplingError, match="q must be"):
            poisson_sample([1, 2], bad)
    with pytest.raises(SamplingError, match="duplicate"):
        poisson_sample([1, 1], 0.5)
