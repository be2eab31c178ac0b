"""`fedvault audit RUN --empirical`: the run's own mechanism and parameters audited in a separate run."""

import json

from fedvault.config import RunConfig
from fedvault.privacy.empirical_report import CANARY_LEDGER, EMPIRICAL_FILE, empirical_audit_of_run, render_empirical
from fedvault.privacy.ledger import read_ledger


def test_both_mechanisms_of_a_run_are_audited_at_its_claims_and_the_seeds_are_kept(tmp_path):
    cfg = RunConfig.from_flat(
        {
            "task": "digits",
            "num-server-rounds": 2,
            "local-epochs": 1,
            "batch-size": 64,
            "learning-rate": 0.5,
            "fraction-train": 0.5,
            "privacy.target-epsilon": 2.0,
            "privacy.client-level": True,
            "privacy.client-level-target-epsilon": 4.0,
            "privacy.grad-sample-mode": "hooks",
        }
    )
    results = empirical_audit_of_run(tmp_path, cfg, canaries=100)
    assert [r["mechanism"] for r in results] == ["dp-sgd", "dp-fedavg"]
    sgd, fedavg = results
    assert sgd["claimed_epsilon"] == 2.0 and sgd["canaries"] == 100 and sgd["delta"] == 1e-5
    assert 0.0 <= sgd["audited"] <= 2.0 and not sgd["flagged"]  # a correct mechanism at 95 % confidence
    assert fedavg["claimed_epsilon"] == 4.0 and fedavg["canaries"] == 100
    assert all(r["seed"] and int(r["seed"]) >= 0 for r in results)
    assert json.loads((tmp_path / EMPIRICAL_FILE).read_text()) == results
    text = render_empirical(results)
    assert f"seed {sgd['seed']}" in text and "claimed epsilon 2, audited lower bound (95 %)" in text
    # the seeds are in the audit runs' own hash-chained ledger, one canary entry per mechanism
    entries = read_ledger(tmp_path / CANARY_LEDGER).entries
    assert [(e.canary["mechanism"], e.canary["seed"]) for e in entries[1:]] == [
        (r["mechanism"], r["seed"]) for r in results
    ]
    assert entries[0].header.target_delta == 1e-5 and sgd["ledger_entry"] == f"{CANARY_LEDGER} entry 2"
