"""Run directories are never clobbered, resume continues a run's own config, early stops exit non-zero."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

import pytest
from waits import seconds

from fedvault.config import RunConfig
from fedvault.errors import ConfigError
from fedvault.rundir import RunDirectory, RunDirectoryError, claim_run_dir
from fedvault.simulations.harness import resumed_config, simulate


def _finished_run(path) -> dict:
    """A run directory as a finished run leaves it; returns each file's bytes."""
    RunDirectory(path).create(RunConfig.create(task="digits", num_server_rounds=2, learning_rate=0.05).to_flat())
    (path / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n')
    (path / "summary.json").write_text(json.dumps({"rounds": 2}))
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_an_existing_run_is_refused_and_left_byte_identical(tmp_path):
    run = tmp_path / "runA"
    before = _finished_run(run)
    with pytest.raises(RunDirectoryError, match=r"runA already holds a run: continue it with --set resume=true"):
        claim_run_dir(run, resume=False)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert claim_run_dir(tmp_path / "new", resume=False) is None
    (tmp_path / "empty").mkdir()
    assert claim_run_dir(tmp_path / "empty", resume=False) is None


def test_overwrite_moves_the_old_run_aside_and_deletes_nothing(tmp_path):
    run = tmp_path / "runA"
    before = _finished_run(run)
    aside = claim_run_dir(run, resume=False, overwrite=True)
    assert aside is not None and aside.name.startswith("runA.replaced-") and not run.exists()
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == before
    _finished_run(run)
    second = claim_run_dir(run, resume=False, overwrite=True)
    assert second is not None and second != aside and aside.exists()


def test_resume_needs_a_run_and_continues_its_own_config(tmp_path):
    with pytest.raises(RunDirectoryError, match="holds no run to continue"):
        claim_run_dir(tmp_path, resume=True)
    run = tmp_path / "runA"
    _finished_run(run)
    resumed = resumed_config(RunConfig.create(run_dir=str(run), resume=True), run)
    assert resumed.task == "digits" and resumed.num_server_rounds == 2 and resumed.resume
    with pytest.raises(ConfigError, match=r"continues with its own config, but this asks for learning-rate=0.3"):
        resumed_config(RunConfig.create(run_dir=str(run), resume=True, learning_rate=0.3), run)


def test_simulate_refuses_a_used_out_directory_before_any_engine_starts(tmp_path):
    run = tmp_path / "runA"
    before = _finished_run(run)
    with pytest.raises(RunDirectoryError):
        simulate(RunConfig.create(task="digits", run_dir=str(run)))
    proc = subprocess.run(
        [sys.executable, "-m", "fedvault.cli", "simulate", "--out", str(run), "--set", "task=digits"],
        capture_output=True,
        text=True,
        timeout=seconds(120),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"fedvault simulate: error: {run} already holds a run")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.integration
def test_sigterm_keeps_the_finished_rounds_and_the_printed_command_resumes_to_the_end(tmp_path):
    run, rounds = tmp_path / "run", 16  # the SIGTERM comes after round 2: rounds 3-16 are its margin
    settings = ["task=digits", "batch-size=32", "learning-rate=0.05", "local-epochs=1", f"num-server-rounds={rounds}"]
    cmd = [sys.executable, "-m", "fedvault.cli", "simulate", "--out", str(run)]
    for item in settings + ["privacy.sample-level=false", "fraction-evaluate=0.0"]:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + seconds(300)
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # rounds 0, 1 and 2 finished
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=seconds(120))
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "Error" not in err.replace("fedvault simulate: interrupted", ""), err[-3000:]
    kept = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert kept[:3] == [0, 1, 2] and kept[-1] < rounds
    resume = err.strip().splitlines()[-1].split("continue with: ")[1]
    assert resume == f"fedvault simulate --out {run} --set resume=true"
    done = subprocess.run(
        [sys.executable, "-m", "fedvault.cli", *resume.split()[1:]],
        capture_output=True,
        text=True,
        timeout=seconds(420),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    finished = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert finished[: len(kept)] == kept and finished[-1] == rounds and sorted(set(finished)) == finished


def _spent_rounds(node_ledger) -> list[tuple[str, int]]:
    """``(client, round)`` of every spend in a node ledger (empty while it does not exist yet)."""
    if not node_ledger.exists():
        return []
    with closing(sqlite3.connect(f"file:{node_ledger}?mode=ro", uri=True, timeout=seconds(10))) as con:
        try:
            return con.execute("SELECT client_id, round FROM dp_events").fetchall()
        except sqlite3.OperationalError:  # the tables are not created yet
            return []


@pytest.mark.integration
def test_sigkill_in_the_middle_of_a_dp_round_then_resume_closes_that_round_and_finishes(tmp_path):
    run, rounds = tmp_path / "run", 4
    cmd = [sys.executable, "-m", "fedvault.cli", "simulate", "--out", str(run)]
    settings = ["task=digits", "batch-size=32", "learning-rate=0.05", "local-epochs=3", f"num-server-rounds={rounds}"]
    for item in settings + [
        "num-clients=6",
        "fraction-train=1.0",
        "fraction-evaluate=0.0",
        "privacy.sample-level=true",
    ]:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics, node_ledger = run / "metrics.jsonl", run / "node-ledger.sqlite"
    deadline = time.monotonic() + seconds(300)
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(rnd == 2 for _, rnd in _spent_rounds(node_ledger)):  # a client paid for round 2 ...
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # ... and the whole simulation dies at once, Ray included
    finally:
        subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)  # anything left in its session
        proc.wait(timeout=seconds(60))
    finished = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert finished == [0, 1], "round 2 finished before the kill: no interrupted round to test"
    paid_in_round_2 = {client for client, rnd in _spent_rounds(node_ledger) if rnd == 2}
    assert paid_in_round_2

    done = subprocess.run(
        [sys.executable, "-m", "fedvault.cli", "simulate", "--out", str(run), "--set", "resume=true"],
        capture_output=True,
        text=True,
        timeout=seconds(420),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
    spent = _spent_rounds(node_ledger)
    assert len(spent) == len(set(spent))  # no client paid twice for a round
    round_2 = records[2]
    refused = {d["node"] for d in round_2["dropped"] if "round-already-spent" in d["reason"]}
    assert len(refused) == len(paid_in_round_2)  # each client that had paid is recorded as such ...
    assert round_2.get("lost") or round_2["replies_ok"] == 6 - len(paid_in_round_2)  # ... and the rest trained
    run_ledger = [json.loads(line) for line in (run / "privacy_ledger.jsonl").read_text().splitlines()]
    spends_2 = [e for e in run_ledger if "event" in e and e["event"]["round"] == 2]
    assert {e["event"]["party"] for e in spends_2} == {f"client-{i}" for i in range(6)}  # every payer, once
    assert len(spends_2) == 6
