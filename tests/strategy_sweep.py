"""Every built-in strategy and the example plug-in, one round each, through Flower's Simulation
Engine in one simulation.

    python tests/strategy_sweep.py OUT_DIR

One ``run_simulation`` (one Ray start-up) with fedvault's ClientApp on 4 digits clients and a
ServerApp that calls fedvault's ``run_server`` once per strategy on the engine's real Grid, each
into ``OUT_DIR/<strategy>/`` (a complete run directory; the plug-in's is ``OUT_DIR/plugin/``). A
strategy that raises leaves ``OUT_DIR/<strategy>.error`` with the traceback, and the sweep goes on. Used by
tests/test_strategies_engine.py (in a subprocess, so Ray stays out of the pytest process).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedvault.client.app import build_client_app
from fedvault.config import RunConfig
from fedvault.server.app import run_server
from fedvault.strategies.registry import builtin_strategies

CLIENTS = 4
BASE = [
    "task=digits",
    "batch-size=32",
    "learning-rate=0.05",
    f"num-clients={CLIENTS}",
    "num-server-rounds=1",
    "local-epochs=1",
    "fraction-evaluate=0.5",
    "privacy.sample-level=false",
    "seed=3",
]
EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "custom_strategy"
PLUGIN = "fedvault_example_strategy.clipped_fedavg:ClippedFedAvg"
PARAMS = {
    "fedprox": ["strategy.proximal-mu=5.0"],  # strong enough to see in one round
    PLUGIN: ["strategy.max-update-norm=0.1"],
}  # below FedAvg's update norm here, so it binds


def run_name(strategy: str) -> str:
    return "plugin" if strategy == PLUGIN else strategy


def strategy_config(name: str, out: Path) -> RunConfig:
    return RunConfig.from_sources(
        overrides=[*BASE, f"strategy.name={name}", f"run-dir={out / run_name(name)}", *PARAMS.get(name, [])]
    )


def sweep_app(out: Path) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        for name in [*builtin_strategies(), PLUGIN]:
            try:
                run_server(grid, strategy_config(name, out))
            except Exception:  # noqa: BLE001 - recorded for the test, which names the strategy
                (out / f"{run_name(name)}.error").write_text(traceback.format_exc())

    return app


def main(out: Path) -> None:
    from flwr.simulation import run_simulation

    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(EXAMPLE_DIR))  # the plug-in is the user's package, not fedvault's
    base = RunConfig.from_sources(overrides=BASE)
    run_simulation(
        server_app=sweep_app(out),
        client_app=build_client_app(base),
        num_supernodes=CLIENTS,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"logging_level": "ERROR", "log_to_driver": False},
        },
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
