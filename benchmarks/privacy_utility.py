"""Privacy vs utility: mnist1d, 20 clients, Dirichlet(0.5), without DP and with sample-level DP at
epsilon 1, 3 and 8 (delta 1e-5), each client's budget spread over the whole run.

    python benchmarks/privacy_utility.py [--rounds 20] [--epsilons 1 3 8]

Writes benchmarks/results/privacy_utility.{json,md,png}. Target: at epsilon 8 within 10 points of
non-private.
"""

from __future__ import annotations

import argparse

from sweep import line_plot, simulate, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    args = parser.parse_args()
    base = [
        "task=mnist1d",
        "num-clients=20",
        f"num-server-rounds={args.rounds}",
        "partitioner=dirichlet",
        f"local-epochs={args.local_epochs}",
        f"batch-size={args.batch_size}",
        f"learning-rate={args.learning_rate}",
        "dirichlet-alpha=0.5",
        "fraction-evaluate=0.0",
        "privacy.target-delta=1e-5",
    ]
    runs = {"non-private": simulate(base + ["privacy.sample-level=false"])}
    for eps in args.epsilons:
        runs[f"epsilon {eps:g}"] = simulate(base + [f"privacy.target-epsilon={eps}"])
    baseline = runs["non-private"]["final_accuracy"]
    lines = ["| setting | final accuracy | points below non-private | max client epsilon (PLD) |", "|---|---|---|---|"]
    for name, s in runs.items():
        eps = max((p["epsilon_pld"] for p in s.get("privacy", {}).get("parties", [])), default=None)
        lines.append(
            f"| {name} | {s['final_accuracy']:.4f} | {100 * (baseline - s['final_accuracy']):.1f} | "
            f"{'-' if eps is None else f'{eps:.3f}'} |"
        )
    eps8 = runs.get("epsilon 8")
    verdict = (
        ""
        if eps8 is None
        else (
            f"\nAt epsilon 8: {100 * (baseline - eps8['final_accuracy']):.1f} points below non-private "
            f"(target <= 10: {'met' if baseline - eps8['final_accuracy'] <= 0.10 else 'NOT met'}).\n"
        )
    )
    text = (
        f"## Privacy vs utility: mnist1d, 20 clients, Dirichlet(0.5), {args.rounds} rounds, "
        f"{args.local_epochs} local epochs, batch {args.batch_size}, lr {args.learning_rate}, delta 1e-5\n\n"
        + "\n".join(lines)
        + "\n"
        + verdict
    )
    print(text)
    fig = line_plot(
        {name: (list(range(len(s["accuracy_curve"]))), s["accuracy_curve"]) for name, s in runs.items()},
        "round",
        "centralized accuracy",
        "mnist1d, 20 clients, Dirichlet(0.5)",
    )
    write_results("privacy_utility", runs, text, fig)


if __name__ == "__main__":
    main()
