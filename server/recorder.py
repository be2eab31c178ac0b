"""Records a run as it goes: one metrics line and one progress line per round, then a summary."""

from __future__ import annotations

import statistics
import time
from typing import Any

from flwr.app import ArrayRecord

from fedvault.plots import plot_run
from fedvault.progress import Progress
from fedvault.rundir import RunDirectory


class RunRecorder:
    """``on_round`` target for the round loop; ``finish`` writes summary, model and plots.

    The round lines go through ``progress`` (stdout by default; none when it is quiet)."""

    def __init__(
        self,
        run_dir: RunDirectory,
        num_rounds: int,
        title: str,
        progress: Progress | None = None,
        prices: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        """``prices``: (per kWh of client energy, per GB moved) for the summary's ``cost``; (0, 0) = none."""
        self.run_dir, self.num_rounds, self.title, self.prices = run_dir, num_rounds, title, prices
        self.progress = progress or Progress()
        self.started = time.perf_counter()
        self.last_arrays: ArrayRecord | None = None

    def on_round(self, record: dict[str, Any], arrays: ArrayRecord) -> None:
        self.run_dir.append_round(record)
        self.last_arrays = arrays
        central = record.get("central", {})
        accuracy, loss = central.get("accuracy", float("nan")), central.get("loss", float("nan"))
        line = f"round {record['round']:>3}/{self.num_rounds}  accuracy {accuracy:.4f}  loss {loss:.4f}"
        if "train" in record:
            if "train_loss" in record["train"]:  # withheld under sample-level DP
                line += f"  train_loss {record['train']['train_loss']:.4f}"
            line += f"  clients {record['replies_ok']}/{record['clients_sampled']}"
            for key, label in (("failed_nodes", "failed"), ("dropped", "dropped"), ("late", "late")):
                if record.get(key):
                    line += f"  {label} {len(record[key])}"
            for key, label in (("missed_deadline", "missed-deadline"), ("over_selected", "over-selected")):
                if record.get(key):
                    line += f"  {label} {len(record[key])}"
            if record.get("clock") == "virtual":
                line += f"  clock {record['round_clock_seconds']:.1f}s"
            if record.get("lost"):
                line += "  lost: model unchanged"
            if record.get("budget_exhausted"):
                line += f"  budget-exhausted {record['budget_exhausted']}"
            if "dp_epsilon" in record["train"]:
                line += f"  client_eps {record['train']['dp_epsilon']:.2f}"
        line += f"  {record['seconds']:.2f}s"
        self.progress.round_finished(record["round"], record["seconds"])
        self.progress.line(line)

    def finish(self, state_dict: dict, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        rounds = self.run_dir.rounds()
        trained = [r for r in rounds if r["round"] > 0]
        steady = [r["seconds"] for r in trained[1:]]
        summary = {
            "rounds": len(trained),
            "initial_accuracy": rounds[0]["central"].get("accuracy") if rounds else None,
            "final_accuracy": trained[-1]["central"].get("accuracy") if trained else None,
            "final_loss": trained[-1]["central"].get("loss") if trained else None,
            "best_accuracy": max((r["central"].get("accuracy", 0.0) for r in trained), default=None),
            "first_round_seconds": trained[0]["seconds"] if trained else None,
            "steady_seconds_per_round": statistics.median(steady) if steady else None,
            "total_seconds": time.perf_counter() - self.started,
            "bytes_sent": _total(rounds, "bytes_sent"),
            "bytes_received": _total(rounds, "bytes_received"),
            "round_clock_seconds": _total(rounds, "round_clock_seconds"),
            "energy_joules": _total(rounds, "energy_joules"),
            **(extra or {}),
        }
        if any(self.prices):
            per_kwh, per_gb = self.prices
            moved = (summary["bytes_sent"] or 0) + (summary["bytes_received"] or 0)
            summary["cost"] = (summary["energy_joules"] or 0.0) / 3.6e6 * per_kwh + moved / 1e9 * per_gb
        self.run_dir.write_summary(summary)
        self.run_dir.save_model(state_dict)
        plot_run(rounds, self.run_dir.path, self.title)
        return summary


def _total(rounds: list[dict[str, Any]], key: str) -> int | float | None:
    """Sum of ``key`` over the rounds that record it; None when none does (withheld under client-level DP)."""
    values = [r[key] for r in rounds if key in r]
    return sum(values) if values else None
