"""Claimed epsilon vs empirically audited epsilon, with a broken-mechanism control. Delta 1e-5.

    python benchmarks/empirical_audit.py [--epsilons 1 3 8] [--canaries 1000] [--task digits]

Sample level (Steinke, Nasr, Jagielski, NeurIPS 2023, one training run). Black-box: fedvault's
PrivateTrainer trains one model on the task's training pool plus input-space canaries, each
included with probability 1/2, scored on the final model. White-box: the same trainer on the
training pool alone, with gradient canaries (each included with probability 1/2, Poisson-sampled
every step, adding C times a unit direction to the clipped sum before the noise), scored by the sum
over all steps of the released noisy sum's component along the canary. The audited value is a
95 %-confidence LOWER BOUND on epsilon (Bonferroni-corrected over the swept guess counts); the
ceiling is the bound if every guess were right, the most m canaries can show. Client level (Andrew et al., ICLR 2024,
one-shot): DP-FedAvg (fedvault's DPFedAvgAggregator) over simulated honest clients plus canary
clients; the audited value is an ESTIMATE (Gaussian fits to canary cosines), not a bound.

The broken control trains with no noise (and, black-box, no clipping) but still claims the
target epsilon: a working audit flags it (audited > claim). Black-box it uses
--broken-epochs/--broken-lr, suited to unclipped gradients; white-box it runs once per
--wb-broken-canaries count. Writes benchmarks/results/empirical_audit.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

from sweep import write_results

from fedvault.privacy.empirical_audit import audit_dp_fedavg, audit_dp_sgd, audit_dp_sgd_white_box, one_run_ceiling

DELTA = 1e-5


def sample_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    runs = [(eps, False) for eps in args.epsilons] + [(eps, True) for eps in args.broken_epsilons]
    for eps, broken in runs:
        start = time.perf_counter()
        audit = audit_dp_sgd(
            args.task,
            target_epsilon=eps,
            delta=DELTA,
            num_canaries=args.canaries,
            canary=args.canary,
            epochs=args.broken_epochs if broken else args.epochs,
            learning_rate=args.broken_lr if broken else args.lr,
            batch_size=args.batch_size,
            broken_mechanism_for_testing=broken,
        )
        row = {"level": "sample", "method": "one-run lower bound (95 %), black-box", **audit.to_dict()}
        row["audited"] = audit.epsilon_lower_bound
        row["ceiling"] = one_run_ceiling(args.canaries, delta=DELTA)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def white_box_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Correct runs per (canary count, claim); the broken control once per canary count, its bound (which
    does not depend on the claim: noise 0 whatever is claimed) compared with every claim."""
    rows = []
    runs = [(m, [eps], False) for m in args.wb_canaries for eps in args.epsilons]
    runs += [(m, list(args.broken_epsilons), True) for m in args.wb_broken_canaries]
    for m, claims, broken in runs:
        start = time.perf_counter()
        audit = audit_dp_sgd_white_box(
            args.task,
            target_epsilon=claims[0],
            delta=DELTA,
            num_canaries=m,
            canary_gradient=args.wb_kind,
            epochs=args.epochs,
            learning_rate=args.lr,
            batch_size=args.batch_size,
            broken_mechanism_for_testing=broken,
        )
        seconds = time.perf_counter() - start
        for eps in claims:
            claimed = dataclasses.replace(audit, claimed_epsilon=eps)
            row = {"level": "sample", "method": "one-run lower bound (95 %), white-box", **claimed.to_dict()}
            row["audited"] = audit.epsilon_lower_bound
            row["ceiling"] = audit.details["ceiling"] if audit.details else None
            row["seconds"] = seconds
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def client_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    runs = [(eps, stat, False) for eps in args.epsilons for stat in ("final", "max-round")]
    runs += [(eps, "final", True) for eps in args.broken_epsilons]
    for eps, statistic, broken in runs:
        start = time.perf_counter()
        estimate = audit_dp_fedavg(
            target_epsilon=eps,
            delta=DELTA,
            rounds=args.client_rounds,
            canary_clients=args.canary_clients,
            null_directions=args.null_directions,
            dim=args.dim,
            statistic=statistic,  # type: ignore[arg-type]
            broken_mechanism_for_testing=broken,
        )
        row = {"level": "client", "method": f"one-shot estimate ({statistic})", **estimate.to_dict()}
        row["audited"] = estimate.epsilon_estimate
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _mechanism(row: dict[str, Any]) -> str:
    return str(row["details"]["mechanism"])


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['level']} {_mechanism(row)} claim {row['claimed_epsilon']:g}: audited {row['audited']:.3f} "
        f"({row['method']}, {row['canaries']} canaries), flagged {row['flagged']}, {row['seconds']:.0f} s"
    )


