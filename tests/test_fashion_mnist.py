"""The Fashion-MNIST task: IDX parsing on files the test writes, the missing-files line, the real files."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from fedvault.errors import TaskError
from fedvault.tasks import fashion_mnist_scatter as scatter
from fedvault.tasks import load_task
from fedvault.tasks.fashion_mnist import DEBIAN_DIR, ENV_DIR, FILES, MEAN, STD, load_fashion_mnist, read_idx


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(f"{path}.gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def tiny_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (6, 28, 28)),
        "train_y": np.arange(6) % 10,
        "test_x": rng.integers(0, 256, (4, 28, 28)),
        "test_y": np.array([9, 0, 3, 1]),
    }
    for i, (key, stem) in enumerate(FILES.items()):
        write_idx(tmp_path / stem, arrays[key], compress=i % 2 == 0)  # both spellings, .gz and plain
    return tmp_path, arrays


def test_idx_files_load_with_shapes_labels_and_standardised_pixels(tiny_dir):
    folder, arrays = tiny_dir
    data = load_fashion_mnist(folder)
    assert data.train.x.shape == (6, 1, 28, 28) and data.test.x.shape == (4, 1, 28, 28)
    assert data.train.x.dtype == np.float32 and data.train.y.dtype == np.int64
    np.testing.assert_array_equal(data.test.y, [9, 0, 3, 1])
    np.testing.assert_allclose(data.train.x[:, 0], (arrays["train_x"] / 255.0 - MEAN) / STD, rtol=1e-5)
    assert data.num_classes == 10


def test_environment_variable_points_the_task_at_a_folder(tiny_dir, monkeypatch):
    folder, _ = tiny_dir
    monkeypatch.setenv(ENV_DIR, str(folder))
    task = load_task("fashion-mnist")
    data = task.load_data(seed=0)
    assert len(data.train) == 6
    logits = task.build_model()(torch.as_tensor(data.train.x))
    assert logits.shape == (6, 10)


def test_missing_or_corrupt_files_say_how_to_get_them(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "nowhere"))
    with pytest.raises(TaskError, match="apt-get install -y dataset-fashion-mnist.*FEDVAULT_FASHION_MNIST_DIR"):
        load_task("fashion-mnist").load_data(seed=0)
    bad = tmp_path / "bad-idx"
    bad.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(TaskError, match="IDX header says"):
        read_idx(bad)


@pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed: apt-get update && apt-get install -y dataset-fashion-mnist",
)
def test_the_real_files_hold_60000_and_10000_images(monkeypatch):
    monkeypatch.delenv(ENV_DIR, raising=False)
    data = load_fashion_mnist()
    assert (len(data.train), len(data.test)) == (60000, 10000)
    assert np.bincount(data.test.y).tolist() == [1000] * 10
    assert abs(float(data.train.x.mean())) < 0.01 and abs(float(data.train.x.std()) - 1) < 0.01


def test_scatter_task_caches_features_once_and_feeds_a_linear_model(tiny_dir, tmp_path, monkeypatch):
    folder, arrays = tiny_dir
    monkeypatch.setenv(ENV_DIR, str(folder))
    monkeypatch.setenv(scatter.CACHE_ENV, str(tmp_path / "cache"))
    task = load_task("fashion-mnist-scatter")
    data = task.load_data(seed=0)
    assert data.train.x.shape == (6, 81, 7, 7) and data.test.x.shape == (4, 81, 7, 7)
    np.testing.assert_array_equal(data.test.y, [9, 0, 3, 1])
    images = load_fashion_mnist(folder)
    np.testing.assert_array_equal(data.train.x, scatter.scattering(images.train.x))
    # the zeroth-order channel is the image averaged by the scale-4 Gaussian: its mean is the image's
    np.testing.assert_allclose(
        data.train.x[:, 0].astype(np.float32).mean(axis=(1, 2)), images.train.x.mean(axis=(1, 2, 3)), atol=0.05
    )

    def recompute(_images):
        raise AssertionError("features recomputed although cached")

    monkeypatch.setattr(scatter, "scattering", recompute)
    again = load_task("fashion-mnist-scatter").load_data(seed=0)
    np.testing.assert_array_equal(again.train.x, data.train.x)
    assert isinstance(again.train.x, np.memmap)  # clients read only their own rows

    model = task.build_model()
    assert sum(p.numel() for p in model.parameters()) == 81 * 49 * 10 + 10
    assert model(torch.as_tensor(data.train.x, dtype=torch.float32)).shape == (6, 10)


def test_scatter_cache_key_follows_the_files(tiny_dir, tmp_path, monkeypatch):
    folder, arrays = tiny_dir
    monkeypatch.setenv(scatter.CACHE_ENV, str(tmp_path / "cache"))
    first = scatter.cached_features(load_fashion_mnist(folder), folder)[0].copy()
    write_idx(folder / FILES["train_x"], 255 - arrays["train_x"], compress=True)
    second = scatter.cached_features(load_fashion_mnist(folder), folder)[0]
    assert len(list((tmp_path / "cache").glob("fashion-mnist-scatter-*[!k]"))) == 2
    assert not np.array_equal(first, second)
