"""FedAvg vs FedProx vs SCAFFOLD vs FedNova on label-skewed digits: a sequential reference run.

No Flower engine: one process plays every client in turn, through the same code a fedvault
client and server run -- the digits task's model and trainer (``SupervisedTask.train`` with
strategy hooks from :func:`fedvault.client.strategy_hooks.build_hooks`), and the server updates
:func:`flwr...strategy_utils.aggregate_arrayrecords` (FedAvg, FedProx),
:func:`fedvault.strategies.scaffold.scaffold_server_update` and
:func:`fedvault.strategies.fednova.fednova_update`.

Setup: sklearn digits (1,347 train / 450 test), ``--clients`` clients from a Dirichlet(``--alpha``)
label split (every client's whole partition is its training set), all clients every round,
``--epochs`` local epochs of SGD (batch ``--batch-size``, lr ``--lr``, momentum ``--momentum``), so
clients with more data take more local steps -- the heterogeneity FedNova targets. Accuracy is
the global model's on the held-out test set, averaged over ``--seeds`` seeds (partition and init).

    python benchmarks/non_iid_strategies.py [--rounds 30] [--seeds 3] [--alpha 0.1]

Writes benchmarks/results/non_iid_strategies.md and .json (atomically) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedvault.client.strategy_hooks import build_hooks, finish_hooks
from fedvault.partition import partition
from fedvault.strategies.arrays import float_keys, to_ndarrays, to_record
from fedvault.strategies.fednova import A_NORM_KEY, CONFIG_FLAG as FEDNOVA_FLAG, fednova_update
from fedvault.strategies.scaffold import CLIENT_DELTA_KEY, SERVER_CONTROL_KEY, scaffold_server_update
from fedvault.tasks import TrainSettings, make_loader
from fedvault.tasks.digits import DigitsTask

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("fedavg", "fedprox", "scaffold", "fednova")


def run(strategy: str, seed: int, args: argparse.Namespace) -> list[float]:
    """Test accuracy of the global model after each round."""
    task = DigitsTask()
    data = task.load_data(seed)
    parts = partition(data.train.y, args.clients, "dirichlet", seed, alpha=args.alpha)
    loaders = [make_loader(data.train.subset(idx), args.batch_size, shuffle=True, seed=seed + i) for i, idx in enumerate(parts)]
    test_loader = make_loader(data.test, 512, shuffle=False)
    torch.manual_seed(seed)
    model = task.build_model()
    x = to_ndarrays(ArrayRecord(model.state_dict()))
    dtypes = dict(x)  # server math runs in float64; what is sent keeps the model's dtypes
    control = {key: np.zeros_like(x[key], np.float64) for key in float_keys(x)}
    node_states = [RecordDict() for _ in parts]
    config = {"momentum": args.momentum}
    if strategy == "fedprox":
        config["proximal-mu"] = args.mu
    if strategy == "fednova":
        config[FEDNOVA_FLAG] = True

    accuracy = []
    for _ in range(args.rounds):
        content = RecordDict({"arrays": to_record(x, like=dtypes), "config": ConfigRecord(config)})
        if strategy == "scaffold":
            content[SERVER_CONTROL_KEY] = to_record(control, like=dtypes)
        replies = [train_client(task, model, content, state, loader, args) for state, loader in zip(node_states, loaders)]
        x, control = SERVER_UPDATES[strategy](x, control, replies)
        model.load_state_dict(to_record(x, like=dtypes).to_torch_state_dict())
        accuracy.append(task.evaluate(model, test_loader, torch.device("cpu"))["accuracy"])
    return accuracy


def train_client(task: DigitsTask, model: torch.nn.Module, content: RecordDict, state: RecordDict, loader, args) -> RecordDict:
    """What a fedvault client does with a train message; returns its reply content."""
    model.load_state_dict(content["arrays"].to_torch_state_dict())
    hooks = build_hooks(content, state, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    result = task.train(model, loader, optimizer, TrainSettings(epochs=args.epochs, device=torch.device("cpu"), hooks=hooks))
    steps = int(result["steps"])
    records, metrics = finish_hooks(hooks, model, steps, args.lr)
    metrics = MetricRecord({"num-examples": len(loader.dataset), **metrics})
    return RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics, **records})


def _fedavg(x, control, replies):
    return to_ndarrays(aggregate_arrayrecords(replies, "num-examples")), control


def _scaffold(x, control, replies):
    models = [to_ndarrays(r["arrays"]) for r in replies]
    deltas = [to_ndarrays(r[CLIENT_DELTA_KEY]) for r in replies]
    return scaffold_server_update(x, control, models, deltas, num_clients=len(replies))


def _fednova(x, control, replies):
    models = [to_ndarrays(r["arrays"]) for r in replies]
    weights = [float(r["metrics"]["num-examples"]) for r in replies]
    a_norms = [float(r["metrics"][A_NORM_KEY]) for r in replies]
    return fednova_update(x, models, weights, a_norms), control


SERVER_UPDATES: dict[str, Callable] = {"fedavg": _fedavg, "fedprox": _fedavg, "scaffold": _scaffold, "fednova": _fednova}


def table(mean: dict[str, np.ndarray], std: dict[str, np.ndarray], every: int) -> str:
    header = "| round | " + " | ".join(STRATEGIES) + " |\n|---:|" + "---:|" * len(STRATEGIES)
    rounds = len(next(iter(mean.values())))
    shown = sorted({*range(every - 1, rounds, every), 0, rounds - 1})
    rows = [f"| {r + 1} | " + " | ".join(f"{mean[s][r]:.3f} ± {std[s][r]:.3f}" for s in STRATEGIES) + " |" for r in shown]
    last5 = "| mean of last 5 | " + " | ".join(f"{mean[s][-5:].mean():.3f}" for s in STRATEGIES) + " |"
    return "\n".join([header, *rows, last5])


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx proximal-mu")
    parser.add_argument("--every", type=int, default=5, help="print every N-th round")
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    curves = {s: np.array([run(s, seed, args) for seed in range(args.seeds)]) for s in STRATEGIES}
    mean = {s: c.mean(axis=0) for s, c in curves.items()}
    std = {s: c.std(axis=0) for s, c in curves.items()}
    seconds = time.perf_counter() - start
    settings = vars(args)
    md = (
        f"# Non-IID strategies: test accuracy on digits, Dirichlet({args.alpha}), {args.clients} clients\n\n"
        f"Mean ± std over {args.seeds} seeds; settings {settings}; {seconds:.0f} s on CPU.\n\n"
        + table(mean, std, args.every)
        + "\n"
    )
    write_atomic(RESULTS / "non_iid_strategies.md", md)
    write_atomic(
        RESULTS / "non_iid_strategies.json",
        json.dumps({"settings": settings, "seconds": seconds, "accuracy": {s: c.tolist() for s, c in curves.items()}}, indent=1),
    )
    print(md)


if __name__ == "__main__":
    main()
