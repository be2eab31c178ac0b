"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) from the original IDX files, with a DP-friendly CNN.

The files load from a folder, never the network: ``$FEDVAULT_FASHION_MNIST_DIR`` when set, else
Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``). Each of
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` may be gzipped (``.gz``) or not. 60,000 training and 10,000 test
images, 28x28 grey levels, 10 classes.

The model is the end-to-end CNN Tramer and Boneh (ICLR 2021, "Differentially Private Learning
Needs Better Features") train with DP-SGD: two strided convolutions and a two-layer head with tanh
activations (Papernot et al., AAAI 2021, "Tempered Sigmoid Activations for Deep Learning with
Differential Privacy"); no BatchNorm, so Opacus needs no repair. They report 86.0 % at
(3, 1e-5) central DP with batch 2048, lr 4, noise multiplier 2.15, 40 epochs.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from torch import nn

from fedvault.errors import TaskError
from fedvault.tasks.base import ArrayDataset, SupervisedTask, TaskData

ENV_DIR = "FEDVAULT_FASHION_MNIST_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
#: Mean and standard deviation of the training pixels in [0, 1].
MEAN, STD = 0.2860, 0.3530
_IDX_DTYPE = {0x08: np.uint8}


def data_dir() -> Path:
    """Where the IDX files are read from: ``$FEDVAULT_FASHION_MNIST_DIR`` or Debian's folder."""
    return Path(os.environ[ENV_DIR]) if os.environ.get(ENV_DIR) else DEBIAN_DIR


def missing_files_message(folder: Path) -> str:
    return (
        f"task 'fashion-mnist': the Fashion-MNIST IDX files are not in {folder}; install them with "
        f"`apt-get update && apt-get install -y dataset-fashion-mnist`, or set {ENV_DIR} to a folder holding "
        f"{', '.join(FILES.values())} (each may end in .gz)"
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (big-endian header: two zero bytes, a type code, the number of dimensions, the sizes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPE:
        raise TaskError(f"{path}: not an unsigned-byte IDX file (header {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise TaskError(f"{path}: IDX header says {dims} ({int(np.prod(dims))} values), file holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=_IDX_DTYPE[raw[2]], offset=offset).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise TaskError(missing_files_message(folder))


def load_fashion_mnist(folder: Path | None = None) -> TaskData:
    """Train and test sets from ``folder`` (default :func:`data_dir`), standardised, shape (N, 1, 28, 28)."""
    folder = folder or data_dir()
    arrays = {key: read_idx(_find(folder, stem)) for key, stem in FILES.items()}

    def images(x: np.ndarray) -> np.ndarray:
        return ((x.astype(np.float32) / 255.0 - MEAN) / STD)[:, None, :, :]

    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise TaskError(f"{folder}: {split} images and labels differ in count")
    return TaskData(
        train=ArrayDataset(images(arrays["train_x"]), arrays["train_y"].astype(np.int64)),
        test=ArrayDataset(images(arrays["test_x"]), arrays["test_y"].astype(np.int64)),
        num_classes=10,
    )


class FashionMnistTask(SupervisedTask):
    """10-class classification of 28x28 clothing images."""

    name = "fashion-mnist"

    def load_data(self, seed: int) -> TaskData:
        return load_fashion_mnist()

    def build_model(self) -> nn.Module:
        """Tramer and Boneh's DP-SGD CNN with tanh activations (about 26k parameters)."""
        return nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=8, stride=2, padding=3),
            nn.Tanh(),
            nn.MaxPool2d(2, stride=1),
            nn.Conv2d(16, 32, kernel_size=4, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(2, stride=1),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 32),
            nn.Tanh(),
            nn.Linear(32, 10),
        )