def to_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, wall: float) -> str:
    lines = [
        "## Empirical privacy audit: claimed vs audited epsilon (delta 1e-5)",
        "",
        f"Sample level: task {args.task}, {args.canaries} '{args.canary}' canaries (each in with prob. 1/2), "
        f"DP-SGD via PrivateTrainer, {args.epochs} epochs, lr {args.lr}, batch {args.batch_size}, clip 1.0; "
        f"broken control {args.broken_epochs} epochs, lr {args.broken_lr}. Audited = Steinke et al. one-run "
        "lower bound at 95 % confidence, Bonferroni over the swept (k+, k-); black-box: last model only, "
        f"log-probability scores; white-box: {args.wb_kind} gradient canaries of norm C in the DPOptimizer's "
        f"clipped sum (same {args.epochs} epochs, lr, batch; {' or '.join(map(str, args.wb_canaries))} canaries; "
        "broken control: one run per canary count, "
        f"{' or '.join(map(str, args.wb_broken_canaries))}, noise 0 with clipping), score = sum over all steps of "
        "the noisy sum's component along the canary. Ceiling = the bound if every guess were right. "
        f"Client level: DP-FedAvg, {args.client_rounds} rounds, 200 honest + {args.canary_clients} canary "
        f"clients, q = 0.1, dim {args.dim}, {args.null_directions} null directions; "
        "audited = Andrew et al. one-shot estimate (not a bound). Flagged = audited > claim.",
        "",
        "| level | mechanism | method | claimed eps | audited eps | canaries | ceiling | guesses | correct | "
        "(k+, k-) | uncorrected best | flagged | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sample = r["level"] == "sample"
        lines.append(
            f"| {r['level']} | {_mechanism(r)} | {r['method']} | {r['claimed_epsilon']:g} | {r['audited']:.3f} | "
            f"{r['canaries']} | {r['ceiling']:.3f} | {r['guesses']} | {r['correct']} | "
            f"{(r['k_plus'], r['k_minus'])} | "
            f"{r['uncorrected_best']:.3f} | {r['flagged']} | {r['seconds']:.0f} |"
            if sample
            else f"| {r['level']} | {_mechanism(r)} | {r['method']} | {r['claimed_epsilon']:g} | {r['audited']:.3f} | "
            f"{r['canaries']} | - | - | - | - | - | {r['flagged']} | {r['seconds']:.0f} |"
        )
    correct = [r for r in rows if "broken" not in _mechanism(r)]
    broken = [r for r in rows if "broken" in _mechanism(r)]
    lines += [
        "",
        f"- correct mechanisms above their claim: {sum(r['flagged'] for r in correct)} of {len(correct)} "
        "(sample-level bounds are valid at 95 %; client-level values are estimates)",
        f"- broken controls flagged: {sum(r['flagged'] for r in broken)} of {len(broken)}",
        "- claims above the ceiling (no one-run audit with that many canaries can refute them at delta 1e-5): "
        + (
            ", ".join(
                f"{r['claimed_epsilon']:g} ({r['method'].split(', ')[-1]}, m={r['canaries']}, "
                f"ceiling {r['ceiling']:.2f})"
                for r in broken
                if r.get("ceiling") is not None and r["claimed_epsilon"] >= r["ceiling"]
            )
            or "none"
        ),
        f"- wall time: {wall:.0f} s",
    ]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict[str, Any]]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        white = r["method"].endswith("white-box")
        label = f"{r['level']}: {r['method']}" + (
            f" [broken control, m={r['canaries']}]"
            if "broken" in _mechanism(r)
            else f" [m={r['canaries']}]"
            if white
            else ""
        )
        series.setdefault(label, []).append((r["claimed_epsilon"], min(r["audited"], 50.0)))
    for label, points in series.items():
        points.sort()
        broken = "broken" in label
        ax.plot(*zip(*points), marker="x" if broken else "o", linestyle=":" if broken else "-", label=label)
    top = max(r["claimed_epsilon"] for r in rows)
    line = [top * i / 100 for i in range(101)]
    ax.plot(line, line, color="grey", linestyle="--", label="audited = claimed")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("claimed epsilon (delta 1e-5)")
    ax.set_ylabel("audited epsilon (bound / estimate; capped at 50)")
    ax.set_title("Empirical privacy audit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0], help="claims audited")
    parser.add_argument(
        "--broken-epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0], help="claims of the broken control"
    )
    parser.add_argument("--task", default="digits", help="built-in task for the sample-level audit")
    parser.add_argument("--canaries", type=int, default=1000, help="sample-level canaries m")
    parser.add_argument("--canary", choices=["noise", "mislabeled"], default="noise", help="canary kind")
    parser.add_argument("--epochs", type=int, default=30, help="DP-SGD epochs")
    parser.add_argument("--lr", type=float, default=2.0, help="DP-SGD learning rate (clipped gradients)")
    parser.add_argument("--batch-size", type=int, default=256, help="expected Poisson batch size")
    parser.add_argument("--broken-epochs", type=int, default=60, help="epochs of the broken control")
    parser.add_argument("--broken-lr", type=float, default=0.5, help="lr of the broken control (unclipped)")
    parser.add_argument(
        "--wb-canaries", type=int, nargs="+", default=[1000, 4000], help="white-box gradient canaries, correct runs"
    )
    parser.add_argument(
        "--wb-broken-canaries", type=int, nargs="+", default=[1000, 4000], help="white-box canaries, broken control"
    )
    parser.add_argument("--wb-kind", choices=["dirac", "gaussian"], default="dirac", help="gradient canary kind")
    parser.add_argument("--skip-white-box", action="store_true", help="no white-box rows")
    parser.add_argument("--client-rounds", type=int, default=50, help="DP-FedAvg rounds")
    parser.add_argument("--canary-clients", type=int, default=1000, help="client-level canary clients")
    parser.add_argument(
        "--null-directions", type=int, default=4000, help="never-inserted directions (the null cosines)"
    )
    parser.add_argument("--dim", type=int, default=20_000, help="model parameters (client level)")
    parser.add_argument("--skip-client", action="store_true", help="sample level only")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = sample_rows(args) + ([] if args.skip_white_box else white_box_rows(args))
    rows += [] if args.skip_client else client_rows(args)
    text = to_markdown(rows, args, time.perf_counter() - start)
    print(text)
    write_results("empirical_audit", {"args": vars(args), "delta": DELTA, "rows": rows}, text, figure(rows))


if __name__ == "__main__":
    main()
