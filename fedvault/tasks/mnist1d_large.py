"""MNIST-1D at scale: the MNIST-1D generator (Greydanus & Kobak, ICML 2024) vectorised with numpy.

The ``mnist1d`` package builds one example at a time (about 1 ms each: 46 s for 50,000 on two
cores). This applies its transform pipeline to all examples at once, with the same templates and
the same parameters (``mnist1d.data.get_dataset_args``): pad each 12-sample template with 36-60
zeros and dilate to 72 samples, scale by ``1 + 0.4 (u - 1/2)``, translate cyclically by 0-47,
fill the padding with correlated noise (Gaussian-filtered, sigma 2, scale 0.25), add i.i.d. noise
(0.02), shear by ``0.75 (u - 1/2)``, subsample to 40, then standardise the whole set. The random
stream differs from the package's loop, so the examples are new draws from the same distribution.

``mnist1d-large``: 40,000 training and 5,000 test examples, the paper's small CNN. Enough data
per client for sample-level DP-SGD to learn (README's main job).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d
from torch import nn

from fedvault.errors import MissingPackageError
from fedvault.tasks.base import ArrayDataset, SupervisedTask, TaskData
from fedvault.tasks.mnist1d import Mnist1dTask

TRAIN_EXAMPLES, TEST_EXAMPLES = 40_000, 5_000
GENERATOR_SEED = 42  # fixed: the dataset is a benchmark, the run's seed partitions it


def _linear_resample(x: np.ndarray, length: np.ndarray | int, size: int) -> np.ndarray:
    """Row-wise linear interpolation of the first ``length`` samples of each row onto ``size`` points
    (``scipy.interpolate.interp1d(linspace(0, 1, length), x)(linspace(0, 1, size))``)."""
    n = x.shape[0]
    length = np.broadcast_to(np.asarray(length), (n,))
    position = np.linspace(0.0, 1.0, size)[None, :] * (length[:, None] - 1)
    left = np.minimum(np.floor(position).astype(np.int64), length[:, None] - 2)
    frac = position - left
    rows = np.arange(n)[:, None]
    return x[rows, left] * (1 - frac) + x[rows, left + 1] * frac


def generate(num_examples: int, seed: int = GENERATOR_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``num_examples`` MNIST-1D signals (shape ``(n, 40)``, standardised) and labels, classes balanced."""
    try:
        from mnist1d.data import get_dataset_args, get_templates
    except ImportError:
        raise MissingPackageError("mnist1d", "task 'mnist1d-large'") from None
    args, templates = get_dataset_args(), get_templates()
    rng = np.random.default_rng(seed)
    labels = np.repeat(templates["y"], num_examples // len(templates["y"]))
    n, width = len(labels), args.template_len + args.padding[1]

    low, high = args.padding
    pad = low + (rng.random(n) * (high - low + 1)).astype(np.int64)
    padded = np.zeros((n, width))
    padded[:, : args.template_len] = templates["x"][labels] + 1e-8  # eps: the signal is never exactly 0
    x = _linear_resample(padded, args.template_len + pad, width)  # pad, then dilate to `width`
    x *= 1 + args.scale_coeff * (rng.random(n)[:, None] - 0.5)
    shift = rng.integers(0, args.max_translation, n)
    x = x[np.arange(n)[:, None], (np.arange(width)[None, :] - shift[:, None]) % width]
    noise = gaussian_filter1d(args.corr_noise_scale * rng.standard_normal((n, width)), 2, axis=-1)
    x = np.where(x != 0, x, noise) + args.iid_noise_scale * rng.standard_normal((n, width))
    x -= args.shear_scale * (rng.random(n)[:, None] - 0.5) * np.linspace(-0.5, 0.5, width)[None, :]
    x = _linear_resample(x, width, args.final_seq_length)

    order = rng.permutation(n)
    x, labels = x[order], labels[order]
    return ((x - x.mean()) / x.std()).astype(np.float32), labels.astype(np.int64)


class Mnist1dLargeTask(SupervisedTask):
    """MNIST-1D with 40,000 training and 5,000 test examples, the paper's small CNN."""

    name = "mnist1d-large"

    def load_data(self, seed: int) -> TaskData:
        x, y = generate(TRAIN_EXAMPLES + TEST_EXAMPLES)
        train = ArrayDataset(x[:TRAIN_EXAMPLES, None, :], y[:TRAIN_EXAMPLES])
        test = ArrayDataset(x[TRAIN_EXAMPLES:, None, :], y[TRAIN_EXAMPLES:])
        return TaskData(train=train, test=test, num_classes=10)

    def build_model(self) -> nn.Module:
        return Mnist1dTask().build_model()
