"""fedvault's ServerApp: a configured strategy, privacy ledger and centralized evaluation.

Deployed, a run may name only the ``module:attr`` tasks and strategies the server's own policy
allows (:mod:`fedvault.server.plugins`); that is checked before anything is imported or written.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedvault.compression import make_codec
from fedvault.config import RunConfig
from fedvault.device import resolve_device
from fedvault.errors import ConfigError
from fedvault.flower_timing import shorten_pull_backoff
from fedvault.logs import show_progress
from fedvault.memory import keep_freed_buffers
from fedvault.plots import run_title
from fedvault.privacy.dp_sgd import dp_compatible
from fedvault.privacy.ledger import LEDGER_FILENAME, Ledger
from fedvault.privacy.release import client_level_round_record
from fedvault.privacy.report import ledger_header, privacy_summary
from fedvault.progress import Progress
from fedvault.protocol import run_key, train_config
from fedvault.rundir import RunDirectory, default_run_dir
from fedvault.security.identity import load_identity
from fedvault.server.anchoring import ANCHOR_KEY, LedgerAnchorer, anchor_sources
from fedvault.server.client_level_dp import ClientLevelDP
from fedvault.server.clock import ClockedGrid
from fedvault.server.compression import DecodingGrid
from fedvault.server.fedbuff import FedBuff
from fedvault.server.plugins import check_run_plugins, server_plugin_policy
from fedvault.server.receipts import ReceiptGrid
from fedvault.server.recorder import RunRecorder
from fedvault.server.resume import checkpoint_round, restore
from fedvault.server.rounds import RoundLoop, RunStopped
from fedvault.server.sealing import SealedGrid, ServerSealing, ServerSealingPolicy
from fedvault.server.tracking import Tracking
from fedvault.strategies.registry import build_strategy
from fedvault.strategies.validation import ValidationRules
from fedvault.tasks import Task, load_task, load_task_data, make_loader


def build_server_app(config: RunConfig | None = None, progress: Progress | None = None) -> ServerApp:
    """A ServerApp using ``config``, or the Flower run config when ``config`` is None (deployed: in a
    process whose application set up no logging, it shows fedvault's log lines in the run's log)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is None and not logging.getLogger().handlers:  # a process of its own (flwr-serverapp)
            show_progress()  # its waits and drops then reach the run's log (`flwr log`, `fedvault server`)
            shorten_pull_backoff()  # replies are fetched without Flower's 1 s first retry
        cfg = config if config is not None else RunConfig.from_flat(dict(context.run_config))
        run_server(grid, cfg, deployed=config is None, progress=progress)

    return app


def make_strategy(cfg: RunConfig) -> Strategy:
    """The configured strategy, with fedvault's run-wide settings where it accepts them."""
    fraction_train = min(1.0, cfg.fraction_train * (1 + cfg.federation.over_select))  # over-selection samples more
    common = {  # strategies.registry.RUN_SETTINGS names these keys and their sources for `fedvault strategies`
        "fraction-train": fraction_train,
        "fraction-evaluate": cfg.fraction_evaluate,
        "min-train-nodes": max(1, int(fraction_train * cfg.num_clients)),
        "min-evaluate-nodes": max(1, int(cfg.fraction_evaluate * cfg.num_clients)),
        "min-available-nodes": cfg.num_clients,
        "num-clients": cfg.num_clients,
        "client-learning-rate": cfg.learning_rate,
    }
    strategy = build_strategy(cfg.strategy.name, dict(cfg.strategy_params), common)
    if cfg.federation.over_select and not hasattr(strategy, "fraction_train"):
        raise ConfigError(
            f"invalid value for 'federation.over-select': {cfg.federation.over_select} (strategy "
            f"'{cfg.strategy.name}' takes no fraction-train, so it cannot sample more clients than it keeps)"
        )
    return strategy


