"""FedAvg vs FedProx vs SCAFFOLD vs FedNova on label-skewed digits, through `fedvault simulate`.

Every run is a real simulation (Flower's Simulation Engine, fedvault's ServerApp and ClientApp):
``--clients`` clients from a Dirichlet(``--alpha``) label split, all of them every round,
``--epochs`` local epochs of SGD (batch ``--batch-size``, lr ``--lr``, momentum ``--momentum``), so
clients with more data take more local steps -- the heterogeneity FedNova targets. Accuracy is
the global model's on the held-out test set after each round, averaged over ``--seeds`` seeds
(partition and initial model). Sample-level DP is off: the strategies are what is compared.

    python benchmarks/non_iid_strategies.py [--rounds 30] [--seeds 3] [--alpha 0.1]

Writes benchmarks/results/non_iid_strategies.{md,json,png} and prints the table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sweep import line_plot, simulate, write_results

STRATEGIES = ("fedavg", "fedprox", "scaffold", "fednova")


def settings(strategy: str, seed: int, args: argparse.Namespace) -> list[str]:
    common = [
        "task=digits",
        f"num-clients={args.clients}",
        f"num-server-rounds={args.rounds}",
        "partitioner=dirichlet",
        f"dirichlet-alpha={args.alpha}",
        f"local-epochs={args.epochs}",
        f"batch-size={args.batch_size}",
        f"learning-rate={args.lr}",
        f"momentum={args.momentum}",
        f"seed={seed}",
        "fraction-evaluate=0.0",
        "test-fraction=0.05",
        "privacy.sample-level=false",
        f"strategy.name={strategy}",
    ]
    return common + ([f"strategy.proximal-mu={args.mu}"] if strategy == "fedprox" else [])


def table(mean: dict[str, np.ndarray], std: dict[str, np.ndarray], every: int) -> str:
    header = "| round | " + " | ".join(STRATEGIES) + " |\n|---:|" + "---:|" * len(STRATEGIES)
    rounds = len(next(iter(mean.values())))  # index 0 is round 0 (the initial model)
    shown = sorted({*range(every, rounds, every), 1, rounds - 1})
    rows = [f"| {r} | " + " | ".join(f"{mean[s][r]:.3f} ± {std[s][r]:.3f}" for s in STRATEGIES) + " |" for r in shown]
    last5 = "| mean of last 5 | " + " | ".join(f"{mean[s][-5:].mean():.3f}" for s in STRATEGIES) + " |"
    return "\n".join([header, *rows, last5])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx proximal-mu")
    parser.add_argument("--every", type=int, default=5, help="show every N-th round in the table")
    args = parser.parse_args()

    start = time.perf_counter()
    curves: dict[str, np.ndarray] = {}
    for strategy in STRATEGIES:
        runs = []
        for seed in range(args.seeds):
            runs.append(simulate(settings(strategy, seed, args))["accuracy_curve"])
            print(f"{strategy} seed {seed}: final accuracy {runs[-1][-1]:.3f}", flush=True)
        curves[strategy] = np.array(runs)
    mean = {s: c.mean(axis=0) for s, c in curves.items()}
    std = {s: c.std(axis=0) for s, c in curves.items()}
    seconds = time.perf_counter() - start
    md = (
        f"# Non-IID strategies: test accuracy on digits, Dirichlet({args.alpha}), {args.clients} clients\n\n"
        f"`fedvault simulate` runs; mean ± std over {args.seeds} seeds; settings {vars(args)}; "
        f"{seconds:.0f} s on CPU.\n\n" + table(mean, std, args.every) + "\n"
    )
    rounds = list(range(args.rounds + 1))
    fig = line_plot(
        {s: (rounds, list(m)) for s, m in mean.items()},
        "round",
        "test accuracy (mean over seeds)",
        f"digits, Dirichlet({args.alpha}), {args.clients} clients",
    )
    write_results(
        "non_iid_strategies",
        {"settings": vars(args), "seconds": seconds, "accuracy": {s: c.tolist() for s, c in curves.items()}},
        md,
        fig,
    )
    print(md)


if __name__ == "__main__":
    main()
