"""Complete accounting and an anchored ledger (issue #11, points 2 and 3): every attack on the
run ledger, its config, its anchors and the clients' ledgers is caught by ``fedvault audit``."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from strategy_helpers import InstantGrid
from test_client_budget import _config, _train

from fedvault.cli import main
from fedvault.client.app import build_client_app
from fedvault.config import RunConfig
from fedvault.privacy.events import DPEvent
from fedvault.privacy.ledger import LEDGER_FILENAME, Ledger, entry_hash, read_ledger
from fedvault.privacy.node_ledger import NodeLedger, NodeLedgerTamperedError
from fedvault.privacy.report import ledger_header
from fedvault.protocol import DP_EVENT, LEDGER_INVALID, METRICS, NUM_EXAMPLES, STATUS, dp_event_record
from fedvault.rundir import RunDirectory
from fedvault.security.identity import fingerprint, load_identity
from fedvault.server.anchoring import ANCHOR_KEY, LedgerAnchorer
from fedvault.server.rounds import RoundLoop, RunStopped
from fedvault.server.run_audit import audit
from fedvault.server.sealing import server_identity_path
from fedvault.strategies.arrays import to_record
from fedvault.strategies.validation import ValidationRules

NODES = {11: "client-0", 12: "client-1", 13: "client-2"}  # Flower node id -> partition (party)
ROUNDS = 3


def spend(party: str, rnd: int) -> DPEvent:
    return DPEvent.dp_sgd(noise_multiplier=1.5, sample_rate=0.02, steps=20, round=rnd, party=party)


def make_cfg(run_dir: Path) -> RunConfig:
    return RunConfig.from_flat(
        {"task": "digits", "num-clients": 3, "num-server-rounds": ROUNDS, "run-dir": str(run_dir)}
    )


def server_pieces(run_dir: Path) -> tuple[RunConfig, Ledger, LedgerAnchorer]:
    """What ``run_server`` sets up: run dir, ledger with its header, identity, anchorer."""
    cfg = make_cfg(run_dir)
    if not (run_dir / "config.toml").exists():
        RunDirectory(run_dir).create(cfg.to_flat())
    ledger = Ledger(run_dir / LEDGER_FILENAME, header=ledger_header(cfg, run_dir.name))
    identity = load_identity(server_identity_path(cfg, run_dir))
    return cfg, ledger, LedgerAnchorer(ledger, identity, run_dir.name)


@pytest.fixture
def run(tmp_path) -> Path:
    """A finished private run: 3 clients x 3 rounds, signed after every round, clients' own ledger too."""
    run_dir = tmp_path / "run"
    _, ledger, anchorer = server_pieces(run_dir)
    node_ledger = NodeLedger(run_dir / "node-ledger.sqlite")
    anchorer.anchor(0)
    for rnd in range(1, ROUNDS + 1):
        for node, party in NODES.items():
            node_ledger.record(run_dir.name, party, spend(party, rnd))
            ledger.append(spend(party, rnd), node=node)
        anchorer.anchor(rnd)
    final = anchorer.anchor(ROUNDS, final=True)
    RunDirectory(run_dir).write_summary({"rounds": ROUNDS, ANCHOR_KEY: final.to_dict()})
    return run_dir


def run_audit(run_dir: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["audit", str(run_dir), "--json", *extra])
    return code, capsys.readouterr().err


def lines(run_dir: Path) -> list[bytes]:
    return (run_dir / LEDGER_FILENAME).read_bytes().splitlines(keepends=True)


def test_an_untouched_run_audits_clean_and_names_its_key(run, capsys):
    code, err = run_audit(run, capsys, "--node-ledger", str(run / "node-ledger.sqlite"))
    assert (code, err) == (0, "")
    report = audit(run)
    assert report.findings == [] and report.anchored_entries == report.entries == 1 + 3 * ROUNDS
    assert str(run / "identity" / "identity.pub") in report.key_source
    assert {p.party: p.nodes for p in report.parties} == {party: [node] for node, party in NODES.items()}


def test_truncation_is_detected(run, capsys):
    (run / LEDGER_FILENAME).write_bytes(b"".join(lines(run)[:-2]))
    code, err = run_audit(run, capsys)
    assert code == 2 and "[truncated]" in err and "it has 8 entries" in err


