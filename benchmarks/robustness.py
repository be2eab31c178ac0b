"""Robust aggregation under sign-flip attackers: mnist1d, 20 clients, final accuracy of FedAvg,
FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan with 0/10/20/30 % attackers.

    python benchmarks/robustness.py [--rounds 10] [--fractions 0 0.1 0.2 0.3]

Sample-level DP is off here (robust aggregation is what is measured). Krum-family strategies are
told the number of attackers they must tolerate (at least 1). Writes
benchmarks/results/robustness.{json,md,png}.
"""

from __future__ import annotations

import argparse

from sweep import base_settings, line_plot, simulate, write_results

STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
CLIENTS = 20


def strategy_settings(name: str, attackers: int) -> list[str]:
    f = max(1, attackers)
    extra = {
        "krum": [f"strategy.num-malicious-nodes={f}"],
        "multikrum": [f"strategy.num-malicious-nodes={f}", f"strategy.num-nodes-to-select={CLIENTS - 2 * f}"],
        "bulyan": [f"strategy.num-malicious-nodes={min(f, (CLIENTS - 3) // 4)}"],
        "fedtrimmedavg": ["strategy.beta=0.3"],
    }
    return [f"strategy.name={name}", *extra.get(name, [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    args = parser.parse_args()
    base = [
        *base_settings("mnist1d", CLIENTS, args.rounds),
        "privacy.sample-level=false",
        "attack.kind=sign-flip",
        "attack.scale=1.0",
    ]
    results: dict[str, dict[str, float]] = {}
    for name in STRATEGIES:
        for fraction in args.fractions:
            attackers = round(fraction * CLIENTS)
            s = simulate(base + [f"attack.fraction={fraction}"] + strategy_settings(name, attackers))
            results.setdefault(name, {})[f"{fraction:g}"] = s["final_accuracy"]
            print(name, fraction, s["final_accuracy"], flush=True)
    header = "| strategy | " + " | ".join(f"{100 * f:.0f}% attackers" for f in args.fractions) + " |"
    lines = [header, "|---" * (len(args.fractions) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[f'{f:g}']:.4f}" for f in args.fractions) + " |")
    text = (
        f"## Robustness to sign-flip attackers: mnist1d, {CLIENTS} clients, {args.rounds} rounds\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print(text)
    fig = line_plot(
        {
            name: ([100 * f for f in args.fractions], [row[f"{f:g}"] for f in args.fractions])
            for name, row in results.items()
        },
        "% sign-flip attackers",
        "final centralized accuracy",
    )
    write_results("robustness", results, text, fig)


if __name__ == "__main__":
    main()
