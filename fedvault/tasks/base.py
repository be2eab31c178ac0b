"""The Task protocol (data, model, local training, evaluation) and a supervised base class.

A task owns what is specific to a learning problem. fedvault owns what is specific to
federation: partitioning, the optimizer, privacy wrapping, devices and transport. The client
builds the model, data loader and optimizer (so Opacus can wrap them) and hands them to
``Task.train``; the server calls ``Task.evaluate`` on the held-out test set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
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
    gradients in place after each backward pass, before the optimizer step."""

    def after_backward(self, model: nn.Module) -> None: ...


@dataclass
class TrainSettings:
    """How one round of local training runs."""

    epochs: int
    device: torch.device
    amp: bool = False
    hooks: Sequence[TrainingHook] = field(default_factory=tuple)


@runtime_checkable
class Task(Protocol):
    """What fedvault needs from a learning problem."""

    name: str

    def load_data(self, seed: int) -> TaskData:
        """Load the whole dataset from local files or installed packages (never the network)."""

    def build_model(self) -> nn.Module:
        """A freshly initialised model (call ``torch.manual_seed`` first for determinism)."""

    def train(self, model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, settings: TrainSettings) -> dict[str, float]:
        """Local training; returns metrics including ``loss`` and ``steps`` (optimizer steps taken)."""

    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, float]:
        """Metrics including ``loss`` and ``accuracy`` over ``loader``."""


class SupervisedTask:
    """Classification with cross-entropy; subclasses provide ``load_data`` and ``build_model``."""

    name = "supervised"

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def train(self, model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, settings: TrainSettings) -> dict[str, float]:
        device, use_amp = settings.device, settings.amp and settings.device.type == "cuda"
        criterion = self.criterion()
        scaler = torch.amp.GradScaler("cuda") if use_amp else None
        model.train()
        total_loss, seen, steps = 0.0, 0, 0
        for _ in range(settings.epochs):
            for x, y in loader:
                if len(y) == 0:  # Poisson sampling (DP) can draw an empty batch
                    continue
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext():
                    loss = criterion(model(x), y)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                for hook in settings.hooks:
                    hook.after_backward(model)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                total_loss += loss.item() * len(y)
                seen += len(y)
                steps += 1
        return {"loss": total_loss / max(seen, 1), "steps": float(steps)}

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
