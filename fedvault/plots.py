"""PNG plots of a run's per-round metrics (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)


def _series(rounds: list[dict[str, Any]], section: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["round"], r[section][key]) for r in rounds if key in r.get(section, {})]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(rounds: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """Write accuracy.png and loss.png (centralized and client-side curves per round)."""
    written = []
    for name, curves in {
        "accuracy": [("central", "accuracy", "server (held-out test)"), ("evaluate", "eval_accuracy", "clients (local test)")],
        "loss": [("central", "loss", "server (held-out test)"), ("evaluate", "eval_loss", "clients (local test)"),
                 ("train", "train_loss", "clients (training)")],
    }.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for section, key, label in curves:
            xs, ys = _series(rounds, section, key)
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.set_title(f"{title}: {name} per round")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
