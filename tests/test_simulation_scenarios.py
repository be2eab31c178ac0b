"""Scenarios on the real Simulation Engine: robust run with attackers, client-level DP to its cap.

Each test is marked with its scenario, one independent `fedvault simulate` subprocess. The selected
tests' runs start two at a time from the module's first test on (the ``runs`` fixture), so one run's
Ray start-up overlaps another's rounds; each test waits for its own run (``run``) and checks it.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from waits import seconds

pytestmark = pytest.mark.integration
DIGITS = ["task=digits", "batch-size=32", "learning-rate=0.05"]  # digits' recipe, not the DP main job's
CONCURRENT_RUNS = 2


@dataclass(frozen=True)
class Scenario:
    """``fedvault simulate --set S ...`` for each S of ``settings``, expected to exit with ``exit_code``."""

    settings: tuple[str, ...]
    exit_code: int = 0
    plugin_dir: str | None = None  # put on PYTHONPATH: a user's module outside fedvault


@dataclass(frozen=True)
class Run:
    out: Path
    stdout: str
    rounds: list[dict[str, Any]]
    summary: dict[str, Any]


def scenario(*settings: str, exit_code: int = 0, plugin_dir: str | None = None) -> pytest.MarkDecorator:
    """Marks a test as checking the run of ``fedvault simulate`` with ``settings``; its ``run`` fixture is that run."""
    return pytest.mark.scenario(Scenario(settings, exit_code, plugin_dir))


def simulate(out: Path, case: Scenario) -> Run:
    cmd = [sys.executable, "-m", "fedvault.cli", "simulate", "--out", str(out)]
    for item in case.settings:
        cmd += ["--set", item]
    env = dict(os.environ)
    if case.plugin_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [case.plugin_dir, env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds(420), env=env)
    assert proc.returncode == case.exit_code, proc.stderr[-3000:]
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return Run(out, proc.stdout, rounds, json.loads((out / "summary.json").read_text()))


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The runs of this module's selected tests (by node id), all submitted at once to a pool of CONCURRENT_RUNS."""
    cases = {
        item.nodeid: mark.args[0]
        for item in request.session.items
        if item.module is request.module and (mark := item.get_closest_marker("scenario"))
    }
    pool = ThreadPoolExecutor(max_workers=CONCURRENT_RUNS)
    try:
        yield {
            test: pool.submit(simulate, tmp_path_factory.mktemp("scenario") / "run", case)
            for test, case in cases.items()
        }
    finally:
        pool.shutdown(cancel_futures=True)


@pytest.fixture
def run(runs, request) -> Run:
    """This test's run once it has finished (each subprocess is bounded by its own timeout)."""
    return runs[request.node.nodeid].result()


@scenario(
    *DIGITS,
    "num-clients=5",
    "num-server-rounds=3",
    "privacy.sample-level=false",
    "strategy.name=fedavgm",
    "strategy.server-momentum=0.5",
    "attack.kind=gaussian",
    "attack.fraction=0.4",
    "attack.scale=100",
    "validation.max-update-norm=50",
    "sealing.mode=on",
)
def test_sealed_run_where_gaussian_attackers_are_dropped_and_fedavgm_still_learns(run):
    """Replies are sealed end to end; the server opens them, then validation drops the attackers."""
    for r in run.rounds[1:]:
        assert r["clients_sampled"] == 5 and r["replies_ok"] == 3
        assert len(r["dropped"]) == 2 and all("norm" in d["reason"] for d in r["dropped"])
    assert "dropped 2" in run.stdout
    assert (run.out / "identity" / "identity.key").stat().st_mode & 0o077 == 0
    assert run.summary["final_accuracy"] > run.summary["initial_accuracy"] + 0.2


