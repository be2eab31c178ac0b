"""Drive strategies with real Flower Messages and clients that train a torch model through hooks.

Used by the strategy tests (imported as a plain module: tests/ is on sys.path under pytest).
Building instruction Messages needs Flower's task identity: use the ``flower_task_identity``
fixture from conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedvault.strategies.client_steps import build_client_steps as build_hooks
from fedvault.strategies.client_steps import finish_client_steps as finish_hooks


class StaticGrid(Grid):
    """A Grid whose connected nodes are a fixed list; it never sends anything itself."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError


class InstantGrid(StaticGrid):
    """A transport (not an engine) whose nodes answer at once through ``answer(msg)``; a reply of a
    node in ``held`` waits until ``release()``, as a reply that misses its round's timeout does."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        super().__init__(node_ids)
        self.held: set[int] = set()
        self._ids = iter(range(10**9))
        self._outbox: dict[str, Message] = {}
        self._late: dict[str, Message] = {}

    def answer(self, msg: Message) -> Message:
        raise NotImplementedError

    def release(self) -> None:
        self._outbox.update(self._late)
        self._late.clear()

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = message_id = f"ins-{next(self._ids)}"
            box = self._late if msg.metadata.dst_node_id in self.held else self._outbox
            box[message_id] = self.answer(msg)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._outbox.pop(i) for i in list(message_ids) if i in self._outbox]


@dataclass
class FakeClient:
    """One node: its data, how many local steps it takes, and its persistent node state."""

    x: torch.Tensor
    y: torch.Tensor
    steps: int
    lr: float
    state: RecordDict = field(default_factory=RecordDict)


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def random_clients(num: int, steps: int = 3, lr: float = 0.1, seed: int = 0) -> dict[int, FakeClient]:
    gen = torch.Generator().manual_seed(seed)
    return {
        node: FakeClient(
            torch.randn(8 + node, 4, generator=gen), torch.randint(0, 3, (8 + node,), generator=gen), steps, lr
        )
        for node in range(1, num + 1)
    }


def train_locally(model: torch.nn.Module, hooks, client: FakeClient, criterion, momentum: float = 0.0) -> float:
    """The lead's trainer loop (full-batch SGD); returns the last batch loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=client.lr, momentum=momentum)
    loss = torch.tensor(0.0)
    for _ in range(client.steps):
        optimizer.zero_grad()
        loss = criterion(model(client.x), client.y)
        loss.backward()
        for hook in hooks:
            hook.after_backward(model)
        optimizer.step()
    return loss.item()


def client_reply(msg: Message, client: FakeClient, model: torch.nn.Module, criterion) -> Message:
    """What fedvault's ClientApp does with a train message, minus data loading."""
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    hooks = build_hooks(msg.content, client.state, model)
    loss = train_locally(model, hooks, client, criterion)
    records, extra_metrics = finish_hooks(hooks, model, client.steps, client.lr)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(client.y), **extra_metrics})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics, **records})
    return Message(content, reply_to=msg)


def run_round(
    strategy: Strategy,
    arrays: ArrayRecord,
    clients: dict[int, FakeClient],
    model: torch.nn.Module,
    criterion=torch.nn.functional.cross_entropy,
    server_round: int = 1,
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """configure_train -> every sampled client trains and replies -> aggregate_train."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), StaticGrid(clients)))
    replies = [client_reply(msg, clients[msg.metadata.dst_node_id], model, criterion) for msg in messages]
    return strategy.aggregate_train(server_round, replies)
