"""CLI errors: one clear line naming the key, value or package, non-zero exit, no traceback."""

import subprocess
import sys

import pytest
from waits import seconds

from fedvault.cli import main


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "task=cifar10"], "unknown task 'cifar10'"),
        (["--set", "partitioner=zipf"], "invalid value for 'partitioner': 'zipf'"),
        (["--set", "rounds=3"], "unknown config key 'rounds'"),
        (["--set", "num-server-rounds=0"], "invalid value for 'num-server-rounds': 0 (must be >= 1)"),
        (["--set", "dirichlet-alpha=0"], "invalid value for 'dirichlet-alpha': 0.0 (must be > 0)"),
        (
            ["--set", "task=digits", "--set", "num-clients=5000"],
            "num-clients=5000 is more than the 1348 training samples",
        ),
    ],
)
def test_simulate_rejects_bad_input_with_one_line(args, message, capsys):
    assert main(["simulate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedvault simulate: error: ") and message in err[0]


def test_missing_dataset_package_from_the_real_console_script(tmp_path):
    # A shadowing module that fails to import, as when the package is not installed.
    (tmp_path / "mnist1d").mkdir()
    (tmp_path / "mnist1d" / "__init__.py").write_text("raise ImportError('No module named mnist1d')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fedvault.cli", "simulate", "--set", "task=mnist1d"],
        capture_output=True,
        text=True,
        timeout=seconds(120),
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "fedvault simulate: error: missing package 'mnist1d' needed for task 'mnist1d' (pip install mnist1d)"
    )


def test_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for key in ("num-server-rounds", "dirichlet-alpha", "client-gpus", "fraction-train"):
        assert key in out
