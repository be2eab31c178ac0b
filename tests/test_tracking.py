"""Experiment tracking: fedvault's trackers write real round records; TensorBoard's and MLflow's own
readers read them back (EventAccumulator on the event files, MlflowClient on the SQLite store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from strategy_helpers import InstantGrid
from waits import seconds

from fedvault.client.app import build_client_app
from fedvault.config import RunConfig
from fedvault.errors import ConfigError
from fedvault.server.app import run_server
from fedvault.server.tracking import MLFLOW_RUN_ID_FILE, Tracking, check_tracking, round_scalars

#: Rounds 0 and 1 of a real `fedvault simulate` run (4 clients, sample-level DP) as metrics.jsonl holds
#: them, but for one late reply added to round 1; round 2 is round 1 with other figures.
ROUND_0 = {"central": {"accuracy": 0.1058, "loss": 2.302159022521973}, "round": 0, "seconds": 6.211266403995978}
ROUND_1 = {
    "budget_exhausted": 0,
    "bytes_received": 87680,
    "bytes_sent": 87680,
    "central": {"accuracy": 0.4806, "loss": 1.347206840324402},
    "clients_sampled": 4,
    "dropped": [],
    "failed_nodes": [],
    "late": [{"node": 3, "reason": "reply after the round closed"}],
    "replies_ok": 4,
    "round": 1,
    "seconds": 220.40200014100265,
    "train": {"dp_epsilon": 4.759462089240255, "train_batch_size": 896.0, "train_steps": 45.0},
    "train_config": {"local-epochs": 5, "lr": 2.0, "momentum": 0.9},
}
ROUND_2 = {**ROUND_1, "round": 2, "central": {"accuracy": 0.61, "loss": 1.1}, "train": {"dp_epsilon": 6.7}}


@pytest.fixture
def event_accumulator():
    return pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


@pytest.fixture
def mlflow_tracking():
    return pytest.importorskip("mlflow.tracking")


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str:
    """One SQLite store for the unit tests (MLflow creates its tables in seconds, once)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _cfg(tmp_path: Path, backends: str, **options) -> RunConfig:
    return RunConfig.create(run_dir=str(tmp_path / "run"), tracking_backends=backends, **options)


def _track(cfg: RunConfig, *records: dict) -> None:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with Tracking(cfg, run_dir) as tracking:
        for record in records:
            tracking.on_round(record)


