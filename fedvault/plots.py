"""PNG plots of a run's per-round metrics.

Drawn on a :class:`matplotlib.figure.Figure` with its own Agg canvas: no display needed, and the
user's pyplot backend and global figure list are left alone (no ``matplotlib.use``, no pyplot).
"""

from __future__ import annotations

import io
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


METRIC_CURVES = {
    "accuracy": [
        ("central", "accuracy", "server (held-out test)"),
        ("evaluate", "eval_accuracy", "clients (local test)"),
    ],
    "loss": [
        ("central", "loss", "server (held-out test)"),
        ("evaluate", "eval_loss", "clients (local test)"),
        ("train", "train_loss", "clients (training)"),
    ],
}


def _axes(title: str, ylabel: str) -> tuple[Figure, Any]:
    """A 6x4 in figure with its own Agg canvas and one axes with integer rounds on x."""
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    return fig, ax


def metric_figures(rounds: list[dict[str, Any]], title: str) -> dict[str, Figure]:
    """``{"accuracy": fig, "loss": fig}``: centralized and client-side curves per round."""
    figures = {}
    for name, curves in METRIC_CURVES.items():
        fig, ax = _axes(f"{name} per round\n{title}", name)
        for section, key, label in curves:
            xs, ys = _series(rounds, section, key)
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        ax.legend()
        fig.tight_layout()
        figures[name] = fig
    return figures


#: Per-round client counts in metrics.jsonl, with their labels.
CLIENT_COUNTS = {
    "clients_sampled": "sampled",
    "replies_ok": "aggregated",
    "dropped": "dropped",
    "late": "late",
    "failed_nodes": "no reply",
    "budget_exhausted": "out of budget",
}


def client_count(record: dict[str, Any], key: str) -> int | None:
    """A :data:`CLIENT_COUNTS` count of a round's record (a number, or the nodes it lists); None if absent."""
    value = record.get(key)
    return len(value) if isinstance(value, list) else value


def system_figures(rounds: list[dict[str, Any]], title: str) -> dict[str, Figure]:
    """``{"round_seconds", "traffic", "clients"}``: seconds, bytes (MB) and client counts per round."""
    trained = [r for r in rounds if "clients_sampled" in r]
    xs = [r["round"] for r in trained]
    seconds, sax = _axes(f"seconds per round\n{title}", "seconds")
    sax.bar([r["round"] for r in rounds], [r.get("seconds", 0.0) for r in rounds], color="tab:gray")
    traffic, tax = _axes(f"traffic per round\n{title}", "MB")
    for offset, key, label in ((-0.2, "bytes_sent", "sent by the server"), (0.2, "bytes_received", "received")):
        tax.bar([x + offset for x in xs], [r.get(key, 0) / 1e6 for r in trained], width=0.4, label=label)
    tax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    clients, cax = _axes(f"clients per round\n{title}", "clients")
    cax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for (key, label), marker, size in zip(CLIENT_COUNTS.items(), "osDv^x", range(11, 0, -2)):  # overlaps stay visible
        cax.plot(xs, [client_count(r, key) or 0 for r in trained], marker=marker, markersize=size, label=label)
    cax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figures = {"round_seconds": seconds, "traffic": traffic, "clients": clients}
    for fig in figures.values():
        fig.tight_layout()
    return figures


#: What a round costs, cumulated on x against the server's test accuracy: (record key, label, scale).
COST_AXES = (
    ("round_clock_seconds", "time on the round clock (s)", 1.0),
    ("bytes", "bytes moved (MB)", 1e-6),
    ("energy_joules", "client energy (kJ)", 1e-3),
)


def cost_figure(rounds: list[dict[str, Any]], title: str) -> Figure | None:
    """Accuracy against cumulative round-clock time, bytes and (virtual clock) energy; None when the
    rounds carry no clock (a run from before it)."""
    trained = [r for r in rounds if "round_clock_seconds" in r and "accuracy" in r.get("central", {})]
    if not trained:
        return None
    axes = [
        (key, label, scale)
        for key, label, scale in COST_AXES
        if key != "energy_joules" or "energy_joules" in trained[0]
    ]
    fig = Figure(figsize=(4 * len(axes), 3.6))
    FigureCanvasAgg(fig)
    start = rounds[0]["central"].get("accuracy") if rounds and rounds[0]["round"] == 0 else None
    for i, (key, label, scale) in enumerate(axes, start=1):
        ax = fig.add_subplot(1, len(axes), i)
        total, xs = 0.0, [0.0] if start is not None else []
        for r in trained:
            total += (
                r.get("bytes_sent", 0) + r.get("bytes_received", 0) if key == "bytes" else r.get(key, 0.0)
            ) * scale
            xs.append(total)
        ax.plot(xs, ([start] if start is not None else []) + [r["central"]["accuracy"] for r in trained], marker="o")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy" if i == 1 else "")
        ax.grid(alpha=0.3)
    fig.suptitle(f"accuracy against what the rounds cost\n{title}", fontsize="medium")
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG (100 dpi, cropped to what is drawn, legends outside the axes included)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def plot_run(rounds: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """Write accuracy.png and loss.png (centralized and client-side curves per round), and
    accuracy_vs_cost.png when the rounds carry a clock."""
    written = []
    figures = metric_figures(rounds, title)
    if (cost := cost_figure(rounds, title)) is not None:
        figures["accuracy_vs_cost"] = cost
    for name, fig in figures.items():
        path = out_dir / f"{name}.png"
        atomic_write(path, partial(fig.savefig, format="png", dpi=100))
        written.append(path)
    return written
