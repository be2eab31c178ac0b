"""What a run shows while it goes: plain lines off a terminal, a live status line on one, --quiet."""

from __future__ import annotations

import io
import logging
import re

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from strategy_helpers import InstantGrid, StaticGrid
from waits import seconds

from fedvault.cli import build_parser
from fedvault.progress import Progress
from fedvault.rundir import RunDirectory
from fedvault.server.recorder import RunRecorder
from fedvault.server.rounds import RoundLoop
from fedvault.strategies.arrays import to_record
from fedvault.strategies.validation import ValidationRules


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fedvault_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fedvault"]


def plain(clock: FakeClock | None = None, **kwargs) -> tuple[Progress, io.StringIO, io.StringIO]:
    out, status = io.StringIO(), io.StringIO()
    return Progress(live=False, out=out, status=status, clock=clock or FakeClock(), **kwargs), out, status


def test_off_a_terminal_a_wait_says_what_it_waits_for_every_interval_in_plain_lines(caplog):
    clock = FakeClock()
    progress, out, status = plain(clock, every=10.0)
    with caplog.at_level(logging.INFO, logger="fedvault"), progress.running(3):
        progress.line("round   0/3  accuracy 0.1000  loss 2.3000  0.50s")
        with progress.replies_wait("round 1", 10, 600.0) as wait:
            for done in range(6):  # a poll every 5 s
                wait.update(done)
                clock.now += 5.0
    setup = " (the first round includes the clients' set-up: data, DP)"
    assert caplog.messages == [
        "round 1: 2/10 replies after 10 s, waiting up to 600 s" + setup,
        "round 1: 4/10 replies after 20 s, waiting up to 600 s" + setup,
    ]
    assert out.getvalue() == "round   0/3  accuracy 0.1000  loss 2.3000  0.50s\n" and status.getvalue() == ""
    assert not any(c in out.getvalue() + caplog.text for c in "\x1b\r")


def test_later_rounds_do_not_mention_the_clients_set_up(caplog):
    progress, _, _ = plain(every=0.0)
    progress.round_finished(1, 30.0)
    with caplog.at_level(logging.INFO, logger="fedvault"), progress.replies_wait("round 2 evaluate", 4, None) as wait:
        wait.update(3)
    assert caplog.messages == ["round 2 evaluate: 3/4 replies after 0 s, waiting no time limit"]


def test_on_a_terminal_the_status_line_shows_elapsed_and_eta_and_is_cleared_for_every_plain_line():
    clock = FakeClock()
    out, status = io.StringIO(), io.StringIO()
    progress = Progress(live=True, out=out, status=status, clock=clock, refresh=3600.0)  # drawn by the test
    with progress.running(4):
        progress.round_finished(0, 1.0)
        for server_round, took in ((1, 10.0), (2, 30.0)):
            clock.now += took
            progress.round_finished(server_round, took)
        clock.now += 5.0
        with progress.replies_wait("round 3", 4, 600.0) as wait:
            wait.update(1)
            progress.draw()
            # rounds took 10 s and 30 s: median 20 s x 2 rounds left, 5 s into round 3
            line = "round 3/4  elapsed 0:45  ETA 0:35  round 3: 1/4 replies after 0 s, waiting up to 600 s"
            assert status.getvalue() == "\r\x1b[2K" + line[:79]  # cut to the width (80 off a terminal)
        progress.line("round   3/4  accuracy 0.9000  loss 0.3000  20.00s")
        assert status.getvalue().endswith("\r\x1b[2K")  # cleared before the plain line
        progress.draw()
    assert status.getvalue().endswith("\r\x1b[2K")  # and when the run ends
    assert out.getvalue() == "round   3/4  accuracy 0.9000  loss 0.3000  20.00s\n"  # stdout stays plain


