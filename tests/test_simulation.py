"""`fedvault simulate` end to end on Flower's real Simulation Engine (Ray), digits, 5 clients,
with the defaults' sample-level DP on."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from waits import seconds

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run_dir(simulated_run):
    """The session's simulated run (tests/conftest.py): (run directory, stdout)."""
    return simulated_run


def test_progress_is_printed_each_round(run_dir):
    _, stdout = run_dir
    lines = [line for line in stdout.splitlines() if line.startswith("round")]
    assert [line.split()[1] for line in lines] == ["0/3", "1/3", "2/3", "3/3"]
    assert all("accuracy" in line and "loss" in line and line.endswith("s") for line in lines)
    assert "done: 3 rounds" in stdout


def test_run_directory_is_complete(run_dir):
    out, _ = run_dir
    for name in (
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "model.pt",
        "accuracy.png",
        "loss.png",
        "privacy_ledger.jsonl",
        "privacy_epsilon.png",
        "node-ledger.sqlite",
    ):
        assert (out / name).stat().st_size > 0, name
    for png in ("accuracy.png", "loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'task = "digits"' in (out / "config.toml").read_text()


def test_metrics_have_one_line_per_round_with_traffic_and_time(run_dir):
    out, _ = run_dir
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for r in rounds[1:]:
        assert r["replies_ok"] == r["clients_sampled"] == 5 and r["failed_nodes"] == []
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0 and r["seconds"] > 0
        assert r["train"]["train_steps"] > 0 and "accuracy" in r["central"]
        # DP-SGD covers the update only: the loss on private data and local evaluation are withheld
        assert "train_loss" not in r["train"] and "train_seconds" not in r["train"] and "evaluate" not in r


def test_final_centralized_accuracy_clearly_beats_round_zero(run_dir):
    out, _ = run_dir
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.25
    import torch

    from fedvault.tasks import load_task

    state = torch.load(out / "model.pt")
    assert state.keys() == load_task("digits").build_model().state_dict().keys()


def test_private_run_ends_with_budget_summary_and_no_client_over_its_cap(run_dir):
    out, stdout = run_dir
    assert "privacy budget:" in stdout and "integrity ok" in stdout
    summary = json.loads((out / "summary.json").read_text())
    parties = summary["privacy"]["parties"]
    assert sorted(p["party"] for p in parties) == [f"client-{i}" for i in range(5)]
    for party in parties:
        assert party["rounds"] == [1, 2, 3]
        assert party["epsilon_pld"] <= party["cap"] == 8.0
        assert party["epsilon_pld"] > 0.9 * party["cap"]  # calibrated to spend the budget over the planned rounds


def test_audit_cli_reads_the_run(run_dir):
    out, _ = run_dir
    proc = subprocess.run(
        [sys.executable, "-m", "fedvault.cli", "audit", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=seconds(120),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["entries"] == 1 + 15 and not report["exceeded"]  # the header, then 5 clients x 3 rounds
    assert report["anchored_entries"] == report["entries"] and report["findings"] == []


def _audit(run: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedvault.cli", "audit", str(run), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=seconds(120),
    )


def test_each_client_holds_a_signed_receipt_for_every_spend_and_a_re_signed_cut_is_caught(run_dir, tmp_path):
    """Anchors stop anyone without the server's key; the clients' receipts also stop its holder."""
    from fedvault.privacy.anchors import ANCHORS_FILENAME, sign_anchor
    from fedvault.privacy.ledger import LEDGER_FILENAME, read_ledger
    from fedvault.privacy.node_ledger import NodeLedger
    from fedvault.privacy.receipts import Receipt
    from fedvault.security.identity import load_identity
    from fedvault.server.anchoring import ANCHOR_KEY
    from fedvault.server.checkpoint import list_checkpoints

    out, _ = run_dir
    node_ledger = NodeLedger(out / "node-ledger.sqlite", create=False)
    spends = [e for e in read_ledger(out / LEDGER_FILENAME).entries if e.event is not None]
    receipted = {
        (r.fields["party"], r.fields["round"], r.fields["seq"], r.fields["entry"])
        for party in node_ledger.clients(out.name)
        for r in map(Receipt.from_json, node_ledger.receipts(out.name, party))
    }
    assert receipted == {(e.event.party, e.event.round, e.seq, e.hash) for e in spends}  # 15: every spend
    proc = _audit(out, "--node-ledger", str(out / "node-ledger.sqlite"))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # The identity key's holder cuts the last spend and re-signs a consistent history.
    cut = tmp_path / out.name
    shutil.copytree(out, cut)
    ledger = cut / LEDGER_FILENAME
    ledger.write_bytes(b"".join(ledger.read_bytes().splitlines(keepends=True)[:-1]))
    entries = read_ledger(ledger).entries
    anchor = sign_anchor(
        load_identity(cut / "identity" / "identity.key"),
        run=out.name,
        server_round=3,
        entries=len(entries),
        head=entries[-1].hash,
        final=True,
    )
    (cut / ANCHORS_FILENAME).write_text(json.dumps(anchor.to_dict()) + "\n")
    summary = json.loads((cut / "summary.json").read_text())
    (cut / "summary.json").write_text(json.dumps({**summary, ANCHOR_KEY: anchor.to_dict()}))
    for _, path in list_checkpoints(cut):
        path.unlink()
    assert _audit(cut).returncode == 0  # the signatures alone cannot tell
    proc = _audit(cut, "--node-ledger", str(cut / "node-ledger.sqlite"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    codes = {f["code"] for f in json.loads(proc.stdout)["findings"]}
    assert "receipt-not-in-run-ledger" in codes


def test_empirical_audit_cli_audits_the_runs_mechanism_with_canaries(run_dir):
    out, _ = run_dir
    proc = subprocess.run(
        [sys.executable, "-m", "fedvault.cli", "audit", str(out), "--empirical", "--canaries", "200"],
        capture_output=True,
        text=True,
        timeout=seconds(300),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads((out / "empirical_audit.json").read_text())
    assert result["mechanism"] == "dp-sgd" and result["canaries"] == 200 and result["claimed_epsilon"] == 8.0
    assert result["audited"] <= 8.0 and f"(seed {result['seed']}, {result['ledger_entry']}): consistent" in proc.stdout


def _failing_server_app(error: Exception):
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        raise error

    return app


def test_server_app_failure_is_a_fedvault_error_and_the_process_is_restored(tmp_path, monkeypatch):
    """In-process simulate(): the ServerApp's exception reaches the caller as a SimulationError with its
    message, and os.environ and Flower's logger are as before (Flower's Ray backend rewrites PYTHONPATH)."""
    import logging
    import os

    from fedvault import FedvaultError, RunConfig, simulate
    from fedvault.simulations import harness

    monkeypatch.setattr(
        harness, "build_server_app", lambda cfg, display: _failing_server_app(ValueError("boom in round 1"))
    )
    environ, flwr_log = dict(os.environ), logging.getLogger("flwr")
    flwr_state = (flwr_log.level, flwr_log.propagate, list(flwr_log.filters), list(flwr_log.handlers))
    cfg = RunConfig.create(task="digits", num_clients=2, num_server_rounds=1, privacy_sample_level=False)
    with pytest.raises(harness.SimulationError) as info:
        simulate(cfg, run_dir=str(tmp_path / "run"))
    assert isinstance(info.value, FedvaultError)
    assert str(info.value) == f"the simulation of {tmp_path / 'run'} failed: ValueError: boom in round 1"
    assert dict(os.environ) == environ
    assert (flwr_log.level, flwr_log.propagate, list(flwr_log.filters), list(flwr_log.handlers)) == flwr_state
