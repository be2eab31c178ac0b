"""The run audit: a real run directory (config.toml + ledger), checked against the libraries directly."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import json
import os
import random
import tomllib

import dp_accounting
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import PRVAccountant, RDPAccountant

from fedvault.cli import main
from fedvault.privacy.accountants import cumulative_epsilons
from fedvault.privacy.anchors import TrustedKey, key_fingerprint, sign_anchor
from fedvault.privacy.audit import AuditError, audit_run, plot_epsilon, render_table, to_csv, to_json
from fedvault.privacy.events import DPEvent
from fedvault.privacy.ledger import LEDGER_FILENAME, Ledger, LedgerError, LedgerHeader, LedgerTamperedError, read_ledger

CONFIG = """\
[privacy]
target-epsilon = 1.5
target-delta = 1e-5
client-level-target-epsilon = 4.0
"""
# party -> (noise multiplier, sample rate, steps per round, rounds taken part in)
CLIENTS = {
    "client-1": (1.5, 0.02, 50, (1, 2, 3, 4, 5)),
    "client-2": (1.3, 0.05, 20, (2, 4)),
    "client-3": (0.8, 0.02, 50, (1, 2, 3, 4, 5)),  # spends past the 1.5 cap
}
SERVER = (1.0, 0.1, 1, (1, 2, 3, 4, 5))


@functools.lru_cache
def direct(spec: tuple, delta: float) -> dict[str, float]:
    """Each accountant fed through its library's public API, without fedvault."""
    z, q, steps, rounds = spec
    total = steps * len(rounds)
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), total)
    prv, rdp = PRVAccountant(), RDPAccountant()
    for _ in range(total):
        prv.step(noise_multiplier=z, sample_rate=q)
        rdp.step(noise_multiplier=z, sample_rate=q)
    return {"pld": pld.get_epsilon(delta), "prv": prv.get_epsilon(delta), "rdp": rdp.get_epsilon(delta)}


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "config.toml").write_text(CONFIG)
    privacy = tomllib.loads(CONFIG)["privacy"]
    header = LedgerHeader(
        "run", privacy["target-delta"], privacy["target-epsilon"], privacy["client-level-target-epsilon"]
    )
    ledger = Ledger(tmp_path / LEDGER_FILENAME, header=header)  # delta and caps live in the ledger
    for rnd in range(1, 6):
        for party, (z, q, steps, rounds) in CLIENTS.items():
            if rnd in rounds:
                ledger.append(DPEvent("sample", z, q, steps, "poisson", rnd, party))
        z, q, steps, _ = SERVER
        ledger.append(DPEvent("client", z, q, steps, "poisson", rnd, "server"))
    return tmp_path


KEY = Ed25519PrivateKey.generate()


def audit(run_dir):
    """The ledger's own delta and caps (its header), its head signed as now (anchoring: test_ledger_anchoring.py)."""
    privacy = tomllib.loads((run_dir / "config.toml").read_text())["privacy"]
    entries, head = _head(run_dir)
    anchor = sign_anchor(KEY, run="run", server_round=5, entries=entries, head=head, final=True)
    trusted = TrustedKey(key_fingerprint(KEY.public_key().public_bytes_raw()), "test key")
    return audit_run(run_dir, trusted=trusted, anchors=[("test", anchor.to_dict())]), privacy


def _head(run_dir):
    contents = read_ledger(run_dir / LEDGER_FILENAME)
    return len(contents.entries), contents.head_hash


def expected_parties(delta: float) -> dict[str, dict[str, float]]:
    return {**{p: direct(s, delta) for p, s in CLIENTS.items()}, "server": direct(SERVER, delta)}


def test_report_numbers_match_the_libraries_and_flag_the_cap(run_dir):
    report, privacy = audit(run_dir)
    delta = privacy["target-delta"]
    expected = expected_parties(delta)
    assert report.integrity == "ok"
    assert report.entries == 1 + sum(len(s[3]) for s in CLIENTS.values()) + len(SERVER[3])  # header + spends
    assert [p.party for p in report.parties] == ["client-1", "client-2", "client-3", "server"]
    for p in report.parties:
        spec = SERVER if p.party == "server" else CLIENTS[p.party]
        cap = privacy["client-level-target-epsilon"] if p.party == "server" else privacy["target-epsilon"]
        assert p.rounds == list(spec[3])
        assert p.epsilon_pld == pytest.approx(expected[p.party]["pld"], rel=0.01)
        assert p.epsilon_prv == pytest.approx(expected[p.party]["prv"], rel=0.01)
        assert p.epsilon_rdp == pytest.approx(expected[p.party]["rdp"], rel=0.01)
        assert (p.cap, p.delta) == (cap, delta)
        assert p.remaining == pytest.approx(cap - p.epsilon_pld)
        assert p.exceeded == (expected[p.party]["pld"] > cap)
    assert report.exceeded == ["client-3"]  # the fixture is built so exactly this one is over