def test_the_status_line_is_cleared_when_the_run_raises():
    status = io.StringIO()
    progress = Progress(live=True, out=io.StringIO(), status=status, clock=FakeClock(), refresh=3600.0)
    with pytest.raises(KeyboardInterrupt), progress.running(2):
        progress.draw()
        raise KeyboardInterrupt
    assert status.getvalue() == "\r\x1b[2Kround 1/2  elapsed 0:00\r\x1b[2K"


class GrowingGrid(StaticGrid):
    """Clients connecting one by one: each look at the node list finds one more, up to ``last``."""

    def __init__(self, last: int) -> None:
        super().__init__([1])
        self.last = last

    def get_node_ids(self) -> list[int]:
        nodes = list(self.node_ids)
        if len(self.node_ids) < self.last:
            self.node_ids.append(len(self.node_ids) + 1)
        return nodes


def round_loop(grid, timeout: float, progress: Progress) -> RoundLoop:
    return RoundLoop(
        strategy=FedAvg(fraction_train=1.0, min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0),
        grid=grid,
        central_evaluate=lambda server_round, arrays: {},
        on_round=lambda record, arrays: None,
        timeout=timeout,
        rules=ValidationRules(),
        poll_seconds=0.001,
        pull_seconds=0.001,
        progress=progress,
    )


def test_the_server_says_how_many_clients_it_waits_for_while_they_connect(caplog):
    progress, _, _ = plain(every=0.0)
    with caplog.at_level(logging.INFO, logger="fedvault"):
        eligible = round_loop(GrowingGrid(3), seconds(5.0), progress)._eligible_grid(1)
    assert eligible.get_node_ids() == [1, 2, 3]
    limit = f"{seconds(5.0):g}"
    assert [re.sub(r"\(\d+ s of", "(T s of", m) for m in fedvault_lines(caplog)] == [
        f"round 1: waiting for 3 clients, 1 connected (T s of up to {limit} s)",
        f"round 1: waiting for 3 clients, 2 connected (T s of up to {limit} s)",
    ]


class StragglerGrid(InstantGrid):
    """Nodes 1 and 2 reply at once; node 3 misses the round's timeout."""

    def __init__(self) -> None:
        super().__init__([1, 2, 3])
        self.held = {3}

    def answer(self, msg: Message) -> Message:
        update = to_record({"w": np.ones(3, dtype=np.float32)})
        return Message(RecordDict({"arrays": update, "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)


def test_a_round_waiting_for_a_straggler_says_how_many_replies_are_in(flower_task_identity, caplog):
    progress, _, _ = plain(every=0.0)
    loop = round_loop(StragglerGrid(), seconds(0.2), progress)
    with caplog.at_level(logging.INFO, logger="fedvault"):
        loop._round(1, to_record({"w": np.zeros(3, dtype=np.float32)}), ConfigRecord())
    waits = {m for m in fedvault_lines(caplog) if "replies after" in m}
    assert {re.sub(r"after \d+ s", "after T s", m) for m in waits} == {
        f"round 1: 2/3 replies after T s, waiting up to {seconds(0.2):g} s "
        "(the first round includes the clients' set-up: data, DP)"
    }


def test_quiet_prints_no_round_lines_and_the_default_prints_them_as_before(tmp_path):
    record = {"round": 0, "central": {"accuracy": 0.1, "loss": 2.3}, "seconds": 0.5}
    run_dir = RunDirectory(tmp_path / "run").create({})
    for quiet, expected in ((True, ""), (False, "round   0/3  accuracy 0.1000  loss 2.3000  0.50s\n")):
        progress, out, status = plain(quiet=quiet)
        RunRecorder(run_dir, 3, "t", progress=progress).on_round(dict(record), None)
        assert out.getvalue() == expected and status.getvalue() == ""


def test_simulate_and_server_take_quiet_or_verbose_not_both(capsys):
    parser = build_parser()
    for command in (["simulate"], ["server", "--state", "s"]):
        assert parser.parse_args([*command, "--quiet"]).quiet
        assert parser.parse_args([*command, "--verbose"]).verbose
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--quiet", "--verbose"])
    assert "not allowed with argument" in capsys.readouterr().err