@scenario(
    *DIGITS,
    "num-clients=8",
    "num-server-rounds=20",
    "fraction-train=0.5",
    "fraction-evaluate=0.0",
    "privacy.sample-level=false",
    "privacy.client-level=true",
    "privacy.client-noise-multiplier=1.0",
    "privacy.client-level-target-epsilon=8.0",
    exit_code=3,  # stopped early: every early stop exits non-zero
)
def test_client_level_dp_stops_at_the_server_budget(run):
    rounds, summary = run.rounds, run.summary
    done = len(rounds) - 1
    assert 1 <= done < 20
    assert summary["stopped"].startswith(f"client-level privacy budget: round {done + 1} would spend epsilon")
    assert "run stopped: client-level privacy budget" in run.stdout
    server = [p for p in summary["privacy"]["parties"] if p["party"] == "server"]
    assert server and len(server[0]["rounds"]) == done and server[0]["epsilon_pld"] <= 8.0
    lines = [json.loads(line) for line in (run.out / "privacy_ledger.jsonl").read_text().splitlines()]
    assert "header" in lines[0]  # delta and caps, then the spends
    ledger = lines[1:]
    assert [e["event"]["round"] for e in ledger] == list(range(1, done + 1))
    assert all(e["event"]["sample_rate"] == 0.5 and e["event"]["sampling"] == "poisson" for e in ledger)
    # who (and how many) were Poisson-sampled is secret: the run directory does not keep it
    assert not any({"clients_sampled", "failed_nodes", "train", "bytes_sent"} & r.keys() for r in rounds)


@scenario(
    *DIGITS,
    "num-clients=4",
    "num-server-rounds=3",
    "fraction-evaluate=0.0",
    "local-epochs=2",
    "strategy.name=scaffold",
    "privacy.target-epsilon=8.0",
    "learning-rate=0.1",
    "momentum=0.0",
)
def test_scaffold_under_dp_sgd_learns_within_each_clients_budget(run):
    """SCAFFOLD's client correction runs on the private gradient; the ledger still bounds epsilon."""
    assert all(r["replies_ok"] == 4 and not r["dropped"] for r in run.rounds[1:])
    assert run.summary["final_accuracy"] > run.summary["initial_accuracy"] + 0.2
    clients = [p for p in run.summary["privacy"]["parties"] if p["party"].startswith("client-")]
    assert len(clients) == 4 and all(len(p["rounds"]) == 3 and 0 < p["epsilon_pld"] <= 8.0 for p in clients)


@scenario(
    *DIGITS,
    "num-clients=3",
    "num-server-rounds=3",
    "fraction-evaluate=0.0",
    "local-epochs=1",
    "strategy.name=bare_strategy:MeanOfAll",
    plugin_dir=str(Path(__file__).parent),  # the plug-in is the user's module, outside fedvault
)
def test_a_strategy_subclassing_flowers_strategy_directly_runs_three_dp_rounds(run):
    """The round loop stamps server-round into every instruction, so DP clients record each round
    as its own and none replies round-already-spent from round 2 on."""
    assert [r["replies_ok"] for r in run.rounds[1:]] == [3, 3, 3]
    assert all(r["budget_exhausted"] == 0 and not r["dropped"] for r in run.rounds[1:])
    clients = [p for p in run.summary["privacy"]["parties"] if p["party"].startswith("client-")]
    assert len(clients) == 3 and all(p["rounds"] == [1, 2, 3] for p in clients)


@scenario("num-server-rounds=2")  # every other setting the default
def test_the_main_job_learns_under_dp_sgd_with_its_defaults(run):
    """README's main job (fedvault simulate with every default: mnist1d-large, 4 clients, DP-SGD at
    epsilon 8, auto batch), cut to 2 of its rounds: accuracy rises well above round 0 within budget."""
    assert all(r["train"]["train_batch_size"] == 896 for r in run.rounds[1:])  # auto: 10*sqrt(8000) -> 896
    assert run.summary["final_accuracy"] > run.summary["initial_accuracy"] + 0.3
    clients = [p for p in run.summary["privacy"]["parties"] if p["party"].startswith("client-")]
    assert len(clients) == 4 and all(0 < p["epsilon_pld"] <= 8.0 for p in clients)


@scenario(
    *DIGITS,
    "num-clients=5",
    "num-server-rounds=3",
    "partitioner=dirichlet",
    "dirichlet-alpha=1.0",
    "compression.codec=int8",
)
def test_int8_compressed_updates_cost_a_quarter_of_the_bytes_and_change_nothing_else(run, simulated_run):
    """The shared run (tests/conftest.py) again with compression.codec = int8: the same rounds, replies
    and privacy spend, each reply about 1/4 of its float32 size, and it still learns."""
    plain, _ = simulated_run
    rounds, summary = run.rounds, run.summary
    base = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    base_summary = json.loads((plain / "summary.json").read_text())
    assert len(rounds) == len(base) == 4
    for r, b in zip(rounds[1:], base[1:]):
        assert r["replies_ok"] == b["replies_ok"] == 5 and r["dropped"] == b["dropped"] == []
        assert r["bytes_sent"] == b["bytes_sent"]  # the global model still goes out in float32
        assert 0.22 < r["bytes_received"] / b["bytes_received"] <= 0.27
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.2
    assert summary["final_accuracy"] > base_summary["final_accuracy"] - 0.1  # DP noise differs between runs
    epsilons = lambda s: {p["party"]: p["epsilon_pld"] for p in s["privacy"]["parties"]}  # noqa: E731
    assert epsilons(summary) == epsilons(base_summary)  # post-processing: the same spend