def validation_rules(cfg: RunConfig, strategy: Strategy) -> ValidationRules:
    v = cfg.validation
    return ValidationRules.for_strategy(
        strategy, max_update_norm=v.max_update_norm or None, max_payload_bytes=int(v.max_payload_mb * 2**20) or None
    )


def round_learning_rate(cfg: RunConfig, server_round: int) -> float:
    """``learning-rate`` under ``lr-schedule``: constant, or cosine decay over the run's rounds
    (Loshchilov & Hutter, ICLR 2017, without restarts): ``lr (1 + cos(pi (r - 1) / R)) / 2``."""
    if cfg.lr_schedule == "cosine":
        return cfg.learning_rate * (1 + math.cos(math.pi * (server_round - 1) / cfg.num_server_rounds)) / 2
    return cfg.learning_rate


def round_config(cfg: RunConfig, server_round: int) -> ConfigRecord:
    """Round ``server_round``'s train config (``server-round`` itself is stamped by the round loop)."""
    return train_config(round_learning_rate(cfg, server_round), cfg.local_epochs, cfg.momentum)


def initial_model(task: Task, cfg: RunConfig) -> torch.nn.Module:
    """The seeded initial global model (repaired for Opacus when clients run DP-SGD)."""
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    return dp_compatible(model) if cfg.privacy.sample_level else model


