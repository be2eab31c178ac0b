"""Run ``fedvault simulate`` over a grid of settings and collect each run's summary (shared by benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def simulate(settings: list[str]) -> dict:
    """One simulation in a subprocess; returns summary.json plus the per-round accuracy curve (round 0
    first) and seconds (round 1 first)."""
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


def write_results(name: str, data: dict, markdown: str, figure=None) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)
    if figure is not None:
        figure.savefig(RESULTS / f"{name}.png", dpi=100)
