"""fedvault's ServerApp: FedAvg from ``flwr.serverapp.strategy`` with centralized evaluation."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedvault.config import RunConfig
from fedvault.device import resolve_device
from fedvault.rundir import RunDirectory, default_run_dir
from fedvault.server.recorder import RunRecorder
from fedvault.server.rounds import RoundLoop
from fedvault.tasks import Task, load_task, load_task_data, make_loader


def build_server_app(config: RunConfig | None = None) -> ServerApp:
    """A ServerApp using ``config``, or the Flower run config when ``config`` is None."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else RunConfig.from_flat(dict(context.run_config))
        run_server(grid, cfg)

    return app


def run_server(grid: Grid, cfg: RunConfig) -> dict:
    """Run all rounds on ``grid`` and write the run directory; returns the summary."""
    run_dir = RunDirectory(cfg.run_dir or default_run_dir(cfg.task))
    if not (run_dir.path / "config.toml").exists():
        run_dir.create(cfg.to_flat())
    task = load_task(cfg.task)
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    arrays = ArrayRecord(model.state_dict())

    strategy = FedAvg(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=max(1, int(cfg.fraction_train * cfg.num_clients)),
        min_evaluate_nodes=max(1, int(cfg.fraction_evaluate * cfg.num_clients)),
        min_available_nodes=cfg.num_clients,
    )
    recorder = RunRecorder(run_dir, cfg.num_server_rounds, title=cfg.task, out=sys.stdout)
    loop = RoundLoop(
        strategy=strategy,
        grid=grid,
        central_evaluate=central_evaluator(task, cfg),
        on_round=recorder.on_round,
        timeout=cfg.round_timeout,
        client_evaluate=cfg.fraction_evaluate > 0 and cfg.test_fraction > 0,
    )
    train_config = ConfigRecord({"lr": cfg.learning_rate, "local-epochs": cfg.local_epochs})
    final = loop.run(arrays, cfg.num_server_rounds, train_config)
    summary = recorder.finish(final.to_torch_state_dict(), extra={"task": cfg.task, "run_dir": str(Path(run_dir.path))})
    return summary


def central_evaluator(task: Task, cfg: RunConfig):
    """Evaluate the global model on the task's held-out test set (once per round)."""
    device = resolve_device(cfg.device)
    model = task.build_model().to(device)
    loader = make_loader(load_task_data(cfg.task, cfg.seed).test, 512, shuffle=False)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord(task.evaluate(model, loader, device))

    return evaluate


app = build_server_app()