def test_table_json_and_csv_carry_the_same_numbers(run_dir):
    report, privacy = audit(run_dir)
    expected = expected_parties(privacy["target-delta"])

    table = render_table(report)
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.startswith(("client-", "server "))}
    for party, values in expected.items():
        row = rows[party]
        for column, method in ((5, "pld"), (6, "prv"), (7, "rdp")):
            assert float(row[column]) == pytest.approx(values[method], rel=0.01)
    assert rows["client-3"][-1] == "EXCEEDED" and rows["client-1"][-1] == "ok"
    assert "CAP EXCEEDED by: client-3" in table

    data = json.loads(to_json(report))
    assert data["exceeded"] == ["client-3"]
    by_party = {p["party"]: p for p in data["parties"]}
    for party, values in expected.items():
        for method in ("pld", "prv", "rdp"):
            assert by_party[party][f"epsilon_{method}"] == pytest.approx(values[method], rel=0.01)
    assert len(data["curves"]["client-2"]) == 2

    parsed = list(csv.DictReader(io.StringIO(to_csv(report))))
    assert [r["party"] for r in parsed] == ["client-1", "client-2", "client-3", "server"]
    for r in parsed:
        assert float(r["epsilon_pld"]) == pytest.approx(expected[r["party"]]["pld"], rel=0.01)
        assert float(r["remaining"]) == pytest.approx(float(r["cap"]) - float(r["epsilon_pld"]))
        assert r["exceeded"] == ("true" if r["party"] == "client-3" else "false")
    assert parsed[1]["rounds"] == "2 4"


def test_curves_are_cumulative_and_end_at_the_total(run_dir):
    report, _ = audit(run_dir)
    for p in report.parties:
        curve = report.curves[p.party]
        assert [r for r, _ in curve] == p.rounds
        values = [e for _, e in curve]
        assert values == sorted(values) and values[0] > 0
        assert values[-1] == pytest.approx(p.epsilon_pld, rel=0.01)


def test_plot_is_written_as_a_png(run_dir):
    report, _ = audit(run_dir)
    path = plot_epsilon(report, run_dir / "plots" / "epsilon.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert not [p for p in path.parent.iterdir() if p.name != "epsilon.png"]  # no temp file left


def test_tampered_ledger_fails_the_audit_and_truncation_is_reported(run_dir):
    path = run_dir / LEDGER_FILENAME
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][:30])
    report, _ = audit(run_dir)
    assert report.entries == len(lines) - 1
    assert report.integrity.startswith(f"truncated final line {len(lines)}")
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    with pytest.raises(LedgerTamperedError, match="line 3"):
        audit(run_dir)


def test_missing_ledger_and_bad_caps_are_clear_errors(tmp_path):
    with pytest.raises(AuditError, match="no privacy ledger"):
        audit_run(tmp_path, trusted=None)
    with pytest.raises(LedgerError, match="epsilon_cap"):
        LedgerHeader("run", 1e-5, -1.0, None)


def test_many_clients_share_composition_without_changing_results():
    rng = random.Random(7)
    histories = {
        f"client-{c}": [
            DPEvent("sample", 1.0 if c % 5 else 1.3, 0.01, 100, "poisson", r, f"client-{c}")
            for r in range(1, 21)
            if c % 2 == 0 or rng.random() < 0.6
        ]
        for c in range(20)
    }
    curves = cumulative_epsilons(histories, 1e-5)
    for party in ("client-0", "client-5", "client-7", "client-19"):
        events = histories[party]
        for k in (1, len(events) // 2, len(events)):
            accountant = pld_privacy_accountant.PLDAccountant()
            accountant.compose(
                dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(events[0].noise_multiplier)),
                100 * k,
            )
            assert curves[party][k - 1] == (events[k - 1].round, pytest.approx(accountant.get_epsilon(1e-5), rel=0.01))


def test_each_party_shows_its_mechanism_and_a_cross_check_above_the_cap_is_named(run_dir):
    report, _ = audit(run_dir)
    by_party = {p.party: p for p in report.parties}
    assert by_party["client-1"].mechanism == "z=1.5 q=0.02 steps=250"
    assert by_party["server"].mechanism == "z=1 q=0.1 steps=5"
    assert "z=1.3 q=0.05 steps=40" in render_table(report)
    assert by_party["client-3"].status == "EXCEEDED"
    loose = dataclasses.replace(by_party["client-1"], cap=by_party["client-1"].epsilon_pld + 1e-9)
    above = [name for name in ("PRV", "RDP") if getattr(loose, f"epsilon_{name.lower()}") > loose.cap]
    assert above and loose.status == f"ok ({' and '.join(above)} above cap)"
    assert json.loads(to_json(report))["parties"][0]["status"] == by_party["client-1"].status


def test_audit_into_a_closed_pipe_ends_without_a_traceback(run_dir):
    """``fedvault audit RUN | head``: the reader is gone before the table is printed."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w", buffering=1) as closed, contextlib.redirect_stdout(closed):
        assert main(["audit", str(run_dir)]) == 141
