import sys

import numpy as np
import pytest
import torch

from fedvault.errors import MissingPackageError, TaskError
from fedvault.tasks import TrainSettings, available_tasks, load_task, make_loader


def test_builtin_tasks_are_registered():
    assert {"digits", "mnist1d"} <= set(available_tasks())


def test_mnist1d_loads_the_published_split_locally():
    task = load_task("mnist1d")
    data = task.load_data(seed=0)
    assert data.train.x.shape == (4000, 1, 40) and data.test.x.shape == (1000, 1, 40)
    assert set(np.unique(data.train.y)) == set(range(10))
    assert task.build_model()(torch.as_tensor(data.test.x[:3])).shape == (3, 10)


def test_digits_train_then_evaluate_improves_accuracy():
    task = load_task("digits")
    data = task.load_data(seed=0)
    torch.manual_seed(0)
    model = task.build_model()
    device = torch.device("cpu")
    test_loader = make_loader(data.test, 256, shuffle=False)
    before = task.evaluate(model, test_loader, device)["accuracy"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    result = task.train(
        model, make_loader(data.train, 32, shuffle=True), optimizer, TrainSettings(epochs=2, device=device)
    )
    after = task.evaluate(model, test_loader, device)["accuracy"]
    assert result.steps == 2 * int(np.ceil(len(data.train) / 32))
    assert after > before + 0.5


def test_user_task_by_module_path(monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    task = load_task("tasks_fixture:TinyTask")
    assert task.name == "tiny" and len(task.load_data(0).train) == 100


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "imagenet",
            "unknown task 'imagenet' (choose one of digits, fashion-mnist, fashion-mnist-scatter, mnist1d, "
            "mnist1d-large",
        ),
        ("no_such_module:Task", "task 'no_such_module:Task': cannot import module 'no_such_module'"),
        ("tasks_fixture:Missing", "module 'tasks_fixture' has no attribute 'Missing'"),
        ("tasks_fixture:NOT_A_TASK", "task 'tasks_fixture:NOT_A_TASK' is int, not a Task"),
    ],
)
def test_bad_task_names_are_clear(name, message, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    with pytest.raises(TaskError) as info:
        load_task(name)
    assert message in str(info.value)


def test_missing_dataset_package_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # makes `import mnist1d` raise ImportError
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(
        MissingPackageError, match=r"missing package 'mnist1d' needed for task 'mnist1d' \(pip install mnist1d\)"
    ):
        load_task("mnist1d").load_data(seed=0)
