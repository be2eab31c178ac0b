"""``fedvault simulate``: many clients on this machine through Flower's Simulation Engine.

Uses ``flwr.simulation.run_simulation`` (Ray backend): it starts in-process in seconds, where
``flwr run`` with a managed local SuperLink costs about a minute per run on 2 cores
(see shared notes). The ServerApp and ClientApp are fedvault's own, built with the resolved
config baked in, so every simulated node sees the same config.

:func:`simulate` is also fedvault's Python front door: it returns a :class:`SimulationResult`,
raises a :class:`~fedvault.errors.FedvaultError` when the run fails (a ServerApp failure included),
and leaves the process as it found it (``os.environ``, the ``flwr``, ``fedvault`` and root loggers),
whatever Flower and Ray change while the simulation runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedvault.client.app import build_client_app
from fedvault.client.policy import ClientPolicy
from fedvault.config import RunConfig
from fedvault.errors import ConfigError, FedvaultError
from fedvault.logs import show_progress
from fedvault.partition import partition
from fedvault.plugins import PluginPolicy
from fedvault.profiles import federation_profiles
from fedvault.progress import Progress
from fedvault.rundir import CONFIG_FILE, RunDirectory, claim_run_dir, default_run_dir
from fedvault.security.identity import IdentityPin, fingerprint, load_identity_public_key
from fedvault.server.app import build_server_app, make_strategy
from fedvault.server.sealing import server_identity_path
from fedvault.server.tracking import check_tracking
from fedvault.tasks import load_task_data

log = logging.getLogger("fedvault")
LIBRARY_LOG = "library.log"  # Flower's and other libraries' lines during a simulation (not with verbose)


class SimulationError(FedvaultError, RuntimeError):
    """The simulation failed (the ServerApp raised, or the run ended before its rounds finished)."""


@dataclass(frozen=True, eq=False)
class SimulationResult:
    """A finished simulation: its run directory, resolved config, ``summary.json`` and ``metrics.jsonl``.

    ``rounds`` holds one record per round, round 0 (the initial model) first. ``os.fspath(result)``
    is the run directory, so ``audit(result)`` and ``Path(result)`` work.
    """

    path: Path
    config: RunConfig
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SimulationResult:
        """Read a finished run directory (written by ``simulate`` or ``fedvault simulate``)."""
        run_dir = RunDirectory(Path(os.fspath(path)))
        if not (run_dir.path / "summary.json").is_file():
            raise SimulationError(f"{run_dir.path} holds no finished run (no summary.json)")
        config = RunConfig.from_sources(run_dir.path / CONFIG_FILE)
        return cls(run_dir.path, config, run_dir.summary(), run_dir.rounds())

    @property
    def final_accuracy(self) -> float | None:
        """Centralized test accuracy of the final global model (None when no round finished)."""
        return self.summary.get("final_accuracy")

    @property
    def initial_accuracy(self) -> float | None:
        """Centralized test accuracy of the initial model (round 0)."""
        return self.summary.get("initial_accuracy")

    @property
    def accuracy_curve(self) -> list[float]:
        """Centralized accuracy after each round, round 0 first."""
        return [r["central"]["accuracy"] for r in self.rounds if "accuracy" in r.get("central", {})]

    @property
    def stopped(self) -> str | None:
        """Why the run stopped early (a privacy budget, for example), or None when all rounds ran."""
        return self.summary.get("stopped")

    def __fspath__(self) -> str:
        return str(self.path)


def preflight(cfg: RunConfig) -> None:
    """Fail fast, before Ray starts: the trackers are installed, a Ray cluster to attach to answers, the
    client profiles (and their file) are valid, the task loads and its data splits as configured."""
    check_tracking(cfg)
    check_ray_address(cfg.simulation.ray_address)
    federation_profiles(cfg.federation.profiles, cfg.federation.profile_file, cfg.num_clients, cfg.seed)
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # the strategy's notices are logged once, by the run (to library.log)
    try:
        make_strategy(cfg)  # unknown strategy or bad strategy.<param> fails here, not in a Ray worker
    finally:
        flwr_log.setLevel(level)
    data = load_task_data(cfg.task, cfg.seed)
    partition(
        data.train.y,
        cfg.num_clients,
        cfg.partitioner,
        cfg.seed,
        alpha=cfg.dirichlet_alpha,
        shards_per_client=cfg.shards_per_client,
    )


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """A ``HOST:PORT`` cluster address must accept a connection (Ray's own failure takes minutes)."""
    if address in ("", "auto"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            f"simulation.ray-address {address}: no Ray head answers there ({exc.strerror or exc}); start one with "
            f"`ray start --head --port {port}` on that machine, or leave the key empty to run Ray here"
        ) from None


def client_gpus(cfg: RunConfig) -> float:
    """``client-gpus=-1`` (auto): share one GPU among the clients the CPUs allow at once."""
    if cfg.client_gpus >= 0:
        return cfg.client_gpus
    if not torch.cuda.is_available():
        return 0.0
    concurrent = max(1, int((os.cpu_count() or 1) // cfg.client_cpus))
    return round(1.0 / concurrent, 3)


def with_simulation_identity(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """``sealing.mode = "on"`` in a simulation: a server identity in the run dir (see :func:`client_policy`)."""
    path = server_identity_path(cfg, run_dir)
    return dataclasses.replace(cfg, sealing=dataclasses.replace(cfg.sealing, identity_key=str(path)))


def client_policy(cfg: RunConfig) -> ClientPolicy:
    """The simulated clients' policy: one operator runs every party, so it seals as ``cfg`` says,
    pinning the server identity the harness made, and loads the ``module:attr`` task the operator's
    own config names (a deployed client's policy is its node config, with its own allow-list)."""
    own = PluginPolicy.simulation()
    if not cfg.sealing.enabled(deployed=False):
        return ClientPolicy(sealing=False, refuse_replays=False, plugins=own)
    public = Path(cfg.sealing.identity_key).with_suffix(".pub")
    pin = IdentityPin(fingerprint(load_identity_public_key(public)))
    return ClientPolicy(sealing=True, pin=pin, refuse_replays=False, plugins=own)  # one process: nothing to replay


def backend_config(cfg: RunConfig, verbose: bool) -> dict:
    """Flower's Ray backend settings: resources per client, and ``ray.init``'s arguments (``address``
    attaches to a running cluster, whose machines then host the clients)."""
    init_args: dict[str, Any] = {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose}
    if cfg.simulation.ray_address:
        init_args["address"] = cfg.simulation.ray_address
    return {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": client_gpus(cfg)}, "init_args": init_args}


def simulate(
    config: RunConfig | str | os.PathLike[str] | None = None,
    /,
    *,
    verbose: bool = False,
    progress: bool = False,
    overwrite: bool = False,
    display: Progress | None = None,
    **options: Any,
) -> SimulationResult:
    """Run a simulation of ``config`` (a RunConfig, a TOML file, or None for the defaults).

    ``options`` override keys by their Python names, as in :meth:`RunConfig.create`
    (``simulate("run.toml", num_server_rounds=5)``). ``progress`` shows fedvault's log lines
    (:func:`fedvault.logs.show_progress`) during the call; ``verbose`` also shows Flower's and Ray's.
    ``display`` is where the round lines and the live status go (:class:`fedvault.progress.Progress`;
    default: stdout, with a status line when stderr is a terminal).
    An existing run directory is refused unless ``resume`` continues it (with its own saved config)
    or ``overwrite`` moves it aside (:func:`fedvault.rundir.claim_run_dir`).
    Raises :class:`SimulationError` (or the FedvaultError the ServerApp raised) when the run fails.
    """
    cfg = _resolve(config).with_options(**options) if options else _resolve(config)
    with _process_state_restored():  # also undoes what libraries set when first imported here (scikit-learn)
        if progress:
            show_progress()
        run_dir = RunDirectory(cfg.run_dir or default_run_dir(cfg.task))
        moved = claim_run_dir(run_dir.path, resume=cfg.resume, overwrite=overwrite)
        if moved is not None:
            log.info("--overwrite: the run that was in %s is now in %s", run_dir.path, moved)
        if cfg.resume:
            cfg = resumed_config(cfg, run_dir.path)
        preflight(cfg)
        cfg = dataclasses.replace(cfg, run_dir=str(run_dir.path))
        if cfg.federation.profile_file:  # the clients (Ray workers) and a resume need not share this cwd
            federation = dataclasses.replace(
                cfg.federation, profile_file=str(Path(cfg.federation.profile_file).resolve())
            )
            cfg = dataclasses.replace(cfg, federation=federation)
        if cfg.sealing.enabled(deployed=False):
            cfg = with_simulation_identity(cfg, run_dir.path)
        if not cfg.resume:
            run_dir.create(cfg.to_flat())
        log.info(
            "simulating %d clients x %d rounds of %s -> %s",
            cfg.num_clients,
            cfg.num_server_rounds,
            cfg.task,
            run_dir.path,
        )
        started = time.perf_counter()
        with _library_lines_to(run_dir.path / LIBRARY_LOG, verbose):
            _run_flower_simulation(cfg, run_dir.path, verbose, display)
    if not (run_dir.path / "summary.json").exists():
        raise SimulationError(f"the simulation ended without finishing its rounds; see {run_dir.path}")
    summary = run_dir.summary()
    summary["wall_seconds"] = time.perf_counter() - started
    run_dir.write_summary(summary)
    return SimulationResult(run_dir.path, cfg, summary, run_dir.rounds())


#: Keys a resume may differ in from the run's saved config (the rest is the run's own).
RESUME_FREE_KEYS = frozenset({"resume", "run-dir", "sealing.identity-key"})


def resumed_config(asked: RunConfig, run_dir: Path) -> RunConfig:
    """The run's own saved config, with ``resume`` on. A key ``asked`` sets (to other than its default)
    and the saved run has otherwise is refused: a resume never silently changes a run."""
    saved = RunConfig.from_sources(run_dir / CONFIG_FILE)
    mine, theirs, defaults = asked.to_flat(), saved.to_flat(), RunConfig().to_flat()
    clashes = sorted(
        k for k in mine if k not in RESUME_FREE_KEYS and mine[k] != defaults.get(k) and mine[k] != theirs.get(k)
    )
    if clashes:
        shown = ", ".join(f"{k}={mine.get(k)!r} (run: {theirs.get(k)!r})" for k in clashes[:4])
        raise ConfigError(
            f"resume: {run_dir} continues with its own config, but this asks for {shown}"
            + (f" and {len(clashes) - 4} more" if len(clashes) > 4 else "")
            + "; drop those settings (or start a new run with a new --out)"
        )
    return dataclasses.replace(saved, resume=True)


def _resolve(config: RunConfig | str | os.PathLike[str] | None) -> RunConfig:
    if config is None:
        return RunConfig()
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return RunConfig.from_sources(Path(os.fspath(config)))
    raise ConfigError(f"simulate() takes a RunConfig, a TOML file path or None, got {type(config).__name__}")


def stop_engine() -> None:
    """Shut down Ray if this process started it (after an interruption: its actors die with it)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _run_flower_simulation(cfg: RunConfig, run_dir: Path, verbose: bool, display: Progress | None) -> None:
    """``flwr.simulation.run_simulation``; a failure surfaces as a FedvaultError carrying its message."""
    from flwr.simulation import run_simulation

    _quiet_flower(verbose)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")  # Ray's would abort on SIGTERM (exit -6)
    try:
        run_simulation(
            server_app=build_server_app(cfg, display),
            client_app=build_client_app(cfg, client_policy(cfg)),
            num_supernodes=cfg.num_clients,
            backend_config=backend_config(cfg, verbose),
        )
    except Exception as exc:  # noqa: BLE001 - whatever the ServerApp or the engine raised
        chain = list(_causes(exc))
        known = next((e for e in chain if isinstance(e, FedvaultError)), None)
        if known is exc:
            raise
        if known is not None:
            raise known.with_traceback(known.__traceback__) from known.__cause__  # names what and where
        cause = chain[-1]  # Flower wraps engine failures in "An error was encountered. Ending simulation."
        raise SimulationError(f"the simulation of {run_dir} failed: {type(cause).__name__}: {cause}") from exc


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


@contextlib.contextmanager
def _process_state_restored() -> Iterator[None]:
    """Put ``os.environ`` and the flwr, fedvault and root loggers back as they were on the way out.

    Flower's Ray backend rewrites ``PYTHONPATH`` and may turn off the flwr logger's propagation;
    this harness sets a Ray variable and the flwr logger's level and filter.
    """
    environ = dict(os.environ)
    loggers = [_LoggerState(logging.getLogger(name)) for name in ("flwr", "fedvault", "py.warnings", None)]
    try:
        yield
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        for state in loggers:
            state.restore()


class _LoggerState:
    """A logger's level, propagation, filters and handlers (with their levels), to restore later."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.level, self.propagate = logger.level, logger.propagate
        self.filters, self.handlers = list(logger.filters), list(logger.handlers)
        self.handler_levels = [h.level for h in self.handlers]

    def restore(self) -> None:
        self.logger.setLevel(self.level)
        self.logger.propagate = self.propagate
        self.logger.filters[:] = self.filters
        self.logger.handlers[:] = self.handlers
        for handler, level in zip(self.handlers, self.handler_levels):
            handler.setLevel(level)


@contextlib.contextmanager
def _library_lines_to(path: Path, verbose: bool) -> Iterator[None]:
    """Without ``verbose``, Flower's log lines, Python warnings and whatever else reaches the root
    logger (Opacus configures a console handler there on import) go to the run's ``library.log``;
    fedvault's own lines keep the console. The loggers are put back by :func:`_process_state_restored`."""
    if verbose:
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    flwr_log, root = logging.getLogger("flwr"), logging.getLogger()
    flwr_log.handlers[:], flwr_log.propagate = [handler], False
    consoles = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    root.handlers[:] = [h for h in root.handlers if getattr(h, "stream", None) not in consoles] + [handler]
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        handler.close()


class _DropDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecated" not in record.getMessage().lower()


def _quiet_flower(verbose: bool) -> None:
    """Flower logs every message at INFO; fedvault prints its own one line per round."""
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.INFO if verbose else logging.WARNING)
    if not any(isinstance(f, _DropDeprecation) for f in flwr_log.filters):
        flwr_log.addFilter(_DropDeprecation())
