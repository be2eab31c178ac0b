import numpy as np
import pytest

from fedvault.errors import PartitionError
from fedvault.partition import partition, train_test_split

LABELS = np.random.default_rng(0).integers(0, 10, size=2000)


def label_skew(parts, labels, num_classes=10):
    """Mean total-variation distance between each client's label mix and the global one."""
    global_mix = np.bincount(labels, minlength=num_classes) / len(labels)
    return float(
        np.mean(
            [0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - global_mix).sum() for p in parts]
        )
    )


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_parts_are_disjoint_and_cover_the_data(scheme):
    parts = partition(LABELS, 20, scheme, seed=3)
    assert len(parts) == 20
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(LABELS)
    assert min(len(p) for p in parts) >= 2


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_same_seed_same_split_other_seed_other_split(scheme):
    a, b, c = (partition(LABELS, 10, scheme, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_label_skew_grows_as_alpha_falls():
    skews = [label_skew(partition(LABELS, 20, "dirichlet", seed=5, alpha=a), LABELS) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < label_skew(partition(LABELS, 20, "shards", seed=5), LABELS)


def test_iid_sizes_are_balanced():
    sizes = [len(p) for p in partition(LABELS, 7, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_shards_give_few_classes_per_client():
    parts = partition(LABELS, 20, "shards", seed=0, shards_per_client=2)
    classes = [len(np.unique(LABELS[p])) for p in parts]
    assert max(classes) <= 4  # 2 shards, each may straddle one class boundary
    assert np.mean(classes) < 3


def test_more_clients_than_samples_is_an_error():
    with pytest.raises(PartitionError, match="num-clients=30 is more than the 20 training samples"):
        partition(LABELS[:20], 30, "iid", seed=0)
    with pytest.raises(PartitionError, match="shards-per-client=2 is more shards than the 20"):
        partition(LABELS[:20], 15, "shards", seed=0)


def test_dirichlet_that_cannot_reach_min_size_says_what_to_change():
    with pytest.raises(PartitionError, match="raise dirichlet-alpha or lower num-clients=40"):
        partition(LABELS[:100], 40, "dirichlet", seed=0, alpha=0.01)


def test_client_train_test_split_is_deterministic_and_disjoint():
    idx = np.arange(100, 150)
    train, test = train_test_split(idx, 0.2, seed=4, client=3)
    assert len(test) == 10 and len(train) == 40
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(idx)
    again = train_test_split(idx, 0.2, seed=4, client=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert len(train_test_split(np.arange(1), 0.5, seed=0, client=0)[0]) == 1  # never an empty train split