def test_an_appended_forged_entry_with_a_valid_hash_is_detected(run, capsys):
    last = json.loads(lines(run)[-1])
    body = {
        "seq": last["seq"] + 1,
        "timestamp": last["timestamp"],
        "event": spend("client-0", 4).to_dict(),
        "node": 11,
        "status": "kept",
        "reason": None,
        "prev_hash": last["hash"],
    }
    forged = json.dumps({**body, "hash": entry_hash(body)}).encode() + b"\n"
    (run / LEDGER_FILENAME).write_bytes(b"".join(lines(run)) + forged)
    read_ledger(run / LEDGER_FILENAME)  # the chain itself verifies
    code, err = run_audit(run, capsys)
    assert code == 2 and "[appended]" in err and "after the final signed anchor" in err


def test_a_consistent_rewrite_is_detected(run, capsys, tmp_path):
    honest = audit(run).parties[0].epsilon_pld
    fake = tmp_path / "fake"
    fake.mkdir()
    rewritten = Ledger(fake / LEDGER_FILENAME, header=ledger_header(make_cfg(run), run.name))
    for node, party in NODES.items():  # one round of spend instead of three, chained correctly
        rewritten.append(spend(party, 1), node=node)
    (run / LEDGER_FILENAME).write_bytes((fake / LEDGER_FILENAME).read_bytes())
    code, err = run_audit(run, capsys)
    assert code == 2 and "[truncated]" in err
    # padded to the signed length, the head still differs
    for rnd in (2, 3):
        for party in NODES.values():
            rewritten.append(DPEvent.dp_sgd(noise_multiplier=9.0, sample_rate=0.02, steps=1, round=rnd, party=party))
    (run / LEDGER_FILENAME).write_bytes((fake / LEDGER_FILENAME).read_bytes())
    code, err = run_audit(run, capsys)
    assert code == 2 and "[rewritten]" in err
    assert audit(run).parties[0].epsilon_pld < honest  # what the rewrite would have claimed


def test_an_emptied_ledger_is_detected(run, capsys):
    (run / LEDGER_FILENAME).write_bytes(b"")
    code, err = run_audit(run, capsys)
    assert code == 2 and "[no-header]" in err and "[truncated]" in err


def test_removed_anchors_are_detected(run, capsys):
    (run / LEDGER_FILENAME).write_bytes(b"".join(lines(run)[:-3]))  # last round dropped ...
    anchors = run / "privacy_ledger.anchors"
    anchors.write_text("".join(anchors.read_text().splitlines(keepends=True)[:-2]))  # ... with its anchors
    code, err = run_audit(run, capsys)
    assert code == 2 and "summary.json signed 10" in err  # the summary still holds the final anchor
    (run / "summary.json").unlink()
    anchors.unlink()
    code, err = run_audit(run, capsys)
    assert code == 2 and "[unanchored]" in err


def test_edited_delta_in_config_is_flagged_and_the_ledgers_delta_is_used(run, capsys):
    honest = audit(run).parties[0].epsilon_pld
    config = run / "config.toml"
    config.write_text(config.read_text().replace("target-delta = 1e-05", "target-delta = 0.001"))
    assert "0.001" in config.read_text()
    code, err = run_audit(run, capsys)
    assert code == 2 and "[config-differs]" in err and "target_delta: 1e-05 != 0.001" in err
    report = audit(run)
    assert report.delta == 1e-5 and report.parties[0].epsilon_pld == honest


def test_a_pinned_key_must_have_signed_the_anchors(run, capsys, tmp_path):
    pub = run / "identity" / "identity.pub"
    pin = fingerprint(load_identity(run / "identity" / "identity.key").public_key())
    assert run_audit(run, capsys, "--server-key", pin)[0] == 0
    assert pin in audit(run, server_key=str(pub)).key_source
    code, err = run_audit(run, capsys, "--server-key", "ab" * 32)
    assert code == 2 and "[anchor-wrong-key]" in err


def test_a_spoofed_party_name_is_flagged(run, capsys):
    _, ledger, anchorer = server_pieces(run)
    ledger.append(spend("client-2", 4), node=11)  # node 11 (client-0) spends under client-2's name
    anchorer.anchor(4)
    code, err = run_audit(run, capsys)
    assert code == 2 and "[node-several-parties]" in err and "[party-several-nodes]" in err
    assert "node 11 spent under several party names: ['client-0', 'client-2']" in err


