"""PNG plots of a run's per-round metrics.

Drawn on a :class:`matplotlib.figure.Figure` with its own Agg canvas: no display needed, and the
user's pyplot backend and global figure list are left alone (no ``matplotlib.use``, no pyplot).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedvault.atomic import atomic_write
from fedvault.config import RunConfig


def _series(rounds: list[dict[str, Any]], section: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["round"], r[section][key]) for r in rounds if key in r.get(section, {})]
    return [p[0] for p in points], [p[1] for p in points]


def run_title(cfg: RunConfig) -> str:
    """The settings a reader of a plot needs: task, clients, strategy and the privacy in force."""
    p = cfg.privacy
    mechanisms = [f"DP-SGD eps {p.target_epsilon:g}"] * p.sample_level
    mechanisms += [f"client-level DP z {p.client_noise_multiplier:g}"] * p.client_level
    privacy = f"{', '.join(mechanisms)}, delta {p.target_delta:g}" if mechanisms else "no DP"
    return f"{cfg.task}, {cfg.num_clients} clients ({cfg.partitioner}), {cfg.strategy.name}, {privacy}"


def plot_run(rounds: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """Write accuracy.png and loss.png (centralized and client-side curves per round)."""
    written = []
    for name, curves in {
        "accuracy": [
            ("central", "accuracy", "server (held-out test)"),
            ("evaluate", "eval_accuracy", "clients (local test)"),
        ],
        "loss": [
            ("central", "loss", "server (held-out test)"),
            ("evaluate", "eval_loss", "clients (local test)"),
            ("train", "train_loss", "clients (training)"),
        ],
    }.items():
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for section, key, label in curves:
            xs, ys = _series(rounds, section, key)
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.set_title(f"{name} per round\n{title}", fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        atomic_write(path, partial(fig.savefig, format="png", dpi=100))
        written.append(path)
    return written
