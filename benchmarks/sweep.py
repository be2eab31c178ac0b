"""Helpers shared by the benchmarks: run ``fedvault simulate`` and collect its summary, plot, write results."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from fedvault.atomic import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def base_settings(task: str, clients: int, rounds: int) -> list[str]:
    """The benchmarks' common recipe: ``task`` at batch 32 and learning rate 0.05, no client evaluation."""
    return [
        f"task={task}",
        "batch-size=32",
        "learning-rate=0.05",
        f"num-clients={clients}",
        f"num-server-rounds={rounds}",
        "fraction-evaluate=0.0",
    ]


def simulate(settings: list[str]) -> dict:
    """One simulation in a subprocess; returns summary.json plus the per-round accuracy curve (round 0
    first), seconds, bytes received and round-clock seconds (round 1 first)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedvault.cli", "simulate", "--out", str(out)]
        for item in settings:
            cmd += ["--set", item]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"simulate {' '.join(settings)} failed:\n{proc.stderr[-2000:]}")
        summary = json.loads((out / "summary.json").read_text())
        rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary["accuracy_curve"] = [r["central"]["accuracy"] for r in rounds]
        summary["round_seconds"] = [r["seconds"] for r in rounds[1:]]
        summary["bytes_received_per_round"] = [r.get("bytes_received", 0) for r in rounds[1:]]
        summary["round_clock_per_round"] = [r.get("round_clock_seconds") for r in rounds[1:]]
        return summary


def line_plot(series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str = ""):
    """One figure, one line per named (xs, ys) series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def write_results(name: str, data: dict, markdown: str, figure=None, out: Path = RESULTS) -> None:
    """``out/<name>.json``, ``.md`` and (with ``figure``) ``.png``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    payload = (json.dumps(data, indent=2) + "\n").encode()
    atomic_write(out / f"{name}.json", lambda fh: fh.write(payload))
    atomic_write(out / f"{name}.md", lambda fh: fh.write(markdown.rstrip("\n").encode() + b"\n"))
    if figure is not None:
        atomic_write(out / f"{name}.png", lambda fh: figure.savefig(fh, format="png", dpi=100))
