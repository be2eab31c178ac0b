"""The Python front door: `from fedvault import ...`, lazy imports, no global state changed on import."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from waits import seconds

import fedvault
from fedvault import ConfigError, RunConfig

HEAVY = ("torch", "flwr", "ray", "opacus", "matplotlib", "matplotlib.pyplot")


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=seconds(240)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_fedvault_loads_no_heavy_library():
    loaded = run_python(f"""
        import json, sys
        import fedvault
        from fedvault import RunConfig, ConfigError
        RunConfig.create(num_clients=3)
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
    """)
    assert loaded == []


def test_help_and_config_errors_load_no_heavy_library():
    loaded = run_python(f"""
        import contextlib, io, json, sys
        from fedvault.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            main(["--help"])
        with contextlib.redirect_stderr(io.StringIO()) as err:
            code = main(["simulate", "--set", "num-clients=0"])
        print(json.dumps({{"code": code, "err": err.getvalue(), "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    assert loaded["code"] == 2 and "invalid value for 'num-clients': 0" in loaded["err"]
    assert loaded["loaded"] == []


def test_every_exported_name_resolves():
    assert {"RunConfig", "simulate", "audit", "PrivateTrainer", "load_task", "__version__"} <= set(fedvault.__all__)
    for name in fedvault.__all__:
        assert getattr(fedvault, name) is not None, name
    from fedvault.privacy.dp_sgd import PrivateTrainer
    from fedvault.server.run_audit import audit
    from fedvault.simulations.harness import simulate
    from fedvault.tasks import load_task

    assert (fedvault.PrivateTrainer, fedvault.audit, fedvault.simulate, fedvault.load_task) == (
        PrivateTrainer,
        audit,
        simulate,
        load_task,
    )
    assert fedvault.load_task("digits").build_model() is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fedvault.nope  # noqa: B018


def test_run_config_validates_on_construction():
    with pytest.raises(ConfigError) as direct:
        RunConfig(num_clients=0)
    with pytest.raises(ConfigError) as flat:
        RunConfig.from_flat({"num-clients": 0})
    assert str(direct.value) == str(flat.value) == "invalid value for 'num-clients': 0 (must be >= 1)"
    with pytest.raises(ConfigError, match="'fraction-train': 7.0 \\(must be > 0 and <= 1\\)"):
        RunConfig(fraction_train=7.0)


def test_keyword_constructor():
    cfg = RunConfig.create(
        task="digits",
        num_clients=4,
        num_server_rounds=3,
        privacy_target_epsilon=8.0,
        strategy="fedprox",
        strategy_params={"proximal-mu": 0.1},
    )
    assert (cfg.task, cfg.num_clients, cfg.num_server_rounds, cfg.privacy.target_epsilon) == ("digits", 4, 3, 8.0)
    assert cfg.strategy.name == "fedprox" and dict(cfg.strategy_params) == {"proximal-mu": 0.1}
    with pytest.raises(ConfigError, match="unknown config keyword 'num_rounds'.*close matches: .*num_server_rounds"):
        RunConfig.create(num_rounds=3)


def test_importing_the_apps_changes_no_global_state():
    """A notebook's matplotlib backend and logging setup survive importing fedvault's server and audit."""
    state = run_python("""
        import json, logging, sys
        import matplotlib
        matplotlib.use("pdf")
        # Flower's and Opacus' import-time logging setup (Opacus calls logging.basicConfig) is theirs;
        # fedvault must add nothing on top of it.
        import flwr, opacus.utils.module_utils

        def snapshot():
            loggers = {name: logging.getLogger(name) for name in ("", "flwr", "fedvault")}
            return {
                "backend": matplotlib.get_backend(),
                "pyplot": "matplotlib.pyplot" in sys.modules,
                "levels": {n: lg.level for n, lg in loggers.items()},
                "handlers": {n: len(lg.handlers) for n, lg in loggers.items()},
                "propagate": {n: lg.propagate for n, lg in loggers.items()},
            }

        before = snapshot()
        import fedvault.server.app, fedvault.privacy.audit, fedvault.simulations.harness, fedvault.plots
        print(json.dumps({"before": before, "after": snapshot()}))
    """)
    assert state["after"] == state["before"]
    assert state["after"]["backend"] == "pdf" and not state["after"]["pyplot"]


def test_show_progress_attaches_one_handler(capsys):
    from fedvault.logs import hide_progress, show_progress

    logger = logging.getLogger("fedvault")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    try:
        logger.handlers[:] = []
        show_progress()
        show_progress(logging.DEBUG)
        assert len(logger.handlers) == 1 and logger.level == logging.DEBUG and not logger.propagate
        logging.getLogger("fedvault.something").info("hello %s", "there")
        assert capsys.readouterr().err == "hello there\n"
        hide_progress()
        assert logger.handlers == [] and logger.propagate and logger.level == logging.NOTSET
    finally:
        logger.level, logger.propagate, logger.handlers[:] = saved[0], saved[1], saved[2]


def test_plots_are_written_without_pyplot(tmp_path):
    from fedvault.plots import plot_run

    rounds = [
        {"round": 0, "central": {"accuracy": 0.1, "loss": 2.3}},
        {
            "round": 1,
            "central": {"accuracy": 0.5, "loss": 1.2},
            "train": {"train_loss": 1.5},
            "evaluate": {"eval_accuracy": 0.4, "eval_loss": 1.3},
        },
    ]
    written = plot_run(rounds, tmp_path, "digits")
    assert [p.name for p in written] == ["accuracy.png", "loss.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "loss.png"]  # no temp files left


def test_simulation_result_reads_a_run_directory(tmp_path):
    from fedvault.rundir import RunDirectory
    from fedvault.simulations.harness import SimulationError, SimulationResult

    with pytest.raises(SimulationError, match="holds no finished run"):
        SimulationResult.load(tmp_path)
    run = RunDirectory(tmp_path).create(RunConfig.create(task="digits").to_flat())
    run.append_round({"round": 0, "central": {"accuracy": 0.1}})
    run.append_round({"round": 1, "central": {"accuracy": 0.6}})
    run.write_summary({"rounds": 1, "initial_accuracy": 0.1, "final_accuracy": 0.6, "stopped": None})
    result = SimulationResult.load(tmp_path)
    assert result.config.task == "digits" and result.final_accuracy == 0.6 and result.initial_accuracy == 0.1
    assert result.accuracy_curve == [0.1, 0.6] and result.stopped is None and len(result.rounds) == 2
    assert os.fspath(result) == str(tmp_path)


def test_audit_of_a_folder_that_is_not_a_run(tmp_path):
    from fedvault.errors import FedvaultError

    with pytest.raises(FedvaultError, match=f"{tmp_path} is not a run directory \\(no config.toml\\)"):
        fedvault.audit(tmp_path)


def _engine_raising(error: BaseException):
    def run_simulation(**kwargs) -> None:
        os.environ["PYTHONPATH"] = "changed-by-the-engine"
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
        logging.getLogger("flwr").propagate = False
        raise error

    return run_simulation


def _wrapped_engine_error() -> RuntimeError:
    try:
        try:
            raise KeyError("missing-key")
        except KeyError as inner:
            raise RuntimeError("An error was encountered. Ending simulation.") from inner
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    "error, expected_type, message",
    [
        (ValueError("boom"), "SimulationError", "failed: ValueError: boom"),
        (_wrapped_engine_error(), "SimulationError", "failed: KeyError: 'missing-key'"),
        (ConfigError("invalid value for 'x': 1"), "ConfigError", "invalid value for 'x': 1"),
    ],
)
def test_engine_failures_surface_as_fedvault_errors_and_state_is_restored(
    error, expected_type, message, tmp_path, monkeypatch
):
    """Without starting Ray: what run_simulation raises, and what it changes, as simulate() reports and undoes."""
    import flwr.simulation

    from fedvault.errors import FedvaultError

    monkeypatch.setattr(flwr.simulation, "run_simulation", _engine_raising(error))
    flwr_log = logging.getLogger("flwr")
    before = (dict(os.environ), flwr_log.level, flwr_log.propagate, list(flwr_log.filters))
    with pytest.raises(FedvaultError) as info:
        fedvault.simulate(RunConfig.create(task="digits", num_clients=2), run_dir=str(tmp_path / "run"))
    assert type(info.value).__name__ == expected_type and message in str(info.value)
    assert (dict(os.environ), flwr_log.level, flwr_log.propagate, list(flwr_log.filters)) == before


def test_plot_titles_carry_the_run_settings():
    from fedvault.plots import run_title

    assert run_title(RunConfig.create(task="digits", num_clients=5)) == (
        "digits, 5 clients (iid), fedavg, DP-SGD eps 8, delta 1e-05"
    )
    plain = RunConfig.create(task="digits", privacy_sample_level=False, strategy_name="fedprox")
    assert run_title(plain).endswith("fedprox, no DP")
