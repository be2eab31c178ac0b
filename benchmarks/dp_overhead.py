"""Local step time of each built-in model: plain SGD vs DP-SGD (Opacus' hooks, functorch, ghost, ew; fedvault's
book-keeping bk) and "auto".

One process, one run: the modes are interleaved within every repetition (so machine load
hits them alike) and the median seconds per step is reported, with ratios to plain SGD. A step
is zero_grad + forward + loss + backward + optimizer step on a fixed batch of ``--batch-size``
synthetic examples (for DP: per-example clipping and Gaussian noise, σ = C = 1). "auto" is
:func:`fedvault.privacy.dp_sgd.auto_grad_sample_mode` run as a client would run it (its own,
shorter measurement); the report says whether the mode it picked is within 5% of the faster
mode in this benchmark's own measurement.

    python benchmarks/dp_overhead.py [--batch-size 256] [--reps 15] [--steps 20] [--device cpu] [--name dp_overhead]

Writes benchmarks/results/NAME.json and .md (atomically). The main job's clients hold 10,000
examples each, so their auto batch is 1,000: ``--batch-size 1000 --name dp_overhead_b1000``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import warnings
from pathlib import Path

import opacus
import torch
from sweep import RESULTS, write_results
from torch import nn

from fedvault.privacy.dp_sgd import (
    AUTO_MODES_WITH_LOSS_CLIPPING,
    GRAD_SAMPLE_MODES,
    auto_grad_sample_mode,
    dp_compatible,
    measure_step_times,
)
from fedvault.tasks.digits import DigitsTask
from fedvault.tasks.fashion_mnist import FashionMnistTask
from fedvault.tasks.fashion_mnist_scatter import CHANNELS, SIDE, FashionMnistScatterTask
from fedvault.tasks.mnist1d import Mnist1dTask

DEFAULT_MODEL = "mnist1d"  # the model of the default task (mnist1d-large uses the same CNN)
#: P3: DP step <= 1.5x plain on the main job's model and Fashion-MNIST's (the CNN and the ScatterNet + linear)
TARGET_MODELS = ("mnist1d", "fashion-mnist", "fashion-mnist-scatter")
TARGET_RATIO = 1.5
MODELS = {  # name -> (model factory, input shape of one example)
    "mnist1d": (lambda: Mnist1dTask().build_model(), (1, 40)),
    "digits": (lambda: DigitsTask().build_model(), (64,)),
    "fashion-mnist": (lambda: FashionMnistTask().build_model(), (1, 28, 28)),
    "fashion-mnist-scatter": (lambda: FashionMnistScatterTask().build_model(), (CHANNELS, SIDE, SIDE)),
}
MODES = ("plain", *GRAD_SAMPLE_MODES)


def bench_model(name: str, batch_size: int, reps: int, steps: int, device: torch.device) -> dict:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = dp_compatible(factory())
    batch = (torch.randn(batch_size, *shape, device=device), torch.randint(0, 10, (batch_size,), device=device))
    criterion = nn.CrossEntropyLoss()
    times = measure_step_times(model, batch, criterion, device, MODES, reps=reps, steps=steps, warmup=3)
    median = {mode: statistics.median(values) for mode, values in times.items()}
    choice = auto_grad_sample_mode(
        model, batch, criterion, device, AUTO_MODES_WITH_LOSS_CLIPPING
    )  # built-in tasks' loop
    fastest = min(median[mode] for mode in GRAD_SAMPLE_MODES)
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "ms_per_step": {mode: 1000 * t for mode, t in median.items()},
        "ms_per_step_min_max": {mode: [1000 * min(v), 1000 * max(v)] for mode, v in times.items()},
        "ratio_vs_plain": {mode: median[mode] / median["plain"] for mode in MODES},
        "auto_choice": choice.mode,
        "auto_measured_ms": {mode: 1000 * t for mode, t in choice.seconds_per_step.items()},
        "auto_vs_fastest": median[choice.mode] / fastest,
        "auto_within_5pct": median[choice.mode] <= 1.05 * fastest,
    }


def rss_growth_mib(rounds: int = 8) -> float:
    """Resident-memory growth from round 2 to round ``rounds`` of one reused PrivateTrainer (the
    engine is built once: memory should stay flat). Linux /proc only."""
    from torch.utils.data import DataLoader, TensorDataset

    from fedvault.privacy.dp_sgd import PrivateTrainer
    from fedvault.tasks import SupervisedTask

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    class Task(SupervisedTask):
        name = "bench"

    factory, shape = MODELS[DEFAULT_MODEL]
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(512, *shape), torch.randint(0, 10, (512,)))
    trainer = PrivateTrainer(
        factory(),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        DataLoader(data, batch_size=32),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        criterion=nn.CrossEntropyLoss(),
    )
    sizes = []
    for _ in range(rounds):
        trainer.train(Task(), 1)
        sizes.append(rss())
    trainer.close()
    return (sizes[-1] - sizes[1]) / 2**20


def to_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# DP-SGD step overhead",
        "",
        f"Device {env['device']}, {env['threads']} torch threads, torch {env['torch']}, opacus {env['opacus']}; "
        f"batch {report['batch_size']}, median of {report['reps']} interleaved repetitions x {report['steps']} steps.",
        "",
        "| model | params | plain ms | "
        + " | ".join(f"{m} ms (x plain)" for m in GRAD_SAMPLE_MODES)
        + " | auto picks | auto / fastest |",
        "|---|---|---|" + "---|" * len(GRAD_SAMPLE_MODES) + "---|---|",
    ]
    for r in report["models"]:
        ms, ratio = r["ms_per_step"], r["ratio_vs_plain"]
        modes = " | ".join(f"{ms[m]:.2f} ({ratio[m]:.2f}x)" for m in GRAD_SAMPLE_MODES)
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {ms['plain']:.2f} | {modes} | {r['auto_choice']} | "
            f"{r['auto_vs_fastest']:.3f} ({'within' if r['auto_within_5pct'] else 'NOT within'} 5%) |"
        )
    s = report["summary"]
    lines += [
        "",
        *(
            f"{model}: DP step with the auto-picked mode = {ratio:.2f}x plain "
            f"(target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'NOT met'})."
            for model, ratio in s["dp_cost_vs_plain"].items()
        ),
        f"Resident memory of one reused PrivateTrainer grew {s['rss_growth_mib_rounds_2_to_8']:.1f} MiB "
        "from round 2 to round 8 (flat: the Opacus engine is built once).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256, help="examples per (physical) step")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions per mode")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repetition")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for NAME.json and .md")
    parser.add_argument("--name", default="dp_overhead", help="result file name (without extension)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    device = torch.device(args.device)

    results = [bench_model(name, args.batch_size, args.reps, args.steps, device) for name in MODELS]
    dp_cost = {
        r["model"]: r["ms_per_step"][r["auto_choice"]] / r["ms_per_step"]["plain"]
        for r in results
        if r["model"] in TARGET_MODELS
    }
    cpu = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    report = {
        "environment": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "opacus": opacus.__version__,
        },
        "batch_size": args.batch_size,
        "reps": args.reps,
        "steps": args.steps,
        "models": results,
        "summary": {
            "dp_cost_vs_plain": dp_cost,
            "within_target": {model: ratio <= TARGET_RATIO for model, ratio in dp_cost.items()},
            "auto_within_5pct_all": all(r["auto_within_5pct"] for r in results),
            "rss_growth_mib_rounds_2_to_8": rss_growth_mib(),
        },
    }
    markdown = to_markdown(report)
    write_results(args.name, report, markdown, out=args.out)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
