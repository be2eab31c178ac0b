"""During a simulation, libraries' lines go to the run's library.log, not the console (fedvault's stay)."""

from __future__ import annotations

import logging
import sys
import warnings

from fedvault.simulations.harness import _library_lines_to, _process_state_restored


def test_flower_root_and_warning_lines_go_to_the_run_log_and_the_loggers_come_back(tmp_path, capsys):
    root, flwr_log = logging.getLogger(), logging.getLogger("flwr")
    console = logging.StreamHandler(sys.stderr)  # what Opacus' logging.basicConfig installs on import
    root.addHandler(console)
    try:
        before = (list(root.handlers), list(flwr_log.handlers), flwr_log.propagate)
        with _process_state_restored(), _library_lines_to(tmp_path / "library.log", verbose=False):
            flwr_log.warning("fraction_evaluate is set to 0.0")
            logging.getLogger("absl").warning("_compute_log_a_frac failed to converge")
            warnings.warn("a library's UserWarning", UserWarning, stacklevel=1)
        assert (list(root.handlers), list(flwr_log.handlers), flwr_log.propagate) == before
        logging.getLogger("absl").warning("after the run: on the console again")
    finally:
        root.removeHandler(console)
    captured = capsys.readouterr()
    assert "fraction_evaluate" not in captured.err + captured.out
    assert "failed to converge" not in captured.err and "UserWarning" not in captured.err
    assert "after the run: on the console again" in captured.err
    records = [line.split(" ", 3) for line in (tmp_path / "library.log").read_text().splitlines() if line[:4].isdigit()]
    assert [name for _, _, name, _ in records] == ["flwr", "absl", "py.warnings"]


def test_verbose_keeps_libraries_on_the_console(tmp_path, capsys):
    with _process_state_restored(), _library_lines_to(tmp_path / "library.log", verbose=True):
        logging.getLogger("flwr").warning("shown")
    assert not (tmp_path / "library.log").exists()