@scenario(
    *DIGITS,
    "num-clients=10",
    "num-server-rounds=3",
    "fraction-evaluate=0.0",
    "federation.profiles=mixed",
    "federation.deadline=2.0",
)
def test_a_mixed_federation_under_a_deadline_drops_stragglers_and_keeps_their_spend(run):
    """20 % data-center GPUs, 80 % laptops and phones on a 2 s deadline (virtual clock), DP-SGD on:
    the phones miss it, some edge clients are offline; every client that trained is in the ledger."""
    ledger = [json.loads(line) for line in (run.out / "privacy_ledger.jsonl").read_text().splitlines()][1:]
    for r in run.rounds[1:]:
        missed, offline, failed = r["missed_deadline"], r["offline"], r["failed_after_training"]
        assert r["clock"] == "virtual" and r["clients_sampled"] == 10
        assert r["replies_ok"] + len(missed) + len(offline) + len(failed) == 10
        assert missed and r["round_clock_seconds"] == 2.0 and r["slowest_client"]["seconds"] > 2.0
        assert r["slowest_client"]["profile"] in ("edge-laptop", "edge-phone") and r["energy_joules"] > 0
        reasons = {d["node"]: d["reason"] for d in r["dropped"]}
        assert all(reasons[node].startswith("missed the deadline: ") for node in missed)
        assert all("offline" in reasons[node] for node in offline)
        spends = {(e["node"], e["status"]) for e in ledger if e["event"]["round"] == r["round"]}
        assert {node for node, status in spends if status == "dropped"} == set(missed) | set(failed)
        assert len([1 for _, status in spends if status == "kept"]) == r["replies_ok"]
        assert not spends & {(node, status) for node in offline for status in ("kept", "dropped")}
    assert "missed-deadline" in run.stdout and "clock 2.0s" in run.stdout
    assert run.summary["round_clock_seconds"] == 6.0 and run.summary["energy_joules"] > 0
    assert run.summary["final_accuracy"] > run.summary["initial_accuracy"] + 0.2
    assert (run.out / "accuracy_vs_cost.png").stat().st_size > 10_000


@scenario(
    *DIGITS,
    "num-clients=10",
    "num-server-rounds=4",
    "fraction-evaluate=0.0",
    "federation.profiles=mixed",
    "federation.fedbuff-buffer=3",
)
def test_fedbuff_steps_on_the_first_updates_to_finish_and_every_update_is_paid_for(run):
    """Six clients train at once (2 x the buffer of 3); each step applies the first three to finish on the
    virtual clock, staleness-weighted, and the rest wait in the buffer; DP-SGD's spends are all recorded."""
    ledger = [json.loads(line) for line in (run.out / "privacy_ledger.jsonl").read_text().splitlines()][1:]
    clock, held = 0.0, 0
    for r in run.rounds[1:]:
        train = r["train"]
        clock += r["round_clock_seconds"]
        assert train["fedbuff_applied"] == min(3, held + r["replies_ok"])
        assert train["fedbuff_held"] == held + r["replies_ok"] - train["fedbuff_applied"]
        assert train["fedbuff_clock"] == pytest.approx(clock)
        assert r["clients_sampled"] == 6 - held  # the free slots (10 clients: always enough not training)
        held = train["fedbuff_held"]
        spends = [e for e in ledger if e["event"]["round"] == r["round"]]
        assert len(spends) == r["replies_ok"] + len(r["failed_after_training"])
    assert run.rounds[-1]["train"]["fedbuff_max_staleness"] >= 1  # some update was applied a step late
    assert run.summary["final_accuracy"] > run.summary["initial_accuracy"] + 0.2
