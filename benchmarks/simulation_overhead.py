"""What Flower's Simulation Engine costs on top of the training itself.

Measured in one run, same clients, same local work, same rounds:
  (a) ``fedvault simulate`` (Flower Simulation Engine, Ray backend), in a subprocess;
  (b) the same local training as a plain sequential loop in one process (torch's default
      threads): every client trains with fedvault's own task code, the server averages (FedAvg,
      weighted by examples) and evaluates centrally, exactly like the simulation does.
Prints steady-state seconds per round for each (median of rounds 2..N; round 1 carries the
engine start-up, reported separately), their ratio, and peak memory (RSS summed over the process
tree: the driver plus Ray's workers). Writes benchmarks/results/simulation_overhead.{json,md}.

    python benchmarks/simulation_overhead.py                  # 20 clients x 10 rounds of mnist1d
    python benchmarks/simulation_overhead.py --clients 5 --rounds 4 --task digits
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sweep import write_results

from fedvault.config import RunConfig


class TreeRssSampler:
    """Peak of the summed RSS of a process and all its descendants, sampled every 0.1 s."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_bytes = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.1):
            parents, rss = {}, {}
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    statm = Path(f"/proc/{entry}/statm").read_text().split()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2 :].split()
                parents[int(entry)] = int(fields[1])
                rss[int(entry)] = int(statm[1]) * page
            tree, frontier = {self.pid}, [self.pid]
            while frontier:
                parent = frontier.pop()
                children = [p for p, pp in parents.items() if pp == parent and p not in tree]
                tree.update(children)
                frontier.extend(children)
            self.peak_bytes = max(self.peak_bytes, sum(rss.get(p, 0) for p in tree))


def settings(args: argparse.Namespace) -> list[str]:
    return [
        f'task="{args.task}"',
        f"num-clients={args.clients}",
        f"num-server-rounds={args.rounds}",
        f"local-epochs={args.epochs}",
        "batch-size=32",
        "learning-rate=0.05",
        "fraction-train=1.0",
        "fraction-evaluate=0.0",
        f"seed={args.seed}",
        "privacy.sample-level=false",
    ]


def run_simulation(args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "fedvault.cli", "simulate", "--out", str(out)]
    for item in settings(args):
        cmd += ["--set", item]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with TreeRssSampler(proc.pid) as sampler:
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"fedvault simulate failed:\n{err[-2000:]}")
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rounds if r["round"] > 0]
    return {
        "wall_seconds": time.perf_counter() - started,
        "first_round_seconds": trained[0]["seconds"],
        "steady_seconds_per_round": statistics.median(r["seconds"] for r in trained[1:]),
        "final_accuracy": trained[-1]["central"]["accuracy"],
        "peak_rss_mib": sampler.peak_bytes / 2**20,
    }


def run_plain_loop(args: argparse.Namespace) -> dict:
    """Runs in a child process so its memory and imports are measured on their own."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--plain-worker", *sys.argv[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with TreeRssSampler(proc.pid) as sampler:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"plain loop failed:\n{err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(wall_seconds=time.perf_counter() - started, peak_rss_mib=sampler.peak_bytes / 2**20)
    return result


def plain_worker(args: argparse.Namespace) -> None:
    """The same local work as the simulation, sequentially, with no engine in between."""
    import torch

    from fedvault.client.node import DataSelection, client_data
    from fedvault.config import RunConfig
    from fedvault.tasks import TrainSettings, load_task, load_task_data, make_loader

    cfg = RunConfig.from_sources(None, settings(args))
    task = load_task(cfg.task)
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    global_state = task.build_model().state_dict()
    model, central_model = task.build_model(), task.build_model()
    test_loader = make_loader(load_task_data(cfg.task, cfg.seed).test, 512, shuffle=False)
    clients = [
        client_data(DataSelection.from_run(cfg, {"partition-id": i, "num-partitions": cfg.num_clients}))[0]
        for i in range(cfg.num_clients)
    ]
    round_seconds, accuracy = [], 0.0
    for server_round in range(1, cfg.num_server_rounds + 1):
        start = time.perf_counter()
        states, weights = [], []
        for train_data in clients:
            model.load_state_dict(global_state)
            loader = make_loader(train_data, cfg.batch_size, shuffle=True, seed=cfg.seed + server_round)
            optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
            task.train(model, loader, optimizer, TrainSettings(epochs=cfg.local_epochs, device=device))
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(train_data))
        total = sum(weights)
        global_state = {k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in global_state}
        central_model.load_state_dict(global_state)
        accuracy = task.evaluate(central_model, test_loader, device)["accuracy"]
        round_seconds.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "first_round_seconds": round_seconds[0],
                "steady_seconds_per_round": statistics.median(round_seconds[1:]),
                "final_accuracy": accuracy,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mnist1d")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        plain_worker(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        sim = run_simulation(args, Path(tmp) / "run")
    plain = run_plain_loop(args)
    ratio = sim["steady_seconds_per_round"] / plain["steady_seconds_per_round"]
    result = {
        "setup": vars(args) | {"plain_worker": None},
        "simulation": sim,
        "plain_loop": plain,
        "steady_ratio": ratio,
        "target_ratio": 1.25,
        "meets_target": ratio <= 1.25,
    }
    rows = [
        ("steady s/round", sim["steady_seconds_per_round"], plain["steady_seconds_per_round"]),
        ("round 1 s (engine start-up in sim)", sim["first_round_seconds"], plain["first_round_seconds"]),
        ("wall s (process start to end)", sim["wall_seconds"], plain["wall_seconds"]),
        ("peak RSS MiB (process tree)", sim["peak_rss_mib"], plain["peak_rss_mib"]),
        ("final accuracy", sim["final_accuracy"], plain["final_accuracy"]),
    ]
    table = "| measure | fedvault simulate | plain loop |\n|---|---|---|\n" + "\n".join(
        f"| {name} | {a:.3f} | {b:.3f} |" for name, a, b in rows
    )
    text = (
        f"## Simulation overhead: {args.clients} clients x {args.rounds} rounds of {args.task}, "
        f"{args.epochs} local epochs\n\n{table}\n\nsteady-state ratio (simulate / plain): **{ratio:.3f}** "
        f"(target <= 1.25: {'met' if ratio <= 1.25 else 'NOT met'})\n\n"
        f"The simulation uses fedvault's defaults: {os.cpu_count()} cores / client-cpus = "
        f"{max(1, int((os.cpu_count() or 1) // RunConfig().client_cpus))} single-threaded clients at a time; "
        "the plain loop trains one client at a time with torch's default threads.\n"
    )
    print(text)
    write_results("simulation_overhead", result, text)


if __name__ == "__main__":
    main()
