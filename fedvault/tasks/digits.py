"""scikit-learn's bundled 8x8 handwritten digits (UCI, 1,797 images) with a small MLP: fast tests."""

from __future__ import annotations

import numpy as np
from torch import nn

from fedvault.errors import MissingPackageError
from fedvault.tasks.base import ArrayDataset, SupervisedTask, TaskData

TEST_SHARE = 0.25


class DigitsTask(SupervisedTask):
    """10-class classification of 64 pixel intensities."""

    name = "digits"

    def load_data(self, seed: int) -> TaskData:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise MissingPackageError("scikit-learn", "task 'digits'") from None
        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)
        order = np.random.default_rng(seed).permutation(len(y))
        n_test = int(len(y) * TEST_SHARE)
        test, train = order[:n_test], order[n_test:]
        return TaskData(
            train=ArrayDataset(x[train], y[train].astype(np.int64)),
            test=ArrayDataset(x[test], y[test].astype(np.int64)),
            num_classes=10,
        )

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
