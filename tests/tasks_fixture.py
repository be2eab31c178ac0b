"""A user's own task, defined outside fedvault, loaded as 'tasks_fixture:TinyTask' in tests."""

import numpy as np
from torch import nn

from fedvault.tasks import ArrayDataset, SupervisedTask, TaskData


class TinyTask(SupervisedTask):
    name = "tiny"

    def load_data(self, seed: int) -> TaskData:
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(120, 4)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        return TaskData(ArrayDataset(x[:100], y[:100]), ArrayDataset(x[100:], y[100:]), num_classes=2)

    def build_model(self) -> nn.Module:
        return nn.Linear(4, 2)


NOT_A_TASK = 42
