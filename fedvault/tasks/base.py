"""The Task protocol (data, model, local training, evaluation) and a supervised base class.

A task owns what is specific to a learning problem. fedvault owns what is specific to
federation: partitioning, the optimizer, privacy wrapping, devices and transport. The client
builds the model, data loader and optimizer, wraps them (strategy client steps always; Opacus
DP-SGD when sample-level DP is on, as ``make_private`` does) and hands them to ``Task.train``:
the same loop runs with DP on and off. The server calls ``Task.evaluate`` on the held-out test set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class ArrayDataset:
    """Features and integer labels as numpy arrays (first axis = samples)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.x[indices], self.y[indices])


@dataclass(frozen=True)
class TaskData:
    """A task's training pool (partitioned across clients) and its held-out test set (server)."""

    train: ArrayDataset
    test: ArrayDataset
    num_classes: int


class TrainingHook(Protocol):
    """Client-side part of a strategy (FedProx term, SCAFFOLD correction, ...): edits the
    gradients in place after each backward pass; the optimizer wrapper calls it inside ``step()``."""

    def after_backward(self, model: nn.Module) -> None: ...


@dataclass(frozen=True)
class TrainSettings:
    """How one round of local training runs.

    ``criterion``, when set, is the loss ``Task.train`` must use instead of its own (DP-SGD with
    ghost clipping hands over Opacus' loss wrapper; the trainer refuses a step without it).
    """

    epochs: int
    device: torch.device
    amp: bool = False
    criterion: Callable[..., torch.Tensor] | None = None


@dataclass(frozen=True)
class TrainResult:
    """One round of local training: mean loss over the examples trained on, optimizer steps taken."""

    loss: float
    steps: int


@runtime_checkable
class Task(Protocol):
    """What fedvault needs from a learning problem."""

    name: str

    def load_data(self, seed: int) -> TaskData:
        """Load the whole dataset from local files or installed packages (never the network)."""

    def build_model(self) -> nn.Module:
        """A freshly initialised model (call ``torch.manual_seed`` first for determinism)."""

    def criterion(self) -> nn.Module:
        """The loss ``train`` minimises, reducing with ``"mean"`` or ``"sum"`` (DP-SGD wraps it for
        ghost clipping and times grad-sample modes with it)."""

    def train(
        self, model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, settings: TrainSettings
    ) -> TrainResult:
        """``settings.epochs`` passes over ``loader``: per batch zero the gradients, backward the loss,
        ``optimizer.step()``. Call ``step`` for every batch the loader yields (the wrappers count on it:
        strategy client steps and DP-SGD's clipping and noise run inside it); use
        ``settings.criterion`` when it is set; autocast on CUDA when ``settings.amp``."""

    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, float]:
        """Metrics including ``loss`` and ``accuracy`` over ``loader``."""


class SupervisedTask:
    """Classification with cross-entropy; subclasses provide ``load_data`` and ``build_model``."""

    name = "supervised"

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def train(
        self, model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, settings: TrainSettings
    ) -> TrainResult:
        device, use_amp = settings.device, settings.amp and settings.device.type == "cuda"
        criterion = settings.criterion or self.criterion()
        scaler = torch.amp.GradScaler("cuda") if use_amp else None
        model.train()
        total_loss, seen, steps = 0.0, 0, 0
        for _ in range(settings.epochs):
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext():
                    loss = criterion(model(x), y)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                total_loss += loss.item() * len(y)
                seen += len(y)
                steps += 1
        return TrainResult(loss=total_loss / seen if seen else math.nan, steps=steps)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, float]:
        criterion = self.criterion()
        model.eval()
        total_loss, correct, seen = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total_loss += criterion(logits, y).item() * len(y)
            correct += (logits.argmax(dim=1) == y).sum().item()
            seen += len(y)
        return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1)}


def make_loader(data: ArrayDataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over in-memory arrays (float32 features, int64 labels)."""
    dataset = torch.utils.data.TensorDataset(
        torch.as_tensor(data.x, dtype=torch.float32), torch.as_tensor(data.y, dtype=torch.int64)
    )
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)