def test_a_crash_mid_round_is_unverified_and_resume_signs_the_new_head(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _, ledger, anchorer = server_pieces(run_dir)
    anchorer.anchor(0)
    ledger.append(spend("client-0", 1), node=11)  # the server crashed before round 1 finished
    code, err = run_audit(run_dir, capsys)
    assert code == 3 and "[after-last-anchor]" in err and "a crash mid-round" in err
    _, ledger, anchorer = server_pieces(run_dir)  # resumed: round 1 again
    ledger.append(spend("client-1", 1), node=12)
    anchorer.anchor(1)
    assert run_audit(run_dir, capsys) == (0, "")


def test_node_ledger_rows_removed_are_detected_and_the_client_refuses(run, capsys):
    db = run / "node-ledger.sqlite"
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM dp_events WHERE client_id = 'client-1' AND round = 3")
    with pytest.raises(NodeLedgerTamperedError, match="client-1 .* 2 rows, but its head records 3"):
        NodeLedger(db).events(run.name, "client-1")
    code, err = run_audit(run, capsys, "--node-ledger", str(db))
    assert code == 2 and "[node-ledger-tampered]" in err
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM dp_events WHERE client_id = 'client-2' AND round = 1")
    with pytest.raises(NodeLedgerTamperedError, match="row seq 1 is missing"):
        NodeLedger(db).events(run.name, "client-2")


def test_a_client_refuses_to_train_on_a_ledger_that_fails_its_check(tmp_path, flower_task_identity):
    cfg = _config(tmp_path)
    app = build_client_app(cfg)
    assert DP_EVENT in _train(app, 1).content and DP_EVENT in _train(app, 2).content
    with sqlite3.connect(tmp_path / "run" / "node-ledger.sqlite") as con:
        con.execute("DELETE FROM dp_events WHERE round = 2")  # to train past its cap
    reply = _train(app, 3)
    status = reply.content.config_records[STATUS]
    assert status[STATUS] == LEDGER_INVALID and "refusing to train" in str(status["reason"])
    assert "arrays" not in reply.content and DP_EVENT not in reply.content


def test_a_spend_only_the_node_ledger_holds_is_added_and_flagged(run, capsys):
    NodeLedger(run / "node-ledger.sqlite").record(run.name, "client-2", spend("client-2", 4))  # a late reply
    before = {p.party: p.epsilon_pld for p in audit(run).parties}
    code, err = run_audit(run, capsys, "--node-ledger", str(run / "node-ledger.sqlite"))
    assert code == 3 and "[missing-from-run-ledger]" in err and "client-2 round 4" in err
    merged = {p.party: p for p in audit(run, node_ledgers=[run / "node-ledger.sqlite"]).parties}
    assert merged["client-2"].node_ledger_rounds == [4] and merged["client-2"].epsilon_pld > before["client-2"]
    assert merged["client-1"].epsilon_pld == before["client-1"]


# ---- validation drops every update: the spend is still in the ledger ----------------------------


class ReplyingGrid(InstantGrid):
    """Answers each train instruction with a client reply carrying a DP event and NaN arrays."""

    def __init__(self, nodes: dict[int, str]) -> None:
        super().__init__(nodes)
        self.nodes = nodes

    def answer(self, msg):
        node, rnd = msg.metadata.dst_node_id, int(msg.content["config"]["server-round"])
        arrays = to_record({"w": np.full(3, np.nan, dtype=np.float32)})  # fails validation
        content = RecordDict(
            {
                "arrays": arrays,
                METRICS: MetricRecord({NUM_EXAMPLES: 10}),
                DP_EVENT: dp_event_record(spend(self.nodes[node], rnd)),
            }
        )
        return Message(content, reply_to=msg)


def test_validation_drops_every_update_and_the_audit_still_shows_every_spend(tmp_path, capsys, flower_task_identity):
    run_dir = tmp_path / "run"
    _, ledger, anchorer = server_pieces(run_dir)
    anchorer.anchor(0)
    nodes = {11: "client-0", 12: "client-1", 13: "client-2", 14: "client-3"}
    loop = RoundLoop(
        strategy=FedAvg(fraction_train=1.0, min_available_nodes=4, min_train_nodes=4),
        grid=ReplyingGrid(nodes),
        central_evaluate=None,
        on_round=None,
        timeout=1.0,
        rules=ValidationRules(),
        client_evaluate=False,
        ledger=ledger,
    )
    with pytest.raises(RunStopped, match="0 usable updates"):
        loop._round(1, to_record({"w": np.zeros(3, dtype=np.float32)}), ConfigRecord())
    anchorer.anchor(1)  # the server records the round as far as it got
    report = audit(run_dir)
    assert {p.party: (p.nodes, p.dropped_rounds) for p in report.parties} == {
        party: ([node], [1]) for node, party in nodes.items()
    }
    assert all(p.epsilon_pld > 0 for p in report.parties)
    dropped = [e for e in read_ledger(run_dir / LEDGER_FILENAME).entries if e.status == "dropped"]
    assert len(dropped) == 4 and all(e.reason and e.node in nodes for e in dropped)
    capsys.readouterr()  # the drops' log lines
    assert run_audit(run_dir, capsys) == (0, "")