def _scalars(event_accumulator, log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = event_accumulator.EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _mlflow_run(mlflow_tracking, run_dir: Path, uri: str = ""):
    client = mlflow_tracking.MlflowClient(tracking_uri=uri or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    return client, client.get_run((run_dir / MLFLOW_RUN_ID_FILE).read_text())


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---- config and scalars ---------------------------------------------------------------------------


def test_tracking_backends_are_none_one_or_both_and_anything_else_names_the_key():
    assert RunConfig().tracking.trackers == ()
    assert RunConfig.create(tracking_backends="mlflow").tracking.trackers == ("mlflow",)
    assert RunConfig.create(tracking_backends="tensorboard, mlflow").tracking.trackers == ("tensorboard", "mlflow")
    for bad in ("wandb", "tensorboard,tensorboard", "", "none,mlflow"):
        with pytest.raises(ConfigError, match="invalid value for 'tracking.backends'"):
            RunConfig.from_sources(overrides=[f'tracking.backends="{bad}"'])


def test_round_scalars_of_real_records():
    assert round_scalars(ROUND_0) == {
        "central/accuracy": 0.1058,
        "central/loss": 2.302159022521973,
        "system/seconds": 6.211266403995978,
    }
    assert round_scalars(ROUND_1) == {
        "central/accuracy": 0.4806,
        "central/loss": 1.347206840324402,
        "privacy/dp_epsilon": 4.759462089240255,
        "train/train_batch_size": 896.0,
        "train/train_steps": 45.0,
        "clients/sampled": 4.0,
        "clients/ok": 4.0,
        "clients/budget_exhausted": 0.0,
        "clients/failed": 0.0,
        "clients/dropped": 0.0,
        "clients/late": 1.0,
        "system/seconds": 220.40200014100265,
        "system/bytes_sent": 87680.0,
        "system/bytes_received": 87680.0,
    }


# ---- each backend, read back with its own reader ----------------------------------------------------


def test_tensorboard_holds_every_round_at_its_step_and_the_config(tmp_path, event_accumulator):
    cfg = _cfg(tmp_path, "tensorboard")
    _track(cfg, ROUND_0, ROUND_1)
    scalars = _scalars(event_accumulator, tmp_path / "run" / "tensorboard")
    assert set(scalars) == set(round_scalars(ROUND_1))
    assert scalars["central/accuracy"] == [(0, pytest.approx(0.1058)), (1, pytest.approx(0.4806))]
    assert scalars["privacy/dp_epsilon"] == [(1, pytest.approx(4.759462089240255))]
    assert scalars["clients/late"] == [(1, 1.0)] and scalars["system/bytes_sent"] == [(1, 87680.0)]
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    (text,) = events.Tensors("config/text_summary")
    assert "`privacy.target-epsilon` | `8.0`" in text.tensor_proto.string_val[0].decode()
    # a resumed run appends to the same directory
    _track(cfg.with_options(resume=True), ROUND_2)
    scalars = _scalars(event_accumulator, tmp_path / "run" / "tensorboard")
    assert [step for step, _ in scalars["central/accuracy"]] == [0, 1, 2]


def test_mlflow_run_holds_metric_history_params_and_a_resume_continues_it(tmp_path, mlflow_tracking, mlflow_store):
    cfg = _cfg(tmp_path, "mlflow", task="digits", tracking_uri=mlflow_store)
    _track(cfg, ROUND_0, ROUND_1)
    client, run = _mlflow_run(mlflow_tracking, tmp_path / "run", mlflow_store)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "digits"  # the task, by default
    assert _history(client, run.info.run_id, "central/accuracy") == [(0, 0.1058), (1, 0.4806)]
    assert _history(client, run.info.run_id, "privacy/dp_epsilon") == [(1, 4.759462089240255)]
    assert _history(client, run.info.run_id, "clients/ok") == [(1, 4.0)]
    assert run.data.params["privacy.target-epsilon"] == "8.0" and run.data.params["tracking.backends"] == "mlflow"
    assert run.data.params.keys() == cfg.to_flat().keys()
    _track(cfg.with_options(resume=True), ROUND_2)
    client, resumed = _mlflow_run(mlflow_tracking, tmp_path / "run", mlflow_store)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "central/accuracy") == [(0, 0.1058), (1, 0.4806), (2, 0.61)]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_run_that_raises_closes_its_mlflow_run_as_failed(tmp_path, mlflow_tracking, mlflow_store):
    cfg = _cfg(tmp_path, "mlflow", tracking_uri=mlflow_store, tracking_experiment="failing")
    (tmp_path / "run").mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with Tracking(cfg, tmp_path / "run") as tracking:
            tracking.on_round(ROUND_0)
            raise RuntimeError("boom")
    client, run = _mlflow_run(mlflow_tracking, tmp_path / "run", mlflow_store)
    assert run.info.status == "FAILED" and client.get_experiment(run.info.experiment_id).name == "failing"
    assert _history(client, run.info.run_id, "central/accuracy") == [(0, 0.1058)]


# ---- a missing package: one line, before anything runs ---------------------------------------------


@pytest.mark.parametrize("backends, module", [("mlflow", "mlflow"), ("tensorboard,mlflow", "tensorboard")])
def test_a_tracker_that_is_not_installed_stops_the_run_in_one_line(tmp_path, monkeypatch, backends, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    cfg = _cfg(tmp_path, backends)
    with pytest.raises(ConfigError) as info:
        check_tracking(cfg)
    message = str(info.value)
    assert "\n" not in message and "'tracking.backends'" in message and "pip install 'fedvault[tracking]'" in message
    with pytest.raises(ConfigError, match="fedvault\\[tracking\\]"):
        run_server(InstantGrid([]), cfg)
    assert not (tmp_path / "run").exists()  # nothing written


def test_fedvault_simulate_refuses_a_missing_tracker_in_one_line_before_the_engine_starts(tmp_path):
    stub = tmp_path / "stub" / "mlflow"  # first on the path: `import mlflow` fails as when not installed
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('no mlflow here')\n")
    done = subprocess.run(
        [sys.executable, "-m", "fedvault.cli", "simulate", "--out", str(tmp_path / "run")]
        + ["--set", 'tracking.backends="mlflow"'],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(stub.parent)},
        timeout=seconds(120),
    )
    assert done.returncode != 0 and "simulating" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'fedvault[tracking]'" in lines[0], done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---- end to end: run_server over an in-process transport ---------------------------------------------


class Loopback(InstantGrid):
    """Hands each instruction to the simulation's ClientApp of its node, in this process (no engine)."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(range(1, cfg.num_clients + 1))
        self.app = build_client_app(cfg)
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": cfg.num_clients},
                state=RecordDict(),
                run_config=cfg.to_flat(),
            )
            for node in self.node_ids
        }

    def answer(self, msg: Message) -> Message:
        return self.app(msg, self.contexts[msg.metadata.dst_node_id])


def test_run_server_tracks_each_round_of_a_private_run_as_metrics_jsonl_holds_it(
    tmp_path, event_accumulator, mlflow_tracking, flower_task_identity
):
    cfg = _cfg(
        tmp_path,
        "tensorboard,mlflow",
        task="digits",
        num_clients=2,
        num_server_rounds=2,
        local_epochs=1,
        batch_size=32,
        learning_rate=0.05,
        fraction_evaluate=0.0,
    )  # sample-level DP on, as by default
    summary = run_server(Loopback(cfg), cfg)
    assert summary["stopped"] is None
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = {r["round"]: round_scalars(r) for r in rounds}
    assert sorted(expected) == [0, 1, 2] and "privacy/dp_epsilon" in expected[2]
    scalars = _scalars(event_accumulator, tmp_path / "run" / "tensorboard")
    client, run = _mlflow_run(mlflow_tracking, tmp_path / "run")
    assert run.info.status == "FINISHED"
    for key in ("central/accuracy", "privacy/dp_epsilon", "clients/ok", "system/bytes_received"):
        wanted = [(step, values[key]) for step, values in expected.items() if key in values]
        assert _history(client, run.info.run_id, key) == wanted
        assert scalars[key] == [(step, pytest.approx(value)) for step, value in wanted]