def run_server(grid: Grid, cfg: RunConfig, deployed: bool = False, progress: Progress | None = None) -> dict:
    """Run all rounds on ``grid`` and write the run directory; returns the summary.

    ``deployed``: the run config came from the SuperLink, so the server's own policies decide
    (plug-ins, sealing); otherwise (a simulation) the config's author runs every party.
    ``progress``: where round lines, waits and the live status go (default: stdout, live on a terminal)."""
    progress = progress or Progress()
    check_run_plugins(cfg, server_plugin_policy(deployed))  # before any plug-in is imported or a file written
    keep_freed_buffers()  # every round opens and aggregates update-sized buffers again
    run_dir = RunDirectory(cfg.run_dir or default_run_dir(cfg.task))
    tracking = Tracking(cfg, run_dir.path)  # a tracker asked for but not installed stops here
    if not (run_dir.path / "config.toml").exists():
        run_dir.create(cfg.to_flat())
    task = load_task(cfg.task)
    model = initial_model(task, cfg)
    private = cfg.privacy.sample_level or cfg.privacy.client_level
    sealing_policy = ServerSealingPolicy.local(cfg, deployed)  # the server's own files, not the run config
    ledger, anchorer = None, None
    if private:  # the ledger's header carries delta and the caps; its head is signed after every round
        run = run_key(cfg, 0 if cfg.run_dir else grid.run.run_id)
        ledger = Ledger(run_dir.path / LEDGER_FILENAME, header=ledger_header(cfg, run), recover_truncated_tail=True)
        anchorer = LedgerAnchorer(ledger, load_identity(sealing_policy.identity_path(run_dir.path)), run)
    base = make_strategy(cfg)
    strategy: Strategy = base
    if cfg.privacy.client_level:
        assert ledger is not None  # client-level DP is private
        strategy = ClientLevelDP.from_config(base, cfg, ledger)
    federation = cfg.federation
    round_clock = None
    if federation.fedbuff_buffer:
        if deployed:
            raise ConfigError("federation.fedbuff-buffer: FedBuff runs in simulation only (on the virtual round clock)")
        concurrency = federation.fedbuff_concurrency or 2 * federation.fedbuff_buffer
        strategy = fedbuff = FedBuff(base, federation.fedbuff_buffer, concurrency, cfg.seed)
        round_clock = fedbuff.take_advance
    receipts = None
    if cfg.privacy.sample_level:  # each client keeps the server's signed receipts for its spends
        assert ledger is not None and anchorer is not None
        grid = receipts = ReceiptGrid(grid, ledger, anchorer.identity, anchorer.run)
    if sealing_policy.enabled:  # outside the receipts: instructions are signed before receipts join them
        sealing = ServerSealing(sealing_policy.identity_path(run_dir.path), grid.run.run_id, sealing_policy.suite)
        grid = SealedGrid(grid, sealing)
    codec = make_codec(cfg.compression)
    if codec is not None:  # outside the sealing: a reply is opened, then decoded, then validated
        grid = DecodingGrid(grid, codec)
    grid = ClockedGrid(  # outermost: it times opened, decoded replies
        grid,
        cfg.round_timeout,
        federation.deadline,
        federation.over_select,
        virtual=not deployed,
        deadline_quantile=federation.deadline_quantile,
        round_clock=round_clock,
    )
    release = client_level_round_record if cfg.privacy.client_level else (lambda record: record)
    prices = (federation.price_per_kwh, federation.price_per_gb)
    recorder = RunRecorder(run_dir, cfg.num_server_rounds, title=run_title(cfg), progress=progress, prices=prices)
    observers = (recorder, tracking)  # each round: the run directory, then the trackers
    loop = RoundLoop(
        strategy=strategy,
        grid=grid,
        central_evaluate=central_evaluator(task, cfg),
        on_round=lambda record, arrays: _finish_round(run_dir, loop, observers, anchorer, release(record), arrays),
        timeout=cfg.round_timeout,
        rules=validation_rules(cfg, base),
        min_replies=cfg.min_replies,
        client_evaluate=cfg.fraction_evaluate > 0 and cfg.test_fraction > 0 and not private,  # withheld under DP
        ledger=ledger,
        progress=progress,
    )
    arrays, first_round = ArrayRecord(model.state_dict()), 1
    if cfg.resume:
        arrays, first_round = restore(run_dir, loop, arrays)
        progress.line(f"resuming {run_dir.path} at round {first_round}")
    stopped = None
    with tracking, progress.running(cfg.num_server_rounds, first_round):  # both closed however the rounds end
        try:
            arrays = loop.run(arrays, cfg.num_server_rounds, lambda r: round_config(cfg, r), first_round)
        except RunStopped as exc:
            stopped = str(exc)
            progress.line(f"run stopped: {stopped}")
            arrays = recorder.last_arrays or arrays
    extra: dict[str, object] = {"task": cfg.task, "run_dir": str(Path(run_dir.path)), "stopped": stopped}
    if anchorer is not None:
        last_round = anchorer.last.round if anchorer.last else first_round - 1
        loop.collect_late(last_round)  # before the final anchor, which then covers them
        if receipts is not None:
            receipts.deliver(loop.grid, last_round, cfg.round_timeout)
        extra[ANCHOR_KEY] = anchorer.anchor(last_round, final=True).to_dict()
        report, text = privacy_summary(run_dir.path, cfg, anchorer.run, anchorer.trusted, anchor_sources(run_dir.path))
        progress.line(text)
        extra["privacy"] = report
    return recorder.finish(arrays.to_torch_state_dict(), extra=extra)


def _finish_round(
    run_dir: RunDirectory,
    loop: RoundLoop,
    observers: tuple[RunRecorder, Tracking],
    anchorer: LedgerAnchorer | None,
    record: dict,
    arrays: ArrayRecord,
) -> None:
    """Metrics line, then the signed ledger head, then the checkpoint that carries it, then the trackers
    (so a round a resume replays was not tracked before)."""
    recorder, tracking = observers
    recorder.on_round(record, arrays)
    anchor = anchorer.anchor(record["round"]).to_dict() if anchorer is not None else None
    checkpoint_round(run_dir.path, loop, record["round"], arrays, ledger_anchor=anchor)
    tracking.on_round(record)


def central_evaluator(task: Task, cfg: RunConfig):
    """Evaluate the global model on the task's held-out test set (once per round)."""
    device = resolve_device(cfg.device)
    model = initial_model(task, cfg).to(device)
    loader = make_loader(load_task_data(cfg.task, cfg.seed).test, 512, shuffle=False)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord(dict(task.evaluate(model, loader, device)))

    return evaluate


app = build_server_app()
