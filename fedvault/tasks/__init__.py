"""Tasks: the Task protocol, built-in tasks, and loading a task by name."""

from __future__ import annotations

from functools import lru_cache

from fedvault.errors import TaskError
from fedvault.plugins import PluginError, entry_point_names, load_plugin
from fedvault.tasks.base import ArrayDataset, SupervisedTask, Task, TaskData, TrainResult, TrainSettings, make_loader

TASK_GROUP = "fedvault.tasks"

__all__ = [
    "ArrayDataset",
    "SupervisedTask",
    "Task",
    "TaskData",
    "TrainResult",
    "TrainSettings",
    "available_tasks",
    "load_task",
    "load_task_data",
    "make_loader",
]


def available_tasks() -> list[str]:
    """Task names registered in the ``fedvault.tasks`` entry point group (built-ins included)."""
    return entry_point_names(TASK_GROUP)


def load_task(name: str) -> Task:
    """A task instance from a registered name or ``module:attr`` (a Task, or a class/factory making one)."""
    try:
        obj = load_plugin(name, TASK_GROUP)
    except PluginError as exc:
        if ":" in name:
            raise TaskError(f"task '{name}': {exc}") from None
        raise TaskError(
            f"unknown task '{name}' (choose one of {', '.join(available_tasks())}, "
            f"or give 'module:attr', or register it in entry point group '{TASK_GROUP}')"
        ) from None
    task = obj() if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Task)) else obj
    if not isinstance(task, Task):
        raise TaskError(
            f"task '{name}' is {type(task).__name__}, not a Task "
            "(needs name, load_data, build_model, criterion, train, evaluate)"
        )
    return task


@lru_cache(maxsize=4)
def load_task_data(name: str, seed: int) -> TaskData:
    """The task's data, loaded once per process and then served from memory."""
    return load_task(name).load_data(seed)
