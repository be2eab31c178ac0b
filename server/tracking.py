"""Experiment tracking: each round's record, as scalars, also sent to TensorBoard and/or MLflow.

A round observer beside :class:`~fedvault.server.recorder.RunRecorder`: it sees the record the run
directory keeps (after :mod:`fedvault.privacy.release` withheld what a private run may not show), so a
tracker never shows more than ``metrics.jsonl``. The step is the round (round 0: the initial model).
Scalars: ``central/*`` (server-side evaluation), ``train/*`` and ``evaluate/*`` (aggregated client
metrics), ``privacy/*`` (the round's epsilon figures), ``clients/*`` (sampled, ok, failed, dropped, late,
budget-exhausted) and ``system/*`` (seconds, bytes sent and received). The run config goes in once, at
the start, as MLflow params and a TensorBoard text table. A resumed run appends to the same TensorBoard
directory and continues the same MLflow run (its id is kept in the run directory).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from fedvault.atomic import atomic_write
from fedvault.config import RunConfig
from fedvault.errors import ConfigError

INSTALL_HINT = "pip install 'fedvault[tracking]'"
MLFLOW_RUN_ID_FILE = "mlflow_run_id"
#: The module each tracker needs, and the package that provides it.
REQUIRES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny (or mlflow)")}


def check_tracking(cfg: RunConfig) -> None:
    """Fail in one line, before anything runs, when a tracker asked for is not installed."""
    for name in cfg.tracking.trackers:
        module, package = REQUIRES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(
                f"invalid value for 'tracking.backends': {cfg.tracking.backends!r} needs {package}, which is not "
                f"installed ({INSTALL_HINT})"
            ) from None


def round_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric figures of one round record, by tracker key (see the module docstring)."""
    scalars: dict[str, float] = {}
    for section in ("central", "train", "evaluate"):
        for key, value in record.get(section, {}).items():
            if _number(value):
                scalars[f"{'privacy' if 'epsilon' in key else section}/{key}"] = float(value)
    for key, label in (("clients_sampled", "sampled"), ("replies_ok", "ok"), ("budget_exhausted", "budget_exhausted")):
        if _number(record.get(key)):
            scalars[f"clients/{label}"] = float(record[key])
    for key, label in (("failed_nodes", "failed"), ("dropped", "dropped"), ("late", "late")):
        if isinstance(record.get(key), list):
            scalars[f"clients/{label}"] = float(len(record[key]))
    for key in ("seconds", "bytes_sent", "bytes_received"):
        if _number(record.get(key)):
            scalars[f"system/{key}"] = float(record[key])
    return scalars


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Tracker(Protocol):
    """One backend: a round's scalars in, closed once at the end."""

    def on_round(self, record: dict[str, Any]) -> None: ...

    def close(self, status: str) -> None:
        """``status``: FINISHED, FAILED or KILLED (MLflow's run states)."""


class TensorBoardTracker:
    """Scalars in TensorBoard event files under ``log_dir`` (``tensorboard --logdir log_dir``)."""

    def __init__(self, log_dir: Path, config: dict[str, Any], resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        if not resumed:
            rows = "\n".join(f"| `{key}` | `{value!r}` |" for key, value in sorted(config.items()))
            self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows, global_step=0)

    def on_round(self, record: dict[str, Any]) -> None:
        for key, value in round_scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["round"])
        self.writer.flush()  # a live `tensorboard --logdir` sees every round as it ends

    def close(self, status: str) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per fedvault run; its id is kept in ``run_dir`` so a resume continues it."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_dir: Path,
        config: dict[str, Any],
        resumed: bool,
        artifact_location: str | None = None,
    ) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        with _quiet_store_setup():
            self.client = MlflowClient(tracking_uri=uri)  # opens (or creates) the store
        id_file = run_dir / MLFLOW_RUN_ID_FILE
        if resumed and id_file.is_file():
            try:
                self.run_id = self.client.get_run(id_file.read_text().strip()).info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                return
            except MlflowException:  # that run is not in this store: start another
                pass
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment, artifact_location)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        atomic_write(id_file, lambda fh: fh.write(self.run_id.encode()))
        params = [Param(key, str(value)) for key, value in sorted(config.items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("fedvault.run_dir", str(run_dir.resolve()))])

    def on_round(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, record["round"]) for key, value in round_scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def _quiet_store_setup() -> Iterator[None]:
    """Open the store without MLflow's INFO lines on creating its tables or SQLAlchemy's deprecation warnings."""
    logger = logging.getLogger("mlflow.store.db.utils")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


class Tracking:
    """The configured trackers as one round observer: a context manager around the rounds.

    Built from the config, it only checks the packages (:func:`check_tracking`); entering opens each
    tracker, leaving closes it with the run's outcome, however the rounds ended."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        check_tracking(cfg)
        self.cfg, self.run_dir = cfg, run_dir
        self.trackers: list[Tracker] = []

    def __enter__(self) -> Tracking:
        try:
            for name in self.cfg.tracking.trackers:
                self.trackers.append(self._open(name))
        except BaseException:
            self._close("FAILED")  # the ones already open
            raise
        return self

    def _open(self, name: str) -> Tracker:
        cfg, config, resumed = self.cfg, self.cfg.to_flat(), self.cfg.resume
        if name == "tensorboard":
            log_dir = Path(cfg.tracking.dir) if cfg.tracking.dir else self.run_dir / "tensorboard"
            return TensorBoardTracker(log_dir, config, resumed)
        experiment = cfg.tracking.experiment or cfg.task
        if cfg.tracking.uri:
            return MlflowTracker(cfg.tracking.uri, experiment, self.run_dir, config, resumed)
        store = self.run_dir.resolve()  # the default: a SQLite store, and its artifacts, in the run directory
        artifacts = (store / "mlartifacts").as_uri()
        return MlflowTracker(f"sqlite:///{store / 'mlflow.db'}", experiment, self.run_dir, config, resumed, artifacts)

    def on_round(self, record: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.on_round(record)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._close("FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")

    def _close(self, status: str) -> None:
        for tracker in self.trackers:
            tracker.close(status)
        self.trackers = []
